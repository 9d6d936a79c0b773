"""The deployment files (deploy/): every Kubernetes manifest valid against the
Kubernetes schemas (offline, kubernetes-validate), and every flag and
APPORTION_* variable they and the Slurm script use one the CLI accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer.main
import yaml

from apportion.cli.app import app
from apportion_common.settings import SchedulerSettings, SecuritySettings, WorkerSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
#: The oldest Kubernetes with gRPC probes on by default (1.24 beta, 1.27 GA).
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(file, pod spec, container) of every container the manifests run."""
    found = []
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == "Deployment":
                pod = doc["spec"]["template"]["spec"]
                found += [(path.name, pod, c) for c in pod["containers"]]
    return found


def accepted_flags(command: str) -> set[str]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return {opt for p in group.commands[command].params for opt in p.opts}


def check_variable(name: str) -> None:
    """``name`` is an APPORTION_* variable some command reads."""
    if name.startswith("APPORTION_WORKER__RESOURCES__"):
        assert name.removeprefix("APPORTION_WORKER__RESOURCES__"), name
        return
    for prefix, settings in (
        ("APPORTION_WORKER__", WorkerSettings),
        ("APPORTION_SCHEDULER__", SchedulerSettings),
    ):
        if name.startswith(prefix):
            field = name.removeprefix(prefix).lower()
            assert field in settings.model_fields, f"{name}: {settings.__name__} has no {field}"
            return
    field = name.removeprefix("APPORTION_").lower()
    assert field in SecuritySettings.model_fields or field == "log_level", name


def test_there_are_manifests_for_a_scheduler_and_cpu_and_gpu_workers() -> None:
    assert {p.name for p in MANIFESTS} >= {"scheduler.yaml", "workers.yaml", "workers-gpu.yaml"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("where", containers(), ids=lambda w: f"{w[0]}:{w[2]['name']}")
def test_containers_use_flags_and_variables_the_cli_accepts(
    where: tuple[str, dict[str, Any], dict[str, Any]],
) -> None:
    _, pod, container = where
    command, *args = container["args"]
    flags = {a for a in args if a.startswith("--")}
    assert flags <= accepted_flags(command), flags - accepted_flags(command)
    for variable in container.get("env", []):
        if variable["name"].startswith("APPORTION_"):
            check_variable(variable["name"])
    if command == "worker":
        drain = float(args[args.index("--drain-timeout") + 1])
        assert pod["terminationGracePeriodSeconds"] > drain  # a scale-down drains
    if command == "scheduler":
        port = int(args[args.index("--port") + 1])
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port  # grpc.health.v1


def test_the_gpu_workers_ask_the_device_plugin_for_what_they_declare() -> None:
    (gpu,) = [c for f, _, c in containers() if f == "workers-gpu.yaml"]
    env = {v["name"]: v.get("value") for v in gpu["env"]}
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == int(
        env["APPORTION_WORKER__RESOURCES__GPU"]
    )


def test_every_deployment_takes_the_token_from_a_secret() -> None:
    for _, _, container in containers():
        (token,) = [v for v in container["env"] if v["name"] == "APPORTION_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"]["name"] == "apportion-token"


def test_the_slurm_script_parses_and_uses_flags_the_cli_accepts() -> None:
    script = DEPLOY / "slurm" / "apportion-workers.sbatch"
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run([bash, "-n", str(script)], check=True, timeout=10)
    text = script.read_text()
    worker_call = text[text.index("exec apportion worker") :]
    flags = set(re.findall(r"(--[a-z][a-z-]*)", worker_call))
    assert flags and flags <= accepted_flags("worker"), flags - accepted_flags("worker")
    assert "--gres=gpu" in text and "GPU=" in worker_call
