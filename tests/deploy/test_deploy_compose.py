"""docker/compose.yaml: valid for Debian's docker-compose, and the stack the issue asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from _stack import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    KLSTUDY_SERVICES,
    REPO,
    STANDARD_ENV,
    entrypoint_env_names,
    entrypoint_roles,
    final_stage,
    read_env_file,
    resolved_compose,
    run_compose_config,
)

SERVICES = {"ray-head", "ray-worker", "ray-worker-gpu", "mlflow", "postgres", "minio",
            "minio-init", "submit"}
REQUIRED_ENV = ("POSTGRES_USER", "POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")


@pytest.fixture(scope="module")
def stack() -> dict:
    return resolved_compose()


def test_config_resolves_every_service_with_env_example(stack: dict) -> None:
    assert set(stack["services"]) == SERVICES
    assert "version" not in yaml.safe_load(COMPOSE_FILE.read_text())  # compose spec, no version


@pytest.mark.parametrize("missing", REQUIRED_ENV)
def test_config_fails_without_each_credential(tmp_path: Path, missing: str) -> None:
    env = read_env_file(ENV_EXAMPLE)
    del env[missing]
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    proc = run_compose_config(env_file)
    assert proc.returncode != 0
    assert f"set {missing} in docker/.env" in proc.stderr


def test_credentials_come_only_from_the_env_file(stack: dict) -> None:
    text = COMPOSE_FILE.read_text()
    example = read_env_file(ENV_EXAMPLE)
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert example[key] not in text, key
    env = stack["services"]["mlflow"]["environment"]
    assert env["PGPASSWORD"] == example["POSTGRES_PASSWORD"]
    assert env["AWS_SECRET_ACCESS_KEY"] == example["MINIO_ROOT_PASSWORD"]
    # no password inside any URL: libpq reads PGPASSWORD
    assert env["KLSTUDY_MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql://{example['POSTGRES_USER']}@postgres:5432/mlflow")


def test_published_ports_are_loopback_only(stack: dict) -> None:
    published = [(name, port) for name, service in stack["services"].items()
                 for port in service.get("ports", [])]
    assert {name for name, _ in published} == {"ray-head", "mlflow", "postgres", "minio"}
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), (name, port)
    head_ports = [str(p) for p in stack["services"]["ray-head"]["ports"]]
    assert head_ports == ["127.0.0.1:8265:8265/tcp"]


@pytest.mark.parametrize("name", ["ray-head", "mlflow", "postgres", "minio"])
def test_health_checks(stack: dict, name: str) -> None:
    check = stack["services"][name]["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) >= 2
    assert check["retries"] >= 3


def test_dependents_wait_for_health(stack: dict) -> None:
    services = stack["services"]
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert set(services["submit"]["depends_on"]) == {"ray-head", "mlflow"}


def test_named_volumes_and_shared_study_storage(stack: dict) -> None:
    declared = set(stack["volumes"])
    assert declared == {"studies", "postgres-data", "minio-data"}
    for name, service in stack["services"].items():
        for mount in service.get("volumes", []):
            source = str(mount).split(":", 1)[0]
            assert source in declared or Path(source).is_file(), (name, mount)
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):  # every Ray node sees /data
        assert "studies:/data:rw" in stack["services"][name]["volumes"], name
    study_dir = stack["services"]["submit"]["environment"]["KLSTUDY_STUDY_DIR"]
    assert study_dir.startswith("/data/")


def test_klstudy_services_share_one_image(stack: dict) -> None:
    services = stack["services"]
    cpu = {services[name]["image"] for name in KLSTUDY_SERVICES if name != "ray-worker-gpu"}
    assert cpu == {"klstudy:0.1.0"}
    assert services["ray-worker-gpu"]["image"] == "klstudy:0.1.0-cuda"
    for name in KLSTUDY_SERVICES:  # built here, never pulled
        build = services[name]["build"]
        assert build["dockerfile"] == "docker/Dockerfile"
        assert (Path(build["context"]) / "docker/Dockerfile").is_file()
    args = services["ray-worker-gpu"]["build"]["args"]
    header = (Path(services["ray-head"]["build"]["context"]) / "docker/Dockerfile").read_text()
    for key, value in args.items():  # the CUDA build the Dockerfile documents
        assert f"--build-arg {key}={value}" in header
    assert "args" not in services["ray-head"]["build"]


def test_gpu_worker_reserves_a_gpu_in_a_profile(stack: dict) -> None:
    gpu = stack["services"]["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert str(device["count"]) == gpu["environment"]["KLSTUDY_NUM_GPUS"]
    assert "profiles" not in stack["services"]["ray-worker"]


def test_commands_are_entrypoint_roles(stack: dict) -> None:
    roles = entrypoint_roles()
    assert roles == {"head", "worker", "mlflow", "driver", "submit", "health"}
    for name in KLSTUDY_SERVICES:
        service = stack["services"][name]
        assert service["command"][0] in roles, name
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][1:3] == ["klstudy-entrypoint", "health"]


def test_every_variable_is_read_by_someone(stack: dict) -> None:
    read = entrypoint_env_names() | STANDARD_ENV
    for name in KLSTUDY_SERVICES:
        unknown = set(stack["services"][name]["environment"]) - read
        assert not unknown, (name, unknown)


def test_submit_spec_is_in_the_image(stack: dict) -> None:
    (spec,) = [a for a in stack["services"]["submit"]["command"] if a.endswith(".yaml")]
    copies = [rest.split() for word, rest in final_stage() if word == "COPY"]
    assert ["examples", "/opt/klstudy/examples"] in copies
    assert (REPO / "examples" / Path(spec).relative_to("/opt/klstudy/examples")).is_file()
