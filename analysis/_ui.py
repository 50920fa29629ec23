"""``klstudy ui``: serve the MLflow UI for a study's own tracking store on loopback.

A study with the embedded store (``sqlite:///<study_dir>/mlflow.db``, artifacts in
``<study_dir>/mlartifacts``) gets a local ``mlflow server``; a study that logs to a tracking
server already has a UI, so there is nothing to start (``ReportError`` says where to look).
The server runs lean (FIELD-NOTES): one worker, no job runner — 2 processes, ~0.5 GiB.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from analysis._load import ReportError

STUDY_FILE = "study.json"
_REMOTE_SCHEMES = ("http://", "https://", "databricks")
_STOP_GRACE_S = 10.0


def experiment_url(base_url: str, experiment_id: str | int) -> str:
    """The runs table of an experiment (the bare experiment URL opens a GenAI traces page)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"


def ui_url(study_dir: str | os.PathLike[str], *, port: int, host: str = "127.0.0.1") -> str:
    """Where the UI started by :func:`serve_ui` shows the study's runs."""
    base = f"http://{host}:{port}"
    experiment_id = _study_meta(Path(study_dir)).get("experiment_id")
    return experiment_url(base, experiment_id) if experiment_id else base


def _study_meta(study_dir: Path) -> dict:
    path = study_dir / STUDY_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: not found; is {study_dir} a study directory?") from None
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: unreadable ({err})") from None


def tracking_uri_of(study_dir: str | os.PathLike[str]) -> str:
    """The study's tracking URI from ``study.json`` (default: its embedded sqlite store)."""
    root = Path(study_dir)
    return _study_meta(root).get("tracking_uri") or f"sqlite:///{root.resolve() / 'mlflow.db'}"


def ui_command(study_dir: str | os.PathLike[str], *, port: int = 5000,
               host: str = "127.0.0.1") -> list[str]:
    """The ``mlflow server`` command line serving the study's tracking store.

    Raises:
        ReportError: the study logs to a remote tracking server (open its URL instead), its
            sqlite store does not exist, or ``port`` is out of range.
    """
    if not 0 < port < 65536:
        raise ReportError(f"port: must be in [1, 65535], got {port}")
    root = Path(study_dir)
    meta = _study_meta(root)
    uri = tracking_uri_of(root)
    if uri.startswith(_REMOTE_SCHEMES):
        url = experiment_url(uri, meta["experiment_id"]) if meta.get("experiment_id") else uri
        raise ReportError(f"tracking_uri: study {meta.get('name', root.name)!r} logs to the "
                          f"MLflow server at {uri}; nothing to start here — open {url}")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ReportError(f"tracking_uri: {uri}: no such MLflow store (has the study run?)")
        cmd += ["--default-artifact-root", str(db.resolve().parent / "mlartifacts")]
    return cmd + ["--host", host, "--port", str(port), "--workers", "1"]


def serve_ui(study_dir: str | os.PathLike[str], *, port: int,
             host: str = "127.0.0.1") -> subprocess.Popen:
    """Start the MLflow UI server in its own process group; stop it with :func:`stop_ui`.

    Its output goes to ``<study_dir>/mlflow-ui.log``. On Linux the server also gets SIGTERM
    when this process dies, however it dies (``PR_SET_PDEATHSIG``), so it never outlives us.
    """
    cmd = ui_command(study_dir, port=port, host=host)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log_path = Path(study_dir) / "mlflow-ui.log"
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def wait_for_health(base_url: str, *, timeout_s: float = 60.0,
                    proc: subprocess.Popen | None = None) -> bool:
    """Poll ``<base_url>/health`` until it answers 200; False on timeout or if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=2.0) as resp:
                if resp.status == 200:
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    return False


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group has no process left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def stop_ui(proc: subprocess.Popen, *, timeout_s: float = _STOP_GRACE_S) -> None:
    """SIGTERM the server's process group (server + uvicorn worker); SIGKILL what is left
    after ``timeout_s``. Only the group that :func:`serve_ui` started is signalled."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _signal_group(proc.pid, 0):
            return
        time.sleep(0.2)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout_s)
