"""`klstudy ui` never leaves its MLflow server behind, whatever signal ends it (a service
manager's SIGTERM, a closed terminal's SIGHUP, or SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _services import free_port

from analysis import wait_for_health
from analysis._synthetic import write_synthetic_study

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ui")
    cwd = os.getcwd()
    os.chdir(root)  # the synthetic experiment's default artifact root is ./mlruns
    try:
        study = root / "study"
        study.mkdir()
        write_synthetic_study(study, n_trials=2, n_evals=3, p_pruned=0.0, p_error=0.0,
                              tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    finally:
        os.chdir(cwd)
    return study


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_the_ui_server_ends_with_klstudy_ui(study: Path, sig: int) -> None:
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    ui = subprocess.Popen([sys.executable, "-m", "study.cli", "ui", str(study), "--port",
                           str(port)], env=env, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_health(f"http://127.0.0.1:{port}", timeout_s=120, proc=ui)
        os.kill(ui.pid, sig)  # klstudy ui alone, as a service manager or a terminal would
        ui.wait(timeout=60)
        deadline = time.monotonic() + 30
        while listening(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not listening(port), f"the MLflow server outlived klstudy ui after {sig!r}"
    finally:
        if ui.poll() is None:
            ui.kill()
