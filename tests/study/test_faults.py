"""Fault injection on one whole study, with real processes: every driver is `klstudy` in a
subprocess on embedded Ray, and each is stopped by a different fault; the study must end with
every trial completed once, every evaluation recorded once, and no finished trial trained
again.

The faults, in order, on the same study (8 toy trials, 2 at a time):

0. SIGKILL of `klstudy run` before Tune saved any state; `run` again says to resume.
1. `klstudy resume` (driver A) restarts the Tune experiment; a second driver is refused, naming
   A, and `status` shows who holds the study.
2. Ctrl-C (SIGINT) of A: an interrupted study, exit 130.
3. Driver B SIGKILLed right after Tune saved an experiment state that registers a trial's
   checkpoint (``_killhook.py``): that trial's rows up to the checkpoint must be on disk.
4. A half-written Parquet part, a truncated Tune state and a lost Optuna storage: `resume` is
   refused with the way forward; driver C (`--allow-new-optuna`) is SIGKILLed the moment a
   trial's final checkpoint is in the study directory, before the driver recorded its end.
5. Driver D resumes the study to its end.

The module's fixture runs the chain once; each test checks what one fault must leave behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from _checks import (
    assert_not_trained_again,
    assert_rows_exactly_once,
    eval_steps,
    recorded_rows,
    result_lines,
    staging_result_files,
)
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

TRAIN = {"total_steps": 300, "eval_every_steps": 50, "iw_samples": 0}
N_TRIALS = 8
SPEC = {
    "name": "faults", "model": {"kind": "toy"}, "data": {"kind": "toy"}, "train": TRAIN,
    "schedule": {"n_cycles": [1, 2, 3, 4], "ratio": [0.5]}, "seeds": [0, 1],
    # a pruner that never prunes here (8 startup trials of 8), but needs its Optuna history
    "pruning": {"pruner": "median", "n_startup_trials": N_TRIALS},
    "resources": {"cpus_per_trial": 1},
}
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
KLSTUDY = [sys.executable, "-m", "study.cli"]
KILLHOOK = Path(__file__).with_name("_killhook.py")


def klstudy(*args: str, timeout: float = 600, ray_tmp: Path | None = None
            ) -> subprocess.CompletedProcess:
    env = {**ENV, "RAY_TMPDIR": str(ray_tmp)} if ray_tmp else ENV
    return subprocess.run([*KLSTUDY, *args], env=env, timeout=timeout, capture_output=True,
                          text=True)


class Driver:
    """A driver process in its own process group (Ray's processes join it, a kill of the group
    takes them too), its output in files (no pipe a Ray child could hold open)."""

    def __init__(self, logs: Path, ray_tmp: Path, *cmd: str) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / "stdout", logs / "stderr"
        env = {**ENV, "RAY_TMPDIR": str(ray_tmp)}  # its Ray session: where Tune stages results
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(list(cmd), env=env, start_new_session=True,
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout_s: float = 600) -> int:
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> int:
        """SIGKILL the whole group (after the driver itself died, what it left running)."""
        self.signal_group(signal.SIGKILL)
        return self.proc.wait(timeout=120)

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()


def wait_for(predicate, what: str, timeout_s: float = 300, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(every_s)


def statuses(study_dir: Path) -> dict[str, str]:
    try:
        trials = pd.read_parquet(study_dir / "trials.parquet")
    except Exception:
        return {}
    return dict(zip(trials["trial_id"], trials["status"], strict=True))


def completed(study_dir: Path) -> set[str]:
    return {t for t, s in statuses(study_dir).items() if s == "completed"}


def meta(study_dir: Path) -> dict:
    return json.loads((study_dir / "study.json").read_text())


def final_checkpoints(study_dir: Path) -> list[Path]:
    return sorted((study_dir / "tune").glob("run_trial_*/checkpoint_*/final_result.json"))


def result_steps(trial_dir: Path, *, replayed: bool = False) -> list[int]:
    """The steps a Tune trial folder's results were trained at (``replayed``: those re-reported
    from a final checkpoint without training)."""
    path = trial_dir / "result.json"
    results = [json.loads(line) for line in (path.read_text().splitlines()
                                             if path.exists() else []) if line.strip()]
    return [r["step"] for r in results if bool(r.get("replayed")) == replayed]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("faults")
    spec_file = tmp / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    # each driver's Ray session (RAY_TMPDIR) under a short path: Ray's socket paths must stay
    # under ~107 characters
    ray_tmp = Path(tempfile.mkdtemp(prefix="kf-", dir="/tmp"))
    rec: dict = {"dir": tmp / "study", "ray_tmp": ray_tmp}
    drivers: list[Driver] = []

    def start(name: str, *cmd: str) -> Driver:
        drivers.append(Driver(tmp / "logs" / name, ray_tmp / name, *cmd))
        return drivers[-1]

    try:
        _chain(rec, spec_file, rec["dir"], start)
        yield rec
    finally:
        for driver in drivers:
            if driver.poll() is None:
                driver.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _chain(rec: dict, spec_file: Path, d: Path, start) -> None:
    # 0. killed before Tune saved any state
    run = start("run", *KLSTUDY, "run", str(spec_file), "--study-dir", str(d))
    wait_for(lambda: (d / "study.json").is_file(), "study.json", timeout_s=120, every_s=0.05)
    run.kill()
    shutil.rmtree(d / "tune", ignore_errors=True)  # the kill came later than hoped: remove it
    rec["run_again"] = klstudy("run", str(spec_file), "--study-dir", str(d))

    # 1. driver A restarts the Tune experiment; a second driver is refused
    a = start("a", *KLSTUDY, "resume", str(d))
    rec["a_pid"] = a.pid
    wait_for(lambda: (d / "tune").is_dir() or a.poll() is not None, "A's Tune state")
    rec["second"] = klstudy("resume", str(d), timeout=120)
    rec["status_held"] = klstudy("status", str(d))

    # 2. Ctrl-C of A after a trial completed
    wait_for(lambda: len(completed(d)) >= 1 or a.poll() is not None, "a completed trial")
    a.signal_group(signal.SIGINT)  # what Ctrl-C in a terminal sends
    code = a.wait(180)
    rec["a"] = {"code": code, "out": a.out, "err": a.err, "status": meta(d)["status"]}
    rec["status_after_ctrl_c"] = klstudy("status", str(d))

    # 3. driver B killed right after Tune saved a state that registers a new checkpoint
    rec["done_before_b"], rec["lines_before_b"] = completed(d), result_lines(d)
    mark = d.parent / "killhook.json"
    b = start("b", sys.executable, str(KILLHOOK), str(mark), "resume", str(d))
    code = b.wait(600)
    b.kill()  # what B's Ray processes are left
    rec["b"] = {"code": code, "err": b.err, "mark": json.loads(mark.read_text())
                if mark.is_file() else None, "rows": recorded_rows(d)}

    # 4. damaged state files, a lost Optuna storage; driver C killed between end and record
    rec["done_before_c"], rec["lines_before_c"] = completed(d), result_lines(d)
    (d / "evaluations" / "part-999999.tmp").write_bytes(b"PAR1\x00half")
    rec["status_damaged"] = klstudy("status", str(d))
    for state in (d / "tune").glob("experiment_state-*.json"):
        text = state.read_text()
        state.write_text(text[: len(text) // 2])
    (d / "optuna.db").unlink()
    rec["refused"] = klstudy("resume", str(d), timeout=120)
    c = start("c", *KLSTUDY, "resume", str(d), "--allow-new-optuna")
    wait_for(lambda: any(d.glob("tune.broken-*")) or c.poll() is not None,
             "C moving the damaged Tune state aside", every_s=0.01)
    wait_for(lambda: final_checkpoints(d) or c.poll() is not None, "a final checkpoint",
             every_s=0.002)
    c.kill()
    final = final_checkpoints(d)[0]
    ended = final.parent.parent  # the Tune trial folder
    trial_id = json.loads(final.read_text())["klstudy_trial_id"]
    rec["c"] = {"err": c.err, "ended": trial_id, "recorded": statuses(d).get(trial_id),
                "steps": result_steps(ended), "folder": ended}

    # 5. driver D to the end
    rec["done_before_d"], rec["lines_before_d"] = completed(d), result_lines(d)
    rec["d"] = klstudy("resume", str(d), ray_tmp=rec["ray_tmp"] / "d")


def test_a_kill_before_tune_state_exists_is_resumable(chain: dict) -> None:
    again = chain["run_again"]
    assert again.returncode == 2, again.stdout + again.stderr
    assert f"klstudy resume {chain['dir']}" in again.stderr  # what to do, not a circle
    assert "Starting the Tune experiment again" in chain["a"]["err"], chain["a"]["err"][-3000:]


def test_a_second_driver_is_refused_naming_the_holder(chain: dict) -> None:
    second = chain["second"]
    assert second.returncode == 2, second.stdout + second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert f"in use by pid {chain['a_pid']}" in lines[0] and "klstudy resume" in lines[0]
    assert f"in use by pid {chain['a_pid']}" in chain["status_held"].stdout


def test_ctrl_c_leaves_an_interrupted_study_that_resumes(chain: dict) -> None:
    a = chain["a"]
    assert a["code"] == 130 and a["status"] == "interrupted", a["out"] + a["err"][-3000:]
    assert "klstudy resume" in a["out"]
    status = chain["status_after_ctrl_c"]
    assert status.returncode == 0 and "(interrupted)" in status.stdout
    assert "klstudy resume" in status.stdout


def test_a_kill_after_tune_saved_its_state_loses_no_row(chain: dict) -> None:
    """Rows of every evaluation up to the checkpoint Tune will resume from are on disk at the
    moment of the kill: the resumed trial goes on past them."""
    b = chain["b"]
    assert b["code"] == -signal.SIGKILL and b["mark"], b["err"][-3000:]
    tid, step = b["mark"]["trial_id"], b["mark"]["step"]
    want = {(tid, s, split) for s in eval_steps(TRAIN["total_steps"],
                                                TRAIN["eval_every_steps"], up_to=step)
            for split in ("train", "valid")}
    missing = sorted(want - set(b["rows"]))
    assert not missing, f"rows of {tid} lost at the kill after step {step}: {missing}"


def test_damaged_state_files_get_a_message_and_a_way_forward(chain: dict) -> None:
    assert chain["status_damaged"].returncode == 0, chain["status_damaged"].stderr
    refused = chain["refused"]
    assert refused.returncode == 2 and refused.stderr.startswith("error: ")
    assert "--allow-new-optuna" in refused.stderr
    assert "truncated or damaged" in chain["c"]["err"], chain["c"]["err"][-3000:]


def test_a_kill_between_a_trials_end_and_its_record_keeps_it_completed(chain: dict) -> None:
    """Driver C was SIGKILLed the moment a trial's final checkpoint (with its final result)
    was in the study directory: the worker had finished, the driver had not recorded it. After
    the resume the trial is completed once everywhere, not trained again."""
    c, d = chain["c"], chain["dir"]
    assert c["recorded"] != "completed", c["recorded"]  # the window was hit
    steps = result_steps(c["folder"])  # trained: what C had synced, then nothing again
    assert steps[: len(c["steps"])] == c["steps"]
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False)), steps
    assert result_steps(c["folder"], replayed=True)[-1] == TRAIN["total_steps"]  # re-reported
    assert_not_trained_again(staging_result_files(chain["ray_tmp"] / "d"), {c["ended"]},
                             earlier=chain["lines_before_d"])
    info = meta(d)
    runs = MlflowClient(info["tracking_uri"]).search_runs(
        [info["experiment_id"]], filter_string=f"tags.`klstudy.trial_id` = '{c['ended']}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    assert runs[0].data.tags.get("klstudy.status") == "completed"
    twins = [t for t in optuna.load_study(study_name=info["optuna_study"],
                                          storage=f"sqlite:///{d / 'optuna.db'}").trials
             if t.user_attrs.get("tune_trial_id") == c["ended"]]
    assert len(twins) == 1 and twins[0].state == optuna.trial.TrialState.COMPLETE, twins


def test_the_study_ends_with_every_evaluation_recorded_once(chain: dict) -> None:
    d = chain["d"]
    assert d.returncode == 0, d.stdout[-2000:] + d.stderr[-3000:]
    study_dir = chain["dir"]
    assert meta(study_dir)["status"] == "finished"
    assert set(statuses(study_dir).values()) == {"completed"}
    assert len(statuses(study_dir)) == N_TRIALS
    assert_rows_exactly_once(study_dir, TRAIN)


@pytest.mark.parametrize("driver", ["b", "c", "d"])
def test_trials_finished_before_a_driver_are_not_trained_by_it(chain: dict, driver: str):
    done = chain[f"done_before_{driver}"]
    assert done, f"no trial had completed before driver {driver.upper()}"
    results = staging_result_files(chain["ray_tmp"] / driver)
    assert results, f"driver {driver.upper()} reported nothing"  # the check would be empty
    assert_not_trained_again(results, done, earlier=chain[f"lines_before_{driver}"])


def test_mlflow_holds_one_finished_run_per_trial(chain: dict) -> None:
    info = meta(chain["dir"])
    runs = MlflowClient(info["tracking_uri"]).search_runs(
        [info["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{info['parent_run_id']}'")
    assert sorted(r.data.tags["klstudy.trial_id"] for r in runs) == sorted(statuses(chain["dir"]))
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["klstudy.status"] for r in runs} == {"completed"}
