"""The deployment files as data: docker/compose.yaml resolved by `docker-compose config`, the
KubeRay manifests, the Dockerfile and what docker/entrypoint.sh understands.

Debian's docker-compose 1.29 resolves and validates a compose file without any engine
(FIELD-NOTES), which is all these tests need from it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
KUBERAY = DOCKER / "kuberay"
IMAGE_ENTRYPOINT = "/usr/local/bin/klstudy-entrypoint"  # where the Dockerfile installs the script
KLSTUDY_SERVICES = ("ray-head", "ray-worker", "ray-worker-gpu", "mlflow", "submit")
STANDARD_ENV = {  # read by the tools themselves, not by entrypoint.sh
    "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "RAY_ADDRESS", "PGPASSWORD",
    "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
}


def docker_compose() -> str:
    """Path of the docker-compose binary; fails the test when it is missing."""
    found = shutil.which("docker-compose")
    if found is None:
        raise AssertionError("docker-compose not found: install Debian's `docker-compose` "
                             "(bash .ci/run does)")
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments and blank lines skipped)."""
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def run_compose_config(env_file: Path) -> subprocess.CompletedProcess:
    """`docker-compose -f docker/compose.yaml --env-file ENV config` in a clean environment."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    return subprocess.run(
        [docker_compose(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config"],
        cwd=DOCKER, env=env, capture_output=True, text=True, timeout=120,
    )


def resolved_compose(env_file: Path = ENV_EXAMPLE) -> dict[str, Any]:
    """The compose stack as docker-compose resolves it with `env_file`."""
    proc = run_compose_config(env_file)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def container_command(value: str | list[str]) -> str:
    """A compose command as the container sees it (`$$` is compose's escape for `$`)."""
    text = value if isinstance(value, str) else " ".join(value)
    return text.replace("$$", "$")


def entrypoint_roles() -> set[str]:
    """The roles of entrypoint.sh's final `case` (head, worker, ...)."""
    text = ENTRYPOINT.read_text()
    block = text[text.rindex("case $role in"):]
    return set(re.findall(r"^\s+([a-z]+)\) run_", block, flags=re.M))


def entrypoint_env_names() -> set[str]:
    """Every KLSTUDY_* variable the script reads."""
    return set(re.findall(r"\$\{?(KLSTUDY_[A-Z_]+)", ENTRYPOINT.read_text()))


def entrypoint_default(name: str) -> str:
    """The default of `${NAME:-default}` in entrypoint.sh (one default per variable)."""
    found = set(re.findall(r"\$\{" + name + r":-([^}]*)\}", ENTRYPOINT.read_text()))
    assert len(found) == 1, (name, found)
    return found.pop()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined."""
    lines, current = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def final_stage() -> list[tuple[str, str]]:
    """The instructions after the last FROM."""
    instructions = dockerfile_instructions()
    last = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last:]


def kuberay_docs() -> dict[str, list[dict[str, Any]]]:
    """Every YAML document of docker/kuberay/, by file name."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(KUBERAY.glob("*.yaml"))}


def kuberay_object(kind: str) -> dict[str, Any]:
    """The one object of `kind` in docker/kuberay/."""
    found = [d for docs in kuberay_docs().values() for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def rayjob_containers() -> tuple[dict[str, Any], dict[str, Any]]:
    """(head pod spec, GPU worker pod spec) of the RayJob."""
    cluster = kuberay_object("RayJob")["spec"]["rayClusterSpec"]
    (worker,) = cluster["workerGroupSpecs"]
    return cluster["headGroupSpec"]["template"]["spec"], worker["template"]["spec"]


def pod_env(pod: dict[str, Any], secret: dict[str, str] | None = None) -> dict[str, str]:
    """The first container's environment; secretKeyRef values taken from `secret`."""
    env = {}
    for item in pod["containers"][0].get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif secret is not None:
            env[item["name"]] = secret[item["valueFrom"]["secretKeyRef"]["key"]]
    return env
