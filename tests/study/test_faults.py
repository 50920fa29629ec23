"""Fault injection on whole studies, with real processes: Ctrl-C, SIGKILL, a second driver,
damaged or missing state files. Each test runs `klstudy` as a subprocess on embedded Ray."""

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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SPEC = {
    "name": "faults",
    "model": {"kind": "toy"},
    "data": {"kind": "toy"},
    "train": {"total_steps": 300, "eval_every_steps": 50, "iw_samples": 0},
    "schedule": {"n_cycles": [1, 3], "ratio": [0.5]},
    "seeds": [0, 1],
    "pruning": {"pruner": "none"},
    "resources": {"cpus_per_trial": 1},
}
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def klstudy(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study.cli", *args], env=ENV, timeout=timeout,
                          capture_output=True, text=True)


def start_run(tmp_path: Path, spec: dict | None = None) -> tuple[subprocess.Popen, Path]:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec or SPEC))
    study_dir = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "study.cli", "run", str(spec_file),
                             "--study-dir", str(study_dir)], env=ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, study_dir


def wait_for(predicate, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def statuses(study_dir: Path) -> dict[str, str]:
    try:
        trials = pd.read_parquet(study_dir / "trials.parquet")
    except Exception:
        return {}
    return dict(zip(trials["trial_id"], trials["status"], strict=True))


def n_completed(study_dir: Path) -> int:
    return sum(s == "completed" for s in statuses(study_dir).values())


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=120)


def meta(study_dir: Path) -> dict:
    return json.loads((study_dir / "study.json").read_text())


def assert_finished_once(study_dir: Path) -> None:
    """Every trial completed, and every (trial, step, split) row written exactly once."""
    assert meta(study_dir)["status"] == "finished"
    assert set(statuses(study_dir).values()) == {"completed"}
    assert len(statuses(study_dir)) == 4
    evals = pd.read_parquet(study_dir / "evaluations")
    assert not evals.duplicated(["trial_id", "step", "split"]).any()
    assert (evals.query("split == 'valid'").groupby("trial_id")["step"].max() == 300).all()


def test_ctrl_c_leaves_an_interrupted_study_that_resumes(tmp_path: Path) -> None:
    proc, study_dir = start_run(tmp_path)
    wait_for(lambda: n_completed(study_dir) >= 1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    out, err = proc.communicate(timeout=180)
    assert meta(study_dir)["status"] == "interrupted", out + err
    assert proc.returncode == 130, out + err
    assert "klstudy resume" in out
    status = klstudy("status", str(study_dir))
    assert status.returncode == 0 and "(interrupted)" in status.stdout
    assert "klstudy resume" in status.stdout
    resumed = klstudy("resume", str(study_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_finished_once(study_dir)


def test_a_second_driver_is_refused_naming_the_holder(tmp_path: Path) -> None:
    proc, study_dir = start_run(tmp_path)
    try:
        wait_for(lambda: (study_dir / "tune").is_dir())
        second = klstudy("resume", str(study_dir), timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert f"in use by pid {proc.pid}" in lines[0] and "klstudy run" in lines[0]
        shown = klstudy("status", str(study_dir))
        assert f"in use by pid {proc.pid}" in shown.stdout
    finally:
        kill_group(proc)  # SIGKILL: the kernel drops the lock with the process
    resumed = klstudy("resume", str(study_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_finished_once(study_dir)


def test_a_kill_before_tune_state_exists_is_resumable(tmp_path: Path) -> None:
    proc, study_dir = start_run(tmp_path)
    wait_for(lambda: (study_dir / "study.json").is_file(), timeout_s=120)
    kill_group(proc)
    if (study_dir / "tune").exists():  # the kill came later than hoped: remove the state
        import shutil

        shutil.rmtree(study_dir / "tune")
    assert klstudy("run", str(tmp_path / "spec.yaml"), "--study-dir",
                   str(study_dir)).returncode == 2  # it already holds a study...
    resumed = klstudy("resume", str(study_dir))  # ...which resume continues
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Starting the Tune experiment again" in resumed.stderr
    assert_finished_once(study_dir)


def test_damaged_state_files_get_a_message_and_a_way_forward(tmp_path: Path) -> None:
    # a pruner that never prunes here (2 startup trials of 4), but needs its Optuna history
    spec = {**SPEC, "pruning": {"pruner": "median", "n_startup_trials": 4}}
    proc, study_dir = start_run(tmp_path, spec)
    wait_for(lambda: n_completed(study_dir) >= 2)
    kill_group(proc)
    done_before = {t for t, s in statuses(study_dir).items() if s == "completed"}
    # a half-written Parquet part and a truncated Tune state file (ray#58179)
    (study_dir / "evaluations" / "part-999999.tmp").write_bytes(b"PAR1\x00half")
    status = klstudy("status", str(study_dir))
    assert status.returncode == 0, status.stderr
    for state in (study_dir / "tune").glob("experiment_state-*.json"):
        text = state.read_text()
        state.write_text(text[: len(text) // 2])
    # the Optuna storage lost: refused with the way forward, then accepted with it
    (study_dir / "optuna.db").unlink()
    refused = klstudy("resume", str(study_dir), timeout=120)
    assert refused.returncode == 2
    assert "--allow-new-optuna" in refused.stderr and refused.stderr.startswith("error: ")
    resumed = klstudy("resume", str(study_dir), "--allow-new-optuna")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "truncated or damaged" in resumed.stderr
    assert_finished_once(study_dir)
    evals = pd.read_parquet(study_dir / "evaluations")
    for tid in done_before:  # completed before the kill: never trained again
        assert (evals.query("trial_id == @tid and split == 'valid'")["step"].diff().dropna()
                > 0).all()


def _final_checkpoints(study_dir: Path) -> list[Path]:
    return sorted((study_dir / "tune").glob("run_trial_*/checkpoint_*/final_result.json"))


def _result_steps(trial_dir: Path) -> list[int]:
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_a_kill_between_a_trials_end_and_its_record_keeps_it_completed(tmp_path: Path) -> None:
    """SIGKILL the driver the moment a trial's final checkpoint (with its final result) is in
    the study directory: the worker has finished and marked its MLflow run, the driver has not
    yet recorded it. After resume the trial is completed once everywhere, not trained again."""
    import optuna
    from mlflow.tracking import MlflowClient

    proc, study_dir = start_run(tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not _final_checkpoints(study_dir):
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
    except BaseException:
        kill_group(proc)
        raise
    ended = _final_checkpoints(study_dir)[0].parent.parent  # the Tune trial folder
    config = json.loads((ended / "params.json").read_text())["trial"]
    trial_id = config["trial_id"]
    recorded_before = statuses(study_dir).get(trial_id)
    steps_before = _result_steps(ended) if (ended / "result.json").exists() else []

    resumed = klstudy("resume", str(study_dir))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert_finished_once(study_dir)
    # the window was hit: the driver had not recorded the trial as completed
    assert recorded_before != "completed", recorded_before
    steps = _result_steps(ended)
    assert steps[: len(steps_before)] == steps_before
    assert all(b >= a for a, b in zip(steps, steps[1:], strict=False)), steps  # no re-training
    info = meta(study_dir)
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    runs = client.search_runs([info["experiment_id"]],
                              filter_string=f"tags.`klstudy.trial_id` = '{trial_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    assert runs[0].data.tags.get("klstudy.status") == "completed"
    twins = [t for t in optuna.load_study(study_name=info["optuna_study"],
                                          storage=f"sqlite:///{study_dir / 'optuna.db'}").trials
             if t.user_attrs.get("tune_trial_id") == trial_id]
    assert len(twins) == 1 and twins[0].state == optuna.trial.TrialState.COMPLETE, twins
