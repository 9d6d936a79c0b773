"""The configuration file: ``[scheduler]`` and ``[worker]`` tables whose keys
mirror the settings (:mod:`apportion_common.settings`), read by a
pydantic-settings source that ranks below the environment.

.. code-block:: toml

    [scheduler]
    port = 9000

    [worker]
    nthreads = 4

    [worker.resources]
    GPU = 2
    MEMORY = "100GB"

The file is ``$APPORTION_CONFIG``, else ``$XDG_CONFIG_HOME/apportion/config.toml``
(``~/.config/apportion/config.toml`` by default), else
``/etc/apportion/config.toml``: the first that exists. ``APPORTION_CONFIG``
naming no file is an error, not a fall-back to another file (a typo would
silently read the wrong one); ``APPORTION_CONFIG=/dev/null`` reads none.

Each command checks the tables it reads before anything starts: an unknown
key, a bad value or a TOML syntax error is one :class:`ConfigError` line
naming the file, the key and the problem. A table a command does not read is
not checked by it (a scheduler need not judge the workers' settings), but a
table no command reads (``[wroker]``) is refused by all. Tokens and TLS stay
out of the file: they come from flags or the environment.

:func:`describe` tells where each setting came from (``apportion config``).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import tomllib
import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_settings import (
    DotEnvSettingsSource,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
)

from .resources import AUTO

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

CONFIG_ENV = "APPORTION_CONFIG"
SYSTEM_CONFIG = Path("/etc/apportion/config.toml")
SECTIONS = ("scheduler", "worker")
#: Set from ``resources`` as it is read, never given on their own (settings.py).
DERIVED = frozenset({"resources_text", "auto_resources"})
#: Files are often shared and world-readable, so secrets never come from one.
SECURITY_KEYS = frozenset(
    {"token", "worker_token", "client_token", "tls_ca", "tls_cert", "tls_key"}
)


class ConfigError(ValueError):
    """A setting that cannot be used, as one line naming where, the key and the problem."""


class SettingError(ConfigError):
    """A bad setting, before we know which file (if any) it came from."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def user_config_path() -> Path | None:
    base = os.environ.get("XDG_CONFIG_HOME")
    if not base:
        try:
            base = str(Path.home() / ".config")
        except RuntimeError:  # no HOME and no password entry: no user file
            return None
    return Path(base) / "apportion" / "config.toml"


def search_paths() -> tuple[Path, ...]:
    """Where the file is looked for without ``APPORTION_CONFIG``, in order."""
    user = user_config_path()
    return (SYSTEM_CONFIG,) if user is None else (user, SYSTEM_CONFIG)


def find_config_file() -> Path | None:
    """The configuration file in force now (None: there is none)."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.exists():
            raise ConfigError(f"{path}: no such file (named by {CONFIG_ENV})")
        return path
    return next((path for path in search_paths() if path.is_file()), None)


def read_config_file(path: Path) -> dict[str, Any]:
    """The whole document, its top-level tables checked (but not their keys)."""
    try:
        with path.open("rb") as stream:
            document = tomllib.load(stream)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    for key, value in document.items():
        if key not in SECTIONS:
            raise ConfigError(f"{path}: {key}: unknown section (expected [scheduler] or [worker])")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key}: expected a table ([{key}])")
    return document


def load_section(path: Path, settings_cls: type[BaseSettings], section: str) -> dict[str, Any]:
    """The ``[section]`` table of ``path``, checked against ``settings_cls``."""
    data: dict[str, Any] = read_config_file(path).get(section, {})
    try:
        check_section(settings_cls, section, data)
    except SettingError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return data


def check_section(settings_cls: type[BaseSettings], section: str, data: Mapping[str, Any]) -> None:
    """Raise :class:`SettingError` for the first unknown key or bad value in
    ``data`` (one section's settings, nested as in the file), checked alone:
    no other source is read."""
    _check_names(settings_cls, section, data)
    try:
        _alone(settings_cls)(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in (section, *first["loc"]))
        raise SettingError(key, first["msg"].removeprefix("Value error, ")) from None


def _check_names(model: type[BaseModel], prefix: str, data: Mapping[str, Any]) -> None:
    # The settings classes ignore extra keys (the environment is shared with
    # other programs), so a typo in a file is caught here or nowhere.
    fields = {name: field for name, field in model.model_fields.items() if name not in DERIVED}
    for key, value in data.items():
        where = f"{prefix}.{key}"
        if key in SECURITY_KEYS:
            flag = key.replace("_", "-")
            problem = (
                f"secrets and TLS are not configured so: use --{flag} or APPORTION_{key.upper()}"
            )
            raise SettingError(where, problem)
        field = fields.get(key)
        if field is None:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
            raise SettingError(where, f"unknown setting{hint}")
        nested = _nested_model(field.annotation)
        if nested is not None and isinstance(value, Mapping):
            _check_names(nested, where, value)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (``memory: MemorySettings``), also inside ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        return next(filter(None, map(_nested_model, get_args(annotation))), None)
    return None


@functools.cache
def _alone(settings_cls: type[BaseSettings]) -> type[BaseSettings]:
    """``settings_cls`` reading its arguments only: the values of one source
    checked on their own (the environment's mistakes are not the file's)."""

    def init_only(
        cls: type[BaseSettings], /, settings_cls: type[BaseSettings], **sources: Any
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (sources["init_settings"],)

    namespace = {"settings_customise_sources": classmethod(init_only)}
    return type(f"{settings_cls.__name__}Alone", (settings_cls,), namespace)


class ConfigFileSource(InitSettingsSource):
    """The ``[section]`` table of the configuration file, checked when made
    (each time settings are read, so a command sees the file as it is now).
    Resources given by a higher source replace the file's as a whole."""

    def __init__(self, settings_cls: type[BaseSettings], section: str) -> None:
        self.section = section
        self.path = find_config_file()
        data = load_section(self.path, settings_cls, section) if self.path is not None else {}
        super().__init__(settings_cls, init_kwargs=data)

    def __call__(self) -> dict[str, Any]:
        data = dict(super().__call__())
        if "resources" in getattr(self, "current_state", {}):
            data.pop("resources", None)
        return data


# ----------------------------------------------------- where each value came from


class Setting(NamedTuple):
    #: dotted, as in the file: ``worker.resources.GPU``
    key: str
    #: as TOML writes it: ``2``, ``"100GB"``, ``true``; ``none`` for unset
    value: str
    #: ``default``, ``file PATH``, ``env NAME`` or ``flag``
    source: str


def describe(
    settings_cls: type[BaseSettings], section: str, flags: Mapping[str, Any] | None = None
) -> list[Setting]:
    """Each setting of ``settings_cls`` as it is read now (``flags`` as the
    command line's), with the source it came from; raises as reading them does."""
    given = dict(flags or {})
    settings = settings_cls(**given)
    origins = _origins(settings_cls, given)
    found = []
    for parts, value in _leaves(settings):
        source = "default"
        for label, keys in origins:
            covering = next(
                (parts[:i] for i in range(1, len(parts) + 1) if parts[:i] in keys), None
            )
            if covering is not None:
                source = f"env {_env_name(settings_cls, parts)}" if label == "env" else label
                break
        found.append(Setting(".".join((section, *parts)), value, source))
    return found


def _origins(
    settings_cls: type[BaseSettings], flags: dict[str, Any]
) -> list[tuple[str, set[tuple[str, ...]]]]:
    """The keys each source of ``settings_cls`` gives, highest first, run as
    pydantic-settings runs them (so resources a higher one gave are not the
    lower ones')."""
    sources = settings_cls.settings_customise_sources(
        settings_cls,
        init_settings=InitSettingsSource(settings_cls, init_kwargs=flags),
        env_settings=EnvSettingsSource(settings_cls),
        dotenv_settings=DotEnvSettingsSource(settings_cls),
        file_secret_settings=SecretsSettingsSource(settings_cls),
    )
    state: dict[str, Any] = {}
    origins = []
    for source in sources:
        source._set_current_state(state)
        data = source()
        state = {**data, **state}
        if isinstance(source, ConfigFileSource):
            label = f"file {source.path}"
        elif isinstance(source, InitSettingsSource):
            label = "flag"
        else:
            label = "env"
        origins.append((label, {parts for parts, _ in _flat(data)}))
    return origins


def _flat(
    data: Mapping[str, Any], parts: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in data.items():
        here = (*parts, str(key))
        if isinstance(value, Mapping) and value:
            yield from _flat(value, here)
        else:
            yield here, value


def _env_name(settings_cls: type[BaseSettings], parts: tuple[str, ...]) -> str:
    """The variable that gave ``parts``: its case as set, resource names exact."""
    prefix = str(settings_cls.model_config.get("env_prefix") or "")
    if parts[0] == "resources" and len(parts) > 1:
        head = f"{prefix}RESOURCES__".upper()
        for name in os.environ:
            if name.upper().startswith(head) and name[len(head) :] == parts[1]:
                return name
    for i in range(len(parts), 0, -1):  # a nested table may come as one JSON value
        wanted = (prefix + "__".join(parts[:i])).upper()
        for name in os.environ:
            if name.upper() == wanted:
                return name
    return (prefix + "__".join(parts)).upper()


def _leaves(model: BaseModel, parts: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    for name in type(model).model_fields:
        if name in DERIVED:
            continue
        value = getattr(model, name)
        here = (*parts, name)
        if name == "resources" and not parts:
            declared = as_declared(
                value, getattr(model, "resources_text", {}), getattr(model, "auto_resources", ())
            )
            if not declared:
                yield here, "{}"
            for resource, amount in sorted(declared.items()):
                yield (*here, resource), show_amount(amount)
        elif isinstance(value, BaseModel):
            yield from _leaves(value, here)
        else:
            yield here, show_value(value)


def as_declared(
    amounts: Mapping[str, float], written: Mapping[str, str], auto: Iterable[str]
) -> dict[str, float | str]:
    """A worker's resources as given: the text where it was text (``"100GB"``),
    ``"auto"`` for those found at start, else the number; what
    ``LocalCluster(resources=...)`` and ``--resources`` take."""
    declared: dict[str, float | str] = {
        name: written.get(name, amount) for name, amount in amounts.items()
    }
    declared.update({name: AUTO for name in auto})
    return declared


def show_value(value: Any) -> str:
    """A setting's value as TOML writes it (``none``: unset, which TOML cannot write)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    return str(value)


def show_amount(amount: float | str) -> str:
    """A resource amount: a number bare (``2``), text quoted (``"100GB"``, ``"auto"``)."""
    if isinstance(amount, str):
        try:
            float(amount)
        except ValueError:
            return json.dumps(amount)
        return amount
    short = f"{amount:g}"
    return short if float(short) == amount else repr(amount)
