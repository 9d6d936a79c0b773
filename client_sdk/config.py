"""Settings for the processes this one starts, by the names of the
configuration file (``worker.resources.GPU``, ``worker.nthreads``,
``scheduler.placement``), as ``dask.config`` does it:

>>> from client_sdk import LocalCluster, config
>>> with config.set({"worker.resources.GPU": 2}):
...     cluster = LocalCluster(n_workers=2)  # both workers declare GPU=2

As a context manager :class:`set` lasts for the block; called plainly, for
the process; nested blocks layer. A :class:`~client_sdk.LocalCluster` started
meanwhile hands these settings to its scheduler and workers, above the
environment and the configuration file and below its own arguments.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apportion_common.config_file import SECTIONS, ConfigError, as_declared
from apportion_common.config_file import check_section as _check_section
from apportion_common.settings import SchedulerSettings, WorkerSettings

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

__all__ = ["get", "set"]

_CLASSES: dict[str, type[BaseSettings]] = {
    "scheduler": SchedulerSettings,
    "worker": WorkerSettings,
}
#: The settings set in this process, nested as in the file.
_config: dict[str, Any] = {}
_lock = threading.RLock()
_NO_DEFAULT: Any = object()


class set:  # lower case: named as dask.config.set, which it mirrors
    """Set settings by their dotted names (``{"worker.resources.GPU": 2}``,
    or ``worker__nthreads=4`` as keywords) for this process; as a context
    manager, until the block ends.

    Names and values are checked now: an unknown name or a bad value raises
    :class:`ValueError` naming it, and nothing is set.
    """

    def __init__(self, arg: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        updates = {**(arg or {}), **{key.replace("__", "."): v for key, v in kwargs.items()}}
        self._undo: list[tuple[str, tuple[str, ...], Any]] = []
        with _lock:
            try:
                for key, value in updates.items():
                    self._assign(_split(key), _checked_value(key, value))
                for section in {_split(key)[0] for key in updates}:
                    _check_section(_CLASSES[section], section, _config.get(section, {}))
            except ConfigError as exc:
                self._restore()
                raise ConfigError(str(exc)) from None

    def __enter__(self) -> set:
        return self

    def __exit__(self, *exc: object) -> None:
        with _lock:
            self._restore()

    def _assign(self, path: tuple[str, ...], value: Any) -> None:
        # As dask.config.set: remember what each key held, so that leaving the
        # block undoes this call alone (a plain set() made meanwhile stays).
        d = _config
        for depth, key in enumerate(path):
            here = path[: depth + 1]
            if depth == len(path) - 1:
                self._undo.append(("replace", here, d[key]) if key in d else ("insert", here, None))
                d[key] = copy.deepcopy(value)
            elif not isinstance(d.get(key), dict):
                # A table made on the way ("worker" for "worker.nthreads") goes
                # only if empty then: it may hold what a plain set() put since.
                self._undo.append(("replace", here, d[key]) if key in d else ("table", here, None))
                d[key] = {}
            d = d[key]

    def _restore(self) -> None:
        for op, path, value in reversed(self._undo):
            d = _config
            for key in path[:-1]:
                d = d.setdefault(key, {})
            if op == "replace":
                d[path[-1]] = value
            elif op == "insert" or not d.get(path[-1]):
                d.pop(path[-1], None)
        self._undo.clear()


def get(key: str, default: Any = _NO_DEFAULT) -> Any:
    """The value a process started now would use (what :func:`set` set, else
    the environment, else the configuration file, else the default):
    ``get("worker.resources")`` -> ``{"GPU": 2.0}``, with amounts given as
    text kept as text (``"100GB"``, ``"auto"``). A setting with no value
    (a resource not declared) returns ``default``, or raises ``KeyError``."""
    path = _split(key)
    section = path[0]
    with _lock:
        given = copy.deepcopy(_config.get(section, {}))
    settings = _CLASSES[section](**given)
    value: Any = _public(settings)
    for part in path[1:]:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif path[1] == "resources" and len(path) == 3:  # a resource not declared
            if default is _NO_DEFAULT:
                raise KeyError(key)
            return default
        else:
            raise ConfigError(f"{key}: unknown setting")
    return value


@dataclass(frozen=True)
class _ForLocalCluster:
    """What a LocalCluster takes from here (its own arguments come first)."""

    #: set here, as APPORTION_* variables for its processes (above those they
    #: inherit); worker.resources aside, which goes as --resources
    env: dict[str, str]
    #: set here, else the environment's, else the file's
    nthreads: int | None
    resources: dict[str, float | str]
    #: checked, not resolved: "auto" or bytes (0: none)
    memory_limit: int | str
    worker_name: str | None
    #: set here only: a LocalCluster listens on 127.0.0.1 and a free port
    #: unless told so, whatever a file for ``apportion scheduler`` says
    scheduler_host: str | None
    scheduler_port: int | None


def _for_local_cluster() -> _ForLocalCluster:
    """A snapshot of the settings for a LocalCluster starting now; a bad one
    (here, in the environment, in the file) raises before anything starts."""
    with _lock:
        layer = copy.deepcopy(_config)
    given = layer.get("scheduler", {})
    scheduler = SchedulerSettings(**given)
    worker = WorkerSettings(**layer.get("worker", {}))
    env = {}
    for section, data in layer.items():
        for path, value in _flat(data):
            if section == "worker" and path[0] == "resources":
                continue
            env[f"APPORTION_{section}__{'__'.join(path)}".upper()] = _env_text(value)
    return _ForLocalCluster(
        env=env,
        nthreads=worker.nthreads,
        resources=as_declared(worker.resources, worker.resources_text, worker.auto_resources),
        memory_limit=worker.memory_limit,
        worker_name=worker.name,
        scheduler_host=scheduler.host if "host" in given else None,
        scheduler_port=scheduler.port if "port" in given else None,
    )


def _split(key: str) -> tuple[str, ...]:
    path = tuple(key.split("."))
    if path[0] not in SECTIONS or not all(path):
        raise ConfigError(f"{key}: unknown setting (names start scheduler. or worker.)")
    return path


def _checked_value(key: str, value: Any) -> Any:
    if "." not in key and not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping of its settings, not {value!r}")
    # Handed on as environment variables, which cannot say None (nor can a file).
    if value is None:
        raise ConfigError(f"{key}: None cannot be set: leave the setting out instead")
    if isinstance(value, Mapping):
        return {str(k): _checked_value(f"{key}.{k}", v) for k, v in value.items()}
    return value


def _public(settings: BaseSettings) -> dict[str, Any]:
    """The settings as :func:`get` shows them: nested dicts, resources as declared."""
    data = settings.model_dump(exclude={"resources_text", "auto_resources"})
    if isinstance(settings, WorkerSettings):
        data["resources"] = as_declared(
            settings.resources, settings.resources_text, settings.auto_resources
        )
    return data


def _flat(data: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            found += _flat(value, (*path, key))
        else:
            found.append(((*path, key), value))
    return found


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
