"""A study whose Tune state is lost after a driver crash: `resume` starts the Tune experiment
again inside the same study. Finished trials must not run again (no training, no MLflow run
reopened), TPE must go on from its history, every evaluation is recorded once.

The driver runs in this process on embedded Ray (conftest ``ray_local``); the crash is an
exception out of Tune's event loop once two trials have completed, which ends
``Tuner.fit`` with the other trials cut off mid-run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from _checks import (
    assert_not_trained_again,
    assert_rows_exactly_once,
    snapshot,
    study_result_files,
    trials,
)
from mlflow.tracking import MlflowClient

from study._driver import resume_study, run_study
from study._results import StudyRecorder
from study._spec import parse_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TRAIN = {"total_steps": 200, "eval_every_steps": 50, "iw_samples": 0}
SPEC = {
    "name": "restart", "model": {"kind": "toy"}, "data": {"kind": "toy"}, "train": TRAIN,
    "schedule": {"n_cycles": [1, 2, 4], "ratio": [0.5]}, "seeds": [0, 1],
    "pruning": {"pruner": "none"}, "resources": {"cpus_per_trial": 1},
}


class DriverCrash(RuntimeError):
    pass


def crash_after_completed(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """An exception out of Tune's event loop (``on_step_end`` is called unguarded) ends
    ``fit`` at once, the running trials cut off, as a dying driver would leave them."""
    original = StudyRecorder.on_step_end

    def on_step_end(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.counts()["completed"] >= n:
            raise DriverCrash("simulated driver crash")

    monkeypatch.setattr(StudyRecorder, "on_step_end", on_step_end)


def child_runs(study_dir: Path) -> dict[str, object]:
    meta = json.loads((study_dir / "study.json").read_text())
    runs = MlflowClient(meta["tracking_uri"]).search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
    return {r.data.tags["klstudy.trial_id"]: r for r in runs}


def crash_then_lose_tune_state(spec: dict, study_dir: Path, monkeypatch) -> tuple[set, dict]:
    """Run until the crash, then lose the Tune state; (trials done before, their MLflow runs)."""
    with monkeypatch.context() as patch:
        crash_after_completed(patch, 2)
        with pytest.raises(Exception, match="simulated driver crash"):
            run_study(parse_spec(spec), yaml.safe_dump(spec), study_dir=study_dir)
    table = trials(study_dir)
    done = set(table.index[table["status"] == "completed"])
    assert len(done) >= 2 and len(done) < len(table), table["status"]
    shutil.rmtree(study_dir / "tune")  # lost: the driver was killed before it saved it
    return done, child_runs(study_dir)


def test_a_restarted_grid_study_does_not_train_finished_trials_again(ray_local,
                                                                     tmp_path, monkeypatch):
    study_dir = tmp_path / "grid"
    done, runs_before = crash_then_lose_tune_state(SPEC, study_dir, monkeypatch)
    before = snapshot(study_dir)
    summary = resume_study(study_dir)
    assert summary.status == "finished", summary
    table = trials(study_dir)
    assert len(table) == 6 and set(table["status"]) == {"completed"}
    assert_not_trained_again(study_result_files(study_dir), done, since=before)
    assert_rows_exactly_once(study_dir, TRAIN)
    runs = child_runs(study_dir)
    assert sorted(runs) == sorted(table.index)  # one run per trial, none duplicated
    for tid in done:  # never reopened: the run ended when the trial did, and stays so
        assert runs[tid].info.status == "FINISHED"
        assert runs[tid].info.end_time == runs_before[tid].info.end_time, tid


def test_a_restarted_tpe_study_goes_on_from_its_history(ray_local, tmp_path, monkeypatch):
    spec = {**SPEC, "name": "restart-tpe", "search": {"kind": "tpe", "n_trials": 5}}
    study_dir = tmp_path / "tpe"
    done, runs_before = crash_then_lose_tune_state(spec, study_dir, monkeypatch)
    before = snapshot(study_dir)
    summary = resume_study(study_dir)
    assert summary.status == "finished", summary
    table = trials(study_dir)
    assert sorted(t[:7] for t in table.index) == [f"tpe{i:04d}" for i in range(5)]
    assert set(table["status"]) == {"completed"}
    assert_not_trained_again(study_result_files(study_dir), done, since=before)
    assert_rows_exactly_once(study_dir, TRAIN)
    meta = json.loads((study_dir / "study.json").read_text())
    twins = optuna.load_study(study_name=meta["optuna_study"],
                              storage=f"sqlite:///{study_dir / 'optuna.db'}").trials
    assert sorted(t.user_attrs["tune_trial_id"] for t in twins) == sorted(table.index)
    assert {t.state for t in twins} == {optuna.trial.TrialState.COMPLETE}
    runs = child_runs(study_dir)
    assert sorted(runs) == sorted(table.index)
    for tid in done:
        assert runs[tid].info.end_time == runs_before[tid].info.end_time, tid
