"""Real services on loopback for integration tests: a 2-node Ray cluster and an MLflow server.

Every process is started in its own process group and stopped by PID: never `ray stop`, never a
kill by process name, so services of other sessions on the same machine are left alone.
See FIELD-NOTES (Ray loopback recipe): the head listens on 127.0.0.2 because Ray rewrites
127.0.0.1 to the external address, which a second node then cannot join.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

logger = logging.getLogger(__name__)

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"  # a second loopback address, so the two nodes are told apart by IP
OBJECT_STORE_BYTES = 500_000_000  # default would reserve ~30% of RAM per node
RAY_START_TIMEOUT_S = 90.0  # per node; 17-32 s for both here, under load
MLFLOW_START_TIMEOUT_S = 90.0  # healthy in 6-25 s here (schema creation), slower under load
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL whatever is still alive after this
RAY_STOP_GRACE_S = 10.0  # a node drains on SIGTERM; ~5 s when idle
LOG_TAIL_CHARS = 3000
NODE_PORT_OPTIONS = (  # `ray start` options of the ports each node listens on
    "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
)


# embedded Ray in a test process (conftest ``ray_local``)
LOCAL_RAY = {"num_cpus": 2, "include_dashboard": False, "logging_level": "WARNING",
             "log_to_driver": False}


def restart_local_ray() -> None:
    """Embedded Ray in this process again, after a test connected it elsewhere."""
    import ray

    ray.shutdown()
    ray.init(**LOCAL_RAY)


class ServiceError(RuntimeError):
    """A service did not come up in time; the message carries the tail of its logs."""


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free on 127.0.0.1 right now (the OS picks them)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in socks:  # all bound at once, so the OS cannot hand out one port twice
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    return free_ports(1)[0]


def service_env(**extra: str) -> dict[str, str]:
    """The environment for every service process and client: venv first on PATH, no auth."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _tail(path: Path, n_chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return f"--- {path} ---\n{text[-n_chars:]}"


def _popen(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline) for every process we can read."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry)] = (ppid, cmdline)
    return table


def _related_pids(roots: Iterable[int], marker: str | None) -> set[int]:
    """The roots, all their descendants, and every process whose cmdline contains marker."""
    table = _proc_table()
    found = {pid for pid in roots if pid in table}
    if marker:
        found |= {pid for pid, (_, cmd) in table.items() if marker in cmd}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    found.discard(os.getpid())
    return found


def _signal_all(pids: Iterable[int], groups: Iterable[int], sig: signal.Signals) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_processes(procs: list[subprocess.Popen], *, marker: str | None = None,
                   whole_group: bool = True, grace_s: float = STOP_GRACE_S) -> None:
    """Stop procs and everything they started, by PID.

    SIGTERM goes to each process (whole_group=False: `ray start --block` then drains its node
    and stops its own children) or to its whole process group; whatever is still alive after
    grace_s — descendants, and processes whose cmdline contains marker (Ray daemons may be
    reparented) — gets SIGKILL.
    """
    groups = [p.pid for p in procs]
    pids = _related_pids(groups, marker)
    if whole_group:
        _signal_all([], groups, signal.SIGTERM)
    else:
        _signal_all([p.pid for p in procs if p.poll() is None], [], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pids | _related_pids([], marker)) and time.monotonic() < deadline:
        for p in procs:
            p.poll()  # reap our direct children so that they do not linger as zombies
        time.sleep(0.2)
    survivors = _alive(_related_pids(_alive(pids), marker))
    if survivors:
        logger.warning("SIGKILL to %d processes still alive %.0f s after SIGTERM: %s",
                       len(survivors), grace_s, sorted(survivors))
    _signal_all(survivors, groups, signal.SIGKILL)
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("process %d did not exit after SIGKILL", p.pid)


def _alive(pids: Iterable[int]) -> set[int]:
    """The pids that exist and are not zombies."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _wait_for(check: Callable[[], bool], *, timeout_s: float, what: str,
              procs: list[subprocess.Popen], logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise ServiceError(f"{what}: process {dead[0].args[:3]} exited with "
                               f"{dead[0].returncode}\n{logs()}")
        if check():
            return
        time.sleep(0.5)
    raise ServiceError(f"{what}: not ready after {timeout_s:.0f} s\n{logs()}")


def _http_get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, b""
    except (OSError, ValueError):
        return 0, b""


_S = TypeVar("_S", bound="_Service")


class _Service:
    """Context-manager plumbing shared by the services."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def start(self: _S) -> _S:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class RayCluster(_Service):
    """A head node and one worker node on loopback, each with its own Ray temp dir.

    Args:
        tmp_dir: where the `ray start` output and, after stop, the Ray session logs are kept.
        head_cpus, worker_cpus: `--num-cpus` of each node.
        head_resources, worker_resources: custom resources (`--resources`) of each node.
        worker_wrap: a command prefix for the worker node's `ray start` (e.g. an `unshare` that
            gives it a private mount namespace).
    """

    def __init__(self, tmp_dir: str | os.PathLike[str], *, head_cpus: int = 1,
                 worker_cpus: int = 1, head_resources: dict[str, float] | None = None,
                 worker_resources: dict[str, float] | None = None,
                 worker_wrap: list[str] | None = None) -> None:
        super().__init__()
        self.worker_wrap = list(worker_wrap or [])
        self.tmp_dir = Path(tmp_dir)
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.head_resources, self.worker_resources = head_resources, worker_resources
        self.ray_root: Path | None = None  # made by start(), removed by stop()
        # Explicit, distinct ports for everything a node listens on, so that clusters of
        # concurrent test sessions on this machine never collide.
        self._ports = free_ports(2 + 2 * len(NODE_PORT_OPTIONS) + 1)
        self.gcs_port, self.dashboard_port = self._ports.pop(), self._ports.pop()
        self.gcs_address = f"{HEAD_IP}:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = service_env()

    def _node_cmd(self, name: str, cpus: int, resources: dict[str, float] | None) -> list[str]:
        assert self.ray_root is not None
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
            f"--num-cpus={cpus}", f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self.ray_root / name}",
        ]
        cmd += [f"--{option}={self._ports.pop()}" for option in NODE_PORT_OPTIONS]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if name == "head":
            return cmd + [
                "--head", f"--node-ip-address={HEAD_IP}", f"--port={self.gcs_port}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self._ports.pop()}",
            ]
        return [*self.worker_wrap, *cmd, f"--address={self.gcs_address}",
                f"--node-ip-address={WORKER_IP}"]

    def start(self) -> RayCluster:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Ray's unix socket paths must stay under ~107 characters: keep the root short.
        self.ray_root = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
        self._procs.append(self._launch("head", self.head_cpus, self.head_resources))
        _wait_for(lambda: len(self.alive_nodes()) >= 1, timeout_s=RAY_START_TIMEOUT_S,
                  what="Ray head node", procs=self._procs, logs=self.log_tails)
        self._procs.append(self._launch("worker", self.worker_cpus, self.worker_resources))
        _wait_for(lambda: len(self.alive_nodes()) >= 2, timeout_s=RAY_START_TIMEOUT_S,
                  what="Ray worker node", procs=self._procs, logs=self.log_tails)
        return self

    def _launch(self, name: str, cpus: int, resources: dict[str, float] | None
                ) -> subprocess.Popen:
        cmd = self._node_cmd(name, cpus, resources)
        return _popen(cmd, self.env, self.tmp_dir / f"ray-{name}.log", cwd=self.tmp_dir)

    def alive_nodes(self) -> list[dict]:
        """The ALIVE nodes as the dashboard's state API lists them ([] while it is not up)."""
        status, body = _http_get(f"{self.dashboard_url}/api/v0/nodes?limit=100")
        if status != 200:
            return []
        try:
            nodes = json.loads(body)["data"]["result"]["result"]
        except (ValueError, KeyError, TypeError):
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def log_tails(self) -> str:
        paths = [self.tmp_dir / "ray-head.log", self.tmp_dir / "ray-worker.log"]
        for name in ("gcs_server.out", "raylet.out", "raylet.err", "dashboard.log"):
            if self.ray_root is not None:
                paths += sorted(self.ray_root.glob(f"*/session_latest/logs/{name}"))
        return "\n".join(_tail(p, LOG_TAIL_CHARS // 2) for p in paths if p.exists())

    def stop(self) -> None:
        if self.ray_root is None:
            return
        stop_processes(self._procs, marker=f"{self.ray_root}/", whole_group=False,
                       grace_s=RAY_STOP_GRACE_S)
        self._procs.clear()
        for logs in self.ray_root.glob("*/session_latest/logs"):
            node = logs.parent.parent.name
            shutil.copytree(logs, self.tmp_dir / f"ray-{node}-logs", dirs_exist_ok=True,
                            ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("*.sock", "sockets"))
        shutil.rmtree(self.ray_root, ignore_errors=True)
        self.ray_root = None


class MlflowServer(_Service):
    """An MLflow tracking server with a sqlite backend that serves artifacts itself.

    Clients (also Ray workers on other nodes) upload artifacts through the server's HTTP API
    (`mlflow-artifacts:/` locations); the files land in `tmp_dir/artifacts`.
    """

    def __init__(self, tmp_dir: str | os.PathLike[str]) -> None:
        super().__init__()
        self.tmp_dir = Path(tmp_dir).resolve()
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts_dir = self.tmp_dir / "artifacts"
        self.env = service_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.env.pop("MLFLOW_TRACKING_URI", None)

    def start(self) -> MlflowServer:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.tmp_dir / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(self.artifacts_dir),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        self._procs.append(_popen(cmd, self.env, self.tmp_dir / "mlflow.log", cwd=self.tmp_dir))
        _wait_for(lambda: _http_get(f"{self.uri}/health")[0] == 200,
                  timeout_s=MLFLOW_START_TIMEOUT_S, what="MLflow server", procs=self._procs,
                  logs=lambda: _tail(self.tmp_dir / "mlflow.log"))
        return self

    def stop(self) -> None:
        stop_processes(self._procs)
        self._procs.clear()
