"""The compose stack's services run natively on loopback, each through docker/entrypoint.sh.

A service's environment is what its container would have: the image's ENV (docker/Dockerfile),
then the service's `environment` from `docker-compose config`, with host names, ports and the
`/data` volume translated to loopback addresses and temporary directories (`Loopback`); only
listen addresses, ports and Ray's temp dirs are added. MinIO is replaced by moto's S3 server
(no MinIO binary here); PostgreSQL is a real server (tests/_postgres.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _postgres import PostgresServer
from _services import (
    HEAD_IP,
    NODE_PORT_OPTIONS,
    OBJECT_STORE_BYTES,
    WORKER_IP,
    _http_get,
    _popen,
    _Service,
    _tail,
    _wait_for,
    free_ports,
    service_env,
    stop_processes,
)
from _stack import ENTRYPOINT, IMAGE_ENTRYPOINT, REPO, final_stage

START_TIMEOUT_S = 120.0  # each service; Ray nodes take 17-32 s here under load
RAY_STOP_GRACE_S = 10.0


def image_env() -> dict[str, str]:
    """The ENV of the image's final stage (KEY=VALUE pairs; PATH is the venv's here)."""
    env = {}
    for word, rest in final_stage():
        if word == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def native_command(command: list[str]) -> list[str]:
    """A command run in a container (health check, RayJob entrypoint) with the image's
    entrypoint script replaced by docker/entrypoint.sh."""
    name = Path(IMAGE_ENTRYPOINT).name
    return [str(ENTRYPOINT) if part in (name, IMAGE_ENTRYPOINT) else part for part in command]


def service_command(command: list[str]) -> list[str]:
    """A klstudy service's compose `command` as the image runs it: after its ENTRYPOINT."""
    return [str(ENTRYPOINT), *command]


@dataclass
class Loopback:
    """Where each host name of the compose network / Kubernetes cluster lives natively."""

    hosts: dict[str, str] = field(default_factory=dict)  # "postgres:5432" -> "127.0.0.1:P"
    data_dir: Path | None = None  # the `/data` volume
    overrides: dict[str, str] = field(default_factory=dict)  # exact values (e.g. a password)

    def translate(self, value: str) -> str:
        if value in self.overrides:
            return self.overrides[value]
        for name in sorted(self.hosts, key=len, reverse=True):
            value = value.replace(name, self.hosts[name])
        if self.data_dir is not None and value.startswith("/data/"):
            value = str(self.data_dir) + value[len("/data"):]
        return value.replace("/opt/klstudy/examples/", f"{REPO}/examples/")

    def env(self, environment: dict[str, Any], **loopback: str) -> dict[str, str]:
        """service_env() + the image's ENV + `environment` translated + `loopback`."""
        env = service_env(**{k: v for k, v in image_env().items() if k != "PATH"})
        env.update({k: self.translate(str(v)) for k, v in environment.items()})
        env.update(loopback)
        return env


def alive_nodes(dashboard_url: str) -> list[dict]:
    status, body = _http_get(f"{dashboard_url}/api/v0/nodes?limit=100")
    if status != 200:
        return []
    try:
        nodes = json.loads(body)["data"]["result"]["result"]
    except (ValueError, KeyError, TypeError):
        return []
    return [n for n in nodes if n.get("state") == "ALIVE"]


class NativeStack(_Service):
    """S3 (moto), MLflow on PostgreSQL, a Ray head and a worker: compose's commands, natively.

    Args:
        tmp_dir: logs and the `/data` volume of the compose stack (`tmp_dir/data`).
        compose: `docker-compose config` output made with the test's .env (credentials of pg).
        pg: the PostgreSQL server (the compose `postgres` service, init script already run).
    """

    def __init__(self, tmp_dir: Path, compose: dict[str, Any], pg: PostgresServer) -> None:
        super().__init__()
        self.tmp_dir, self.compose, self.pg = tmp_dir, compose, pg
        ports = free_ports(5 + 2 * len(NODE_PORT_OPTIONS))
        self.s3_port, self.mlflow_port, self.gcs_port, self.dashboard_port, client = ports[:5]
        self._node_ports = ports[5:]
        self.s3_url = f"http://127.0.0.1:{self.s3_port}"
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.gcs_address = f"{HEAD_IP}:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self._client_port = client
        self.ray_root = Path(tempfile.mkdtemp(prefix="kd-", dir="/tmp"))  # short socket paths
        self._ray_procs: list = []
        self.loopback = Loopback(
            hosts={"postgres:5432": f"127.0.0.1:{pg.port}", "http://minio:9000": self.s3_url,
                   "http://mlflow:5000": self.mlflow_uri, "ray-head:6379": self.gcs_address,
                   "http://ray-head:8265": self.dashboard_url},
            data_dir=tmp_dir / "data",
        )

    def service(self, name: str) -> dict[str, Any]:
        return self.compose["services"][name]

    def env(self, name: str, **loopback: str) -> dict[str, str]:
        return self.loopback.env(self.service(name).get("environment", {}), **loopback)

    def _launch(self, name: str, env: dict[str, str], *extra: str) -> Any:
        cmd = service_command(list(self.service(name)["command"])) + list(extra)
        return _popen(cmd, env, self.tmp_dir / f"{name}.log", cwd=self.tmp_dir)

    def _ray_ports(self, *, head: bool) -> list[str]:
        args = [f"--{option}={self._node_ports.pop()}" for option in NODE_PORT_OPTIONS]
        return args + [f"--ray-client-server-port={self._client_port}"] if head else args

    def _node_env(self, name: str, ip: str) -> dict[str, str]:
        return self.env(name, KLSTUDY_NODE_IP=ip, KLSTUDY_NUM_CPUS="1",
                        KLSTUDY_OBJECT_STORE_BYTES=str(OBJECT_STORE_BYTES),
                        KLSTUDY_RAY_TEMP_DIR=str(self.ray_root / name))

    def head_env(self) -> dict[str, str]:
        return {**self._node_env("ray-head", HEAD_IP), "KLSTUDY_BIND_HOST": "127.0.0.1",
                "KLSTUDY_RAY_PORT": str(self.gcs_port),
                "KLSTUDY_DASHBOARD_PORT": str(self.dashboard_port)}

    def mlflow_env(self) -> dict[str, str]:
        return self.env("mlflow", KLSTUDY_BIND_HOST="127.0.0.1",
                        KLSTUDY_MLFLOW_PORT=str(self.mlflow_port))

    def start(self) -> NativeStack:
        (self.tmp_dir / "data").mkdir(parents=True, exist_ok=True)
        moto = str(Path(sys.executable).parent / "moto_server")
        self._procs.append(_popen([moto, "-H", "127.0.0.1", "-p", str(self.s3_port)],
                                  service_env(), self.tmp_dir / "s3.log", cwd=self.tmp_dir))
        self._ray_procs.append(self._launch("ray-head", self.head_env(),
                                            *self._ray_ports(head=True)))
        _wait_for(lambda: _http_get(self.s3_url)[0] == 200, timeout_s=START_TIMEOUT_S,
                  what="S3 (moto)", procs=self._procs, logs=lambda: _tail(self.tmp_dir / "s3.log"))
        self.create_bucket()
        self._procs.append(self._launch("mlflow", self.mlflow_env()))
        _wait_for(lambda: len(alive_nodes(self.dashboard_url)) >= 1, timeout_s=START_TIMEOUT_S,
                  what="Ray head (entrypoint.sh head)", procs=self._ray_procs, logs=self.logs)
        self._ray_procs.append(self._launch("ray-worker", self._node_env("ray-worker", WORKER_IP),
                                            *self._ray_ports(head=False)))
        _wait_for(lambda: len(alive_nodes(self.dashboard_url)) >= 2, timeout_s=START_TIMEOUT_S,
                  what="Ray worker (entrypoint.sh worker)", procs=self._ray_procs, logs=self.logs)
        _wait_for(lambda: _http_get(f"{self.mlflow_uri}/health")[0] == 200,
                  timeout_s=START_TIMEOUT_S, what="MLflow (entrypoint.sh mlflow)",
                  procs=self._procs, logs=self.logs)
        return self

    def s3_client(self) -> Any:
        import boto3

        env = self.mlflow_env()
        return boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1",
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self) -> None:
        """What the minio-init service does (`mc mb`), through the S3 API."""
        self.s3_client().create_bucket(Bucket=self.bucket)

    @property
    def bucket(self) -> str:
        return self.service("minio-init")["environment"]["MINIO_BUCKET"]

    def logs(self) -> str:
        names = ("ray-head.log", "ray-worker.log", "mlflow.log", "s3.log")
        paths = [self.tmp_dir / n for n in names]
        paths += sorted(self.ray_root.glob("*/session_latest/logs/raylet.out"))
        return "\n".join(_tail(p, 1500) for p in paths if p.exists())

    def stop(self) -> None:
        if self._ray_procs:
            stop_processes(self._ray_procs, marker=f"{self.ray_root}/", whole_group=False,
                           grace_s=RAY_STOP_GRACE_S)
            self._ray_procs.clear()
        stop_processes(self._procs)
        self._procs.clear()
        for logs in self.ray_root.glob("*/session_latest/logs"):  # kept for a failed run
            shutil.copytree(logs, self.tmp_dir / f"ray-{logs.parent.parent.name}-logs",
                            dirs_exist_ok=True, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("*.sock", "sockets"))
        shutil.rmtree(self.ray_root, ignore_errors=True)


def write_env_file(path: Path, pg: PostgresServer) -> Path:
    """A compose .env with the test's credentials (the keys of docker/.env.example)."""
    values = {"POSTGRES_USER": pg.user, "POSTGRES_PASSWORD": pg.password,
              "MINIO_ROOT_USER": "deploy-test", "MINIO_ROOT_PASSWORD": "deploy-test-secret",
              "MINIO_BUCKET": "mlflow"}
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path

