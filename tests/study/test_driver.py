"""Whole studies on embedded Ray (real Tune, Optuna, MLflow sqlite store, Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from _checks import assert_rows_exactly_once
from mlflow.tracking import MlflowClient

from study._driver import StudyError, resume_study, run_study, study_status
from study._spec import parse_spec

pytestmark = pytest.mark.timeout(600)

SPEC = {
    "name": "drv",
    "model": {"kind": "toy"},
    "data": {"kind": "toy"},
    "train": {"total_steps": 240, "eval_every_steps": 40, "iw_samples": 5},
    "schedule": {"n_cycles": [1, 3], "ratio": [0.25, 0.5], "ramp": ["linear"], "beta_max": [1.0]},
    "seeds": [0, 1],
    "pruning": {"pruner": "median", "n_startup_trials": 2, "phase_aware": False},
    "resources": {"cpus_per_trial": 1},
}


def child_runs(meta: dict) -> list:
    client = MlflowClient(meta["tracking_uri"])
    return client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")


@pytest.fixture(scope="module")
def grid_study(ray_local, tmp_path_factory) -> Path:
    study_dir = tmp_path_factory.mktemp("grid") / "drv"
    run_study(parse_spec(SPEC), yaml.safe_dump(SPEC), study_dir=study_dir)
    return study_dir


def test_grid_study_finishes_with_every_trial_accounted_for(grid_study: Path) -> None:
    meta = json.loads((grid_study / "study.json").read_text())
    trials = pd.read_parquet(grid_study / "trials.parquet")
    assert meta["status"] == "finished"
    assert len(trials) == 8
    assert set(trials["status"]) <= {"completed", "pruned"}
    assert (trials["status"] == "completed").sum() >= 2


def test_mlflow_holds_one_parent_and_one_child_per_trial(grid_study: Path) -> None:
    meta = json.loads((grid_study / "study.json").read_text())
    runs = child_runs(meta)
    trials = pd.read_parquet(grid_study / "trials.parquet").set_index("trial_id")
    assert sorted(r.data.tags["klstudy.trial_id"] for r in runs) == sorted(trials.index)
    for run in runs:
        tid = run.data.tags["klstudy.trial_id"]
        assert run.data.tags["klstudy.status"] == trials.loc[tid, "status"]
        for param in ("n_cycles", "ratio", "ramp", "beta_max", "seed"):
            assert param in run.data.params
        assert "valid/elbo" in run.data.metrics
    parent = MlflowClient(meta["tracking_uri"]).get_run(meta["parent_run_id"])
    assert parent.data.tags["klstudy.role"] == "study"
    assert parent.info.status == "FINISHED"


def test_metric_steps_are_optimizer_steps(grid_study: Path) -> None:
    meta = json.loads((grid_study / "study.json").read_text())
    client = MlflowClient(meta["tracking_uri"])
    completed = [r for r in child_runs(meta) if r.data.tags["klstudy.status"] == "completed"]
    history = client.get_metric_history(completed[0].info.run_id, "valid/elbo")
    assert [m.step for m in history] == [40, 80, 120, 160, 200, 240]


def test_pruned_runs_are_tagged_and_agree_with_optuna(grid_study: Path) -> None:
    meta = json.loads((grid_study / "study.json").read_text())
    study = optuna.load_study(study_name=meta["optuna_study"],
                              storage=f"sqlite:///{grid_study / 'optuna.db'}")
    states = {t.user_attrs["tune_trial_id"]: t.state for t in study.trials}
    assert len(states) == 8
    tags = {r.data.tags["klstudy.status"] for r in child_runs(meta)}
    assert tags == {"completed", "pruned"}, tags  # both kinds checked below, not none
    for run in child_runs(meta):
        tid, status = run.data.tags["klstudy.trial_id"], run.data.tags["klstudy.status"]
        expected = {"completed": optuna.trial.TrialState.COMPLETE,
                    "pruned": optuna.trial.TrialState.PRUNED}[status]
        assert states[tid] == expected
        if status == "pruned":
            assert int(run.data.tags["klstudy.pruned_at_step"]) < 240
            assert run.info.status == "KILLED"


def test_parquet_rows_cover_every_evaluation(grid_study: Path) -> None:
    # every (trial, step, split) of the evaluation grid once, up to a pruned trial's step
    assert_rows_exactly_once(grid_study, SPEC["train"])
    evals = pd.read_parquet(grid_study / "evaluations")
    finals = evals[evals["final"]]
    assert set(finals["split"]) == {"train", "valid", "test"}
    assert finals.loc[finals["split"] == "test", "iw_nll"].notna().all()


def test_every_evaluation_reaches_mlflow_even_for_pruned_trials(grid_study: Path) -> None:
    """Metrics are sent to MLflow in batches; a stopped (pruned) trial flushes what it queued."""
    meta = json.loads((grid_study / "study.json").read_text())
    client = MlflowClient(meta["tracking_uri"])
    valid = pd.read_parquet(grid_study / "evaluations").query("split == 'valid'")
    for run in child_runs(meta):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "valid/elbo"))
        tid = run.data.tags["klstudy.trial_id"]
        expected = sorted(valid.loc[valid["trial_id"] == tid, "step"])
        assert steps == expected, run.data.tags["klstudy.status"]


def test_latents_and_config_artifacts_are_logged(grid_study: Path) -> None:
    meta = json.loads((grid_study / "study.json").read_text())
    client = MlflowClient(meta["tracking_uri"])
    run = next(r for r in child_runs(meta) if r.data.tags["klstudy.status"] == "completed")
    names = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.json" in names
    assert any(a.path.endswith(".png") for a in client.list_artifacts(run.info.run_id, "latents"))
    latents = pd.read_parquet(grid_study / "latents")
    assert {"z0", "z1"} <= set(latents.columns) and len(latents) > 0


def test_status_reads_the_directory(grid_study: Path) -> None:
    status = study_status(grid_study)
    assert status["status"] == "finished"
    assert status["counts"]["completed"] + status["counts"]["pruned"] == 8
    assert status["best_trial"] is not None


def test_run_again_on_the_finished_study_runs_nothing(grid_study: Path) -> None:
    meta = json.loads((grid_study / "study.json").read_text())
    summary = run_study(parse_spec(SPEC), "", study_dir=grid_study)
    assert summary.ran is False and summary.status == "finished"
    assert summary.parent_run_id == meta["parent_run_id"]
    assert json.loads((grid_study / "study.json").read_text()) == meta
    with pytest.raises(StudyError, match="run from another spec .*--overwrite"):
        run_study(parse_spec({**SPEC, "seeds": [0]}), "", study_dir=grid_study)


def test_overwrite_replaces_a_study_with_a_fresh_run(ray_local, tmp_path: Path) -> None:
    spec = {**SPEC, "name": "again", "train": {"total_steps": 40, "eval_every_steps": 20,
                                               "iw_samples": 0},
            "schedule": {"n_cycles": [1], "ratio": [0.5]}, "seeds": [0],
            "pruning": {"pruner": "none"}}
    study_dir = tmp_path / "again"
    first = run_study(parse_spec(spec), yaml.safe_dump(spec), study_dir=study_dir)
    (study_dir / "tune" / "stale-marker").write_text("from the first run")
    second = run_study(parse_spec(spec), yaml.safe_dump(spec), study_dir=study_dir,
                       overwrite=True)
    assert second.ran and second.status == "finished"
    assert second.parent_run_id != first.parent_run_id
    assert not (study_dir / "tune" / "stale-marker").exists()
    runs = child_runs(json.loads((study_dir / "study.json").read_text()))
    assert len(runs) == 1  # the new store holds the new study only


def test_resume_refuses_a_finished_study(grid_study: Path) -> None:
    with pytest.raises(StudyError, match="already finished"):
        resume_study(grid_study)


def test_tpe_search_runs_n_trials_in_the_grid(ray_local, tmp_path: Path) -> None:
    spec = {**SPEC, "name": "tpe", "search": {"kind": "tpe", "n_trials": 4},
            "pruning": {"pruner": "none"}}
    run_study(parse_spec(spec), yaml.safe_dump(spec), study_dir=tmp_path / "tpe")
    trials = pd.read_parquet(tmp_path / "tpe" / "trials.parquet")
    assert len(trials) == 4
    assert set(trials["status"]) == {"completed"}
    assert set(trials["n_cycles"]) <= {1, 3} and set(trials["ratio"]) <= {0.25, 0.5}
    meta = json.loads((tmp_path / "tpe" / "study.json").read_text())
    study = optuna.load_study(study_name=meta["optuna_study"],
                              storage=f"sqlite:///{tmp_path / 'tpe' / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
