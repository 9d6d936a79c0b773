"""Settings for the scheduler and workers, from flags and the environment.

``APPORTION_SCHEDULER__PORT=9000`` and ``APPORTION_WORKER__NTHREADS=4`` work as
usual. Resource names keep their case: ``APPORTION_WORKER__RESOURCES__GPU=2``
declares ``GPU``, not ``gpu`` (pydantic-settings would lower-case it, hence the
source below). Command-line flags win over the environment, and the
environment over the configuration file (``[scheduler]`` and ``[worker]``
tables, :mod:`apportion_common.config_file`); resources from a higher source
replace a lower one's as a whole.

``GPU=auto`` and ``GPU_MEMORY=auto`` are kept apart (``auto_resources``) and
``nworkers`` may be ``"gpu"``: what they stand for is found by the command
that starts the worker (``apportion_common.gpus``), never while validating.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .config_file import ConfigFileSource
from .logring import DEFAULT_LOG_LINES
from .process_memory import check_memory_limit
from .resources import auto_names, check_resources, spellings
from .security import check_token

WORKER_ENV_PREFIX = "APPORTION_WORKER__"
RESOURCES_ENV_PREFIX = WORKER_ENV_PREFIX + "RESOURCES__"
MAX_NWORKERS = 1_000


class _ResourcesFromEnv(PydanticBaseSettingsSource):
    """``APPORTION_WORKER__RESOURCES__<NAME>=<amount>``, name case kept."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        # Given explicitly (the --resources flag, an init argument, which
        # pydantic-settings >= 2.3 shows here as current_state): it wins as a
        # whole, and a bad environment value it overrides is not an error.
        if "resources" in getattr(self, "current_state", {}):
            return {}
        found = {
            name[len(RESOURCES_ENV_PREFIX) :]: value
            for name, value in os.environ.items()
            if name.upper().startswith(RESOURCES_ENV_PREFIX)
            and len(name) > len(RESOURCES_ENV_PREFIX)
        }
        return {"resources": found} if found else {}


class _EnvWithoutResources(EnvSettingsSource):
    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        data.pop("resources", None)
        # Derived from resources, never set apart.
        data.pop("resources_text", None)
        data.pop("auto_resources", None)
        return data


class SchedulerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APPORTION_SCHEDULER__", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8786, ge=0, le=65535)
    #: Seconds a task may wait for capacity a worker has in total before that
    #: worker is reserved for it (no starvation).
    starvation_after: float = Field(2.0, ge=0, allow_inf_nan=False)
    #: "spread" (least busy fitting worker first) or "pack" (busiest first).
    placement: Literal["spread", "pack"] = "spread"
    #: Deaths of workers running a task before it errs with KilledWorker.
    allowed_failures: int = Field(3, ge=0, le=1000)
    #: Seconds a task no worker could ever hold waits before NoValidWorkerError.
    no_worker_timeout: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: Seconds a worker may send nothing (it heartbeats several times in that
    #: span) before it is declared lost and its tasks are placed elsewhere.
    worker_ttl: float = Field(5.0, gt=0, allow_inf_nan=False)
    #: Seconds a client whose stream broke may take to reconnect before the
    #: tasks only it wanted are cancelled and their resources freed.
    client_grace: float = Field(10.0, ge=0, allow_inf_nan=False)
    #: Where the journal of accepted tasks lives (None: in memory only).
    state_dir: Path | None = None
    #: After a restart from the journal: seconds to let workers re-register and
    #: offer the results they hold before anything is computed again.
    recovery_grace: float = Field(3.0, ge=0, allow_inf_nan=False)
    #: Assigned tasks each worker may hold queued, holding nothing yet, to
    #: start the moment a running one ends (None: two per thread; 0: none).
    worker_queue: int | None = Field(None, ge=0, le=10_000)
    #: Check the scheduler's books after every event (for tests; costs time).
    check_invariants: bool = False
    #: Where the web dashboard, /metrics, /api/v1/state and /health listen
    #: (HOST:PORT); a taken port: a free one instead, named in the log.
    dashboard_address: str = "127.0.0.1:8787"
    #: Serve them at all (--no-dashboard: false).
    dashboard: bool = True

    @field_validator("dashboard_address")
    @classmethod
    def _check_dashboard_address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{value!r}: expected HOST:PORT (port 0-65535; 0 picks one)")
        return value

    #: Log lines the scheduler keeps for client.get_scheduler_logs() and
    #: ``apportion logs`` (the newest; 0: none).
    log_lines: int = Field(DEFAULT_LOG_LINES, ge=0, le=10_000_000)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, ConfigFileSource(settings_cls, "scheduler"))


class MemorySettings(BaseModel):
    """Fractions of a worker process's memory limit, as Dask's
    ``distributed.worker.memory.*`` (``APPORTION_WORKER__MEMORY__PAUSE=0.9``;
    ``false`` turns one off)."""

    #: results held above this (their bytes) go to disk, least recently used first
    target: float | None = 0.6
    #: the process's memory (RSS) above this: results go to disk until below target
    spill: float | None = 0.7
    #: the process's memory above this: no new task starts, none is placed here
    pause: float | None = 0.8
    #: the process's memory above this: its nanny kills it and starts a fresh one
    terminate: float | None = 0.95

    @field_validator("target", "spill", "pause", "terminate", mode="before")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        if value is None or value is False:
            return None
        if isinstance(value, str) and value.strip().lower() in ("false", "off", "none", ""):
            return None
        return value

    @field_validator("target", "spill", "pause", "terminate")
    @classmethod
    def _between(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"expected a fraction above 0 and at most 1 (or false), not {value}")
        return value


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=WORKER_ENV_PREFIX, env_nested_delimiter="__", extra="ignore"
    )

    resources: dict[str, float] = Field(default_factory=dict)
    #: each resource's amount as written (``{"MEMORY": "100GB"}``), for
    #: ``apportion status`` to show it back; none for an amount given as a number
    resources_text: dict[str, str] = Field(default_factory=dict)
    #: the names of ``resources`` given as ``auto`` (GPU, GPU_MEMORY), left
    #: out of ``resources`` until the devices are found
    auto_resources: frozenset[str] = Field(default_factory=frozenset)
    #: None: the cores divided by nworkers (as Dask does)
    nthreads: int | None = Field(None, ge=1, le=10_000)
    #: "gpu": one process per GPU this process may use (and GPU=auto)
    nworkers: int | Literal["gpu"] = 1
    name: str | None = None
    host: str | None = None
    #: Check the worker's books after every stimulus and exit with status 70
    #: on a fault (for tests; costs time).
    check_invariants: bool = False
    #: Seconds without a scheduler (at start, or after losing it) before the
    #: worker exits with a non-zero status (None: keep trying forever).
    death_timeout: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: Seconds SIGTERM lets the worker drain (its tasks finish, its wanted
    #: results move to other workers) before it stops anyway; 0: stop at once.
    drain_timeout: float = Field(30.0, ge=0, allow_inf_nan=False)
    #: Hand large results to and from worker processes on the same host
    #: through shared memory (/dev/shm); false: always over gRPC.
    shared_memory: bool = True
    #: Run each task that holds a GPU in a child process that sees only its
    #: own devices (CUDA_VISIBLE_DEVICES), with GPU=auto.
    isolate_gpu_tasks: bool = False
    #: Log lines each worker process keeps, its tasks' own included, for
    #: client.get_worker_logs() and ``apportion logs`` (the newest; 0: none).
    log_lines: int = Field(DEFAULT_LOG_LINES, ge=0, le=10_000_000)
    #: Bytes of memory each worker process may use (not the MEMORY resource):
    #: "auto" (the machine's or the cgroup's, divided by nworkers), or 0: none.
    memory_limit: int | str = "auto"
    #: The fractions of memory_limit at which it spills, pauses, is restarted.
    memory: MemorySettings = Field(default_factory=MemorySettings)
    #: Where each worker process makes a directory of its own for spilled
    #: results (None: the system's temp directory); removed when it exits.
    local_directory: Path | None = None

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _check_memory_limit(cls, value: Any) -> int | str:
        return check_memory_limit(value)

    @model_validator(mode="before")
    @classmethod
    def _keep_spellings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given: Any = data.get("resources")
            auto = auto_names(given)
            if auto:  # amounts only once the devices are found; CPU=auto stays, to be refused
                kept = {k: v for k, v in given.items() if k not in auto}
                data = {**data, "resources": kept}
            data = {
                **data,
                "resources_text": spellings(data.get("resources")),
                "auto_resources": auto,
            }
        return data

    @field_validator("nworkers", mode="before")
    @classmethod
    def _gpu_or_count(cls, value: Any) -> Any:
        # Checked here, not by Field(ge=...): a union's errors would name its member.
        if isinstance(value, str):
            if value.strip().lower() == "gpu":
                return "gpu"
            try:
                value = int(value.strip())
            except ValueError:
                message = f"expected a number of processes or 'gpu', not {value!r}"
                raise ValueError(message) from None
        if isinstance(value, int) and not 1 <= value <= MAX_NWORKERS:
            raise ValueError(f"expected 1 to {MAX_NWORKERS} processes (or 'gpu'), not {value}")
        return value

    @field_validator("resources", mode="before")
    @classmethod
    def _check(cls, value: Any) -> dict[str, float]:
        return check_resources(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _ResourcesFromEnv(settings_cls),
            _EnvWithoutResources(settings_cls, env_nested_delimiter="__"),
            ConfigFileSource(settings_cls, "worker"),
        )


class SecuritySettings(BaseSettings):
    """Tokens and TLS, for every command: ``APPORTION_TOKEN``, ``APPORTION_WORKER_TOKEN``,
    ``APPORTION_CLIENT_TOKEN``, ``APPORTION_TLS_CA``, ``APPORTION_TLS_CERT``,
    ``APPORTION_TLS_KEY``. An empty variable counts as unset.

    ``worker_token`` and ``client_token`` replace ``token`` for that role (on
    the scheduler: what it demands; on a worker or a client: what it sends).
    """

    model_config = SettingsConfigDict(env_prefix="APPORTION_", extra="ignore")

    # repr=False: a settings object in a log line or traceback shows no secret.
    token: str | None = Field(default=None, repr=False)
    worker_token: str | None = Field(default=None, repr=False)
    client_token: str | None = Field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @field_validator("token", "worker_token", "client_token", mode="before")
    @classmethod
    def _check_token(cls, value: Any) -> str | None:
        if value is None or value == "":
            return None
        return check_token(str(value))

    @field_validator("tls_ca", "tls_cert", "tls_key", mode="before")
    @classmethod
    def _empty_path(cls, value: Any) -> Any:
        return None if value == "" else value

    @property
    def worker_role_token(self) -> str | None:
        return self.worker_token or self.token

    @property
    def client_role_token(self) -> str | None:
        return self.client_token or self.token
