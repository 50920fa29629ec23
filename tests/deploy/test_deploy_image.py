"""docker/Dockerfile, docker/constraints.txt and docker/entrypoint.sh without an engine: lint,
cross-checks with the rest of the repository, and the entrypoint's user errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _stack import (
    DOCKER,
    ENTRYPOINT,
    IMAGE_ENTRYPOINT,
    REPO,
    dockerfile_instructions,
    final_stage,
    resolved_compose,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

IMAGE_EXTRAS = ("ptb", "postgres", "s3")  # what the Dockerfile installs


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise AssertionError(f"{name} not found: pip install '.[test]' installs it")
    return found


def test_hadolint_clean() -> None:
    proc = subprocess.run([_tool("hadolint"), "--failure-threshold", "info",
                           str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the one waiver: apt package versions (the same RUN serves the Debian and the Ubuntu base)
    text = (DOCKER / "Dockerfile").read_text()
    assert [line.strip() for line in text.splitlines() if "hadolint ignore" in line] == [
        "# hadolint ignore=DL3008"]


def test_shellcheck_clean() -> None:
    proc = subprocess.run([_tool("shellcheck"), str(ENTRYPOINT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_cpu_and_cuda_bases_are_build_args() -> None:
    instructions = dockerfile_instructions()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for word, rest in instructions
            if word == "ARG" and "=" in rest}
    assert args["BASE_IMAGE"].startswith("python:3.11-slim")
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert instructions[0] == ("ARG", f"BASE_IMAGE={args['BASE_IMAGE']}")
    assert ("FROM", "${BASE_IMAGE} AS base") in instructions
    header = (DOCKER / "Dockerfile").read_text()
    assert "--build-arg BASE_IMAGE=nvidia/cuda:" in header and "/whl/cu" in header


def test_final_image_runs_as_numeric_non_root_user() -> None:
    users = [rest for word, rest in final_stage() if word == "USER"]
    assert users == ["1000:1000"]  # numeric: Kubernetes can check runAsNonRoot


def test_entrypoint_is_installed_where_compose_and_kuberay_call_it() -> None:
    stage = final_stage()
    copies = [rest.split() for word, rest in stage if word == "COPY"]
    assert ["docker/entrypoint.sh", IMAGE_ENTRYPOINT] in copies
    (entry,) = [json.loads(rest) for word, rest in stage if word == "ENTRYPOINT"]
    assert entry == ["/usr/bin/tini", "--", Path(IMAGE_ENTRYPOINT).name]
    assert os.access(ENTRYPOINT, os.X_OK)


def test_every_copied_path_exists() -> None:
    for word, rest in dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), source


def test_exposed_ports_match_compose() -> None:
    exposed = {int(p) for word, rest in final_stage() if word == "EXPOSE" for p in rest.split()}
    assert exposed == {6379, 8265, 5000}
    stack = resolved_compose()
    published = {int(str(p).split(":")[2].split("/")[0]) for name in ("ray-head", "mlflow")
                 for p in stack["services"][name]["ports"]}
    assert published <= exposed


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_image_extras_exist() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(IMAGE_EXTRAS) <= set(extras)
    assert "psycopg[binary]" in " ".join(extras["postgres"])  # SQLAlchemy's postgresql:// = v3
    install = [rest for word, rest in dockerfile_instructions() if "-c constraints.txt" in rest]
    assert install and f"'.[{','.join(IMAGE_EXTRAS)}]'" in install[0]


def test_constraints_pin_every_direct_dependency_within_its_range() -> None:
    project = _pyproject()["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in IMAGE_EXTRAS:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==" and not req.extras, line
            pins[canonicalize_name(req.name)] = spec.version
    for req in wanted:
        name = canonicalize_name(req.name)
        if name == "torch":  # installed first from the CPU/CUDA index, pinned by TORCH_VERSION
            assert 'TORCH_VERSION=2.13.0' in (DOCKER / "Dockerfile").read_text()
            continue
        assert name in pins, f"{req.name} is not pinned in docker/constraints.txt"
        assert req.specifier.contains(pins[name]), (str(req), pins[name])


def _entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KLSTUDY_")}
    clean["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), clean.get("PATH", "")])
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "env", "message"), [
    ((), {}, "no role given"),
    (("driver", "spec.yaml"), {}, "driver: KLSTUDY_STUDY_DIR is not set"),
    (("driver", "/nonexistent/spec.yaml"), {"KLSTUDY_STUDY_DIR": "/nonexistent/dir"},
     "driver: spec file not found, got '/nonexistent/spec.yaml'"),
    (("submit",), {"KLSTUDY_STUDY_DIR": "/nonexistent/dir"}, "submit: no spec given"),
    (("mlflow",), {}, "mlflow: KLSTUDY_MLFLOW_BACKEND_STORE_URI is not set"),
    (("mlflow",), {"KLSTUDY_MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db"},
     "mlflow: KLSTUDY_MLFLOW_ARTIFACTS_DESTINATION is not set"),
    (("health", "postgres"), {}, "health: unknown service (head, mlflow), got 'postgres'"),
])
def test_entrypoint_user_errors_are_one_line(args: tuple, env: dict, message: str) -> None:
    proc = _entrypoint(*args, **env)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: entrypoint.sh: {message}")
    assert proc.stderr.count("\n") == 1


def test_entrypoint_runs_any_other_command() -> None:
    proc = _entrypoint("klstudy", "--help")
    assert proc.returncode == 0 and "submit" in proc.stdout


def test_driver_with_finished_study_does_nothing(tmp_path: Path) -> None:
    (tmp_path / "study.json").write_text(json.dumps({"status": "finished"}))
    proc = _entrypoint("driver", "unused.yaml", KLSTUDY_STUDY_DIR=str(tmp_path))
    assert proc.returncode == 0 and "already finished" in proc.stdout
