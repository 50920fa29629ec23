"""Fault injection below the driver: a trial's worker process SIGKILLed, and a whole Ray node
SIGKILLed in a 2-node loopback cluster. In both, the study must finish with every trial
completed, the killed work continuing from a checkpoint rather than from step 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from _services import WORKER_IP, RayCluster, _related_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SPEC = {
    "name": "nodes",
    "model": {"kind": "toy"},
    "data": {"kind": "toy"},
    "train": {"total_steps": 2400, "eval_every_steps": 100, "iw_samples": 0},
    "schedule": {"n_cycles": [1, 3], "ratio": [0.5]},
    "seeds": [0, 1],
    "pruning": {"pruner": "none"},
    "resources": {"cpus_per_trial": 1},
}


def trials(study_dir: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(study_dir / "trials.parquet")
    except Exception:
        return pd.DataFrame(columns=["trial_id", "status", "last_step", "node_ip"])


def wait_for(predicate, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError("condition not met in time")


def start(tmp_path: Path, env: dict, *extra: str) -> tuple[subprocess.Popen, Path]:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    study_dir = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "study.cli", "run", str(spec_file),
                             "--study-dir", str(study_dir), *extra], env=env,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, study_dir


def restarts(study_dir: Path) -> dict[str, list[int]]:
    """Per Tune trial folder: the first step reported after each restart (a step decrease)."""
    out = {}
    for result in (study_dir / "tune").glob("run_trial_*/result.json"):
        steps = [json.loads(line)["step"] for line in result.read_text().splitlines() if line]
        out[result.parent.name] = [b for a, b in zip(steps, steps[1:], strict=False) if b <= a]
    return out


def assert_all_completed(proc: subprocess.Popen, study_dir: Path) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    table = trials(study_dir)
    assert len(table) == 4 and set(table["status"]) == {"completed"}, table
    evals = pd.read_parquet(study_dir / "evaluations").query("split == 'valid'")
    assert not evals.duplicated(["trial_id", "step"]).any()
    assert (evals.groupby("trial_id")["step"].max() == 2400).all()


def test_a_killed_trial_worker_continues_from_its_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc, study_dir = start(tmp_path, env)
    try:
        wait_for(lambda: (trials(study_dir).query("status == 'running'")["last_step"]
                          .fillna(0) >= 400).any())
        workers = [pid for pid in _related_pids([proc.pid], None)
                   if "ImplicitFunc" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                       errors="replace")]
        assert workers, "no trial worker process found"
        os.kill(workers[0], signal.SIGKILL)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert_all_completed(proc, study_dir)
    resumed = [steps for steps in restarts(study_dir).values() if steps]
    assert resumed, "no trial was restarted after its worker was killed"
    for steps in resumed:  # from a checkpoint: the first step after the restart is past eval 1
        assert all(step > 100 for step in steps), steps


def test_a_killed_node_has_its_trials_rescheduled(tmp_path: Path) -> None:
    with RayCluster(tmp_path / "ray", head_cpus=1, worker_cpus=1) as cluster:
        proc, study_dir = start(tmp_path, cluster.env, "--address", cluster.gcs_address)
        try:
            wait_for(lambda: ((t := trials(study_dir))["node_ip"] == WORKER_IP).any()
                     and (t["last_step"].fillna(0) >= 300).any())
            node = cluster._procs[1]  # the worker node: SIGKILL it and everything it runs
            victims = _related_pids([node.pid], f"{cluster.ray_root}/worker/")
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            node.wait(timeout=30)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        assert_all_completed(proc, study_dir)
    on_worker = trials(study_dir)
    assert (on_worker["node_ip"] != WORKER_IP).all()  # finished on the head, rescheduled
    from ray.tune import ExperimentAnalysis

    failed = [t for t in ExperimentAnalysis(str(study_dir / "tune")).trials if t.num_failures]
    assert failed, "no trial was rescheduled"


def _private_mounts_work() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _private_mounts_work(),
                    reason="needs `unshare --mount` (root or user namespaces) to give the "
                           "second node its own view of the filesystem")
def test_a_study_dir_the_other_node_cannot_see_is_refused_up_front(tmp_path: Path) -> None:
    """The worker node runs in its own mount namespace with an empty tmpfs over `local/`, the
    way a second machine sees a directory on the head's local disk: the study must be refused
    before any trial starts, naming the node, and leave no study behind."""
    local = tmp_path / "local"
    local.mkdir()
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs tmpfs "$0" && exec "$@"', str(local)]
    with RayCluster(tmp_path / "ray", head_cpus=1, worker_cpus=1, worker_wrap=hide) as cluster:
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(SPEC))
        study_dir = local / "study"
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "study.cli", "run", str(spec_file), "--study-dir",
             str(study_dir), "--address", cluster.gcs_address],
            env=cluster.env, capture_output=True, text=True, timeout=300)
        took = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "not shared by every node" in errors[0] and WORKER_IP in errors[0], errors[0]
    assert "does not see the driver's file" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert not study_dir.exists(), sorted(p.name for p in study_dir.iterdir())
    assert took < 200, f"the refusal took {took:.0f} s"
