"""`klstudy submit` to a real 2-node Ray cluster, tracking to a real MLflow server."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SPEC = {
    "name": "cluster-toy",
    "model": {"kind": "toy"},
    "data": {"kind": "toy"},
    "train": {"total_steps": 300, "eval_every_steps": 30, "iw_samples": 5},
    "schedule": {"n_cycles": [1, 3], "ratio": [0.5], "ramp": ["linear"], "beta_max": [1.0, 6.0]},
    "seeds": [0, 1],
    # keep the top quarter: with β_max = 6 arms in the grid, some trials are always pruned
    "pruning": {"pruner": "percentile", "percentile": 25.0, "n_startup_trials": 2,
                "phase_aware": True},
    "resources": {"cpus_per_trial": 1},
}
N_TRIALS = 8


@pytest.fixture(scope="module")
def submitted(ray_cluster, mlflow_server, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("submit")
    spec_file = tmp / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    study_dir = tmp / "study"
    proc = subprocess.run(
        [sys.executable, "-m", "study.cli", "submit", str(spec_file), "--address",
         ray_cluster.dashboard_url, "--study-dir", str(study_dir), "--tracking-uri",
         mlflow_server.uri, "--python", sys.executable, "--follow"],
        env=ray_cluster.env, capture_output=True, text=True, timeout=850,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"study_dir": study_dir, "stdout": proc.stdout, "tracking_uri": mlflow_server.uri,
            "meta": json.loads((study_dir / "study.json").read_text())}


def test_job_succeeded_and_study_finished(submitted: dict) -> None:
    assert "SUCCEEDED" in submitted["stdout"]
    assert submitted["meta"]["status"] == "finished"
    assert submitted["meta"]["tracking_uri"] == submitted["tracking_uri"]


def test_trials_ran_on_both_nodes(submitted: dict) -> None:
    trials = pd.read_parquet(submitted["study_dir"] / "trials.parquet")
    assert len(trials) == N_TRIALS
    assert trials["node_ip"].nunique() == 2, trials[["trial_id", "node_ip"]]


def test_mlflow_server_holds_parent_and_nested_runs(submitted: dict) -> None:
    meta = submitted["meta"]
    client = MlflowClient(submitted["tracking_uri"])
    experiment = client.get_experiment_by_name("cluster-toy")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("klstudy.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == meta["parent_run_id"]]
    assert [p.info.run_id for p in parents] == [meta["parent_run_id"]]
    assert len(children) == N_TRIALS
    for run in children:
        history = client.get_metric_history(run.info.run_id, "valid/elbo")
        assert len(history) >= 1 and all(m.step % 30 == 0 for m in history)
    completed = next(r for r in children if r.data.tags["klstudy.status"] == "completed")
    paths = [a.path for a in client.list_artifacts(completed.info.run_id)]
    assert "config.json" in paths  # uploaded through the server from whichever node ran it


def test_some_trials_pruned_and_optuna_agrees(submitted: dict) -> None:
    meta = submitted["meta"]
    client = MlflowClient(submitted["tracking_uri"])
    children = client.search_runs(
        [meta["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
    status = {r.data.tags["klstudy.trial_id"]: r.data.tags["klstudy.status"] for r in children}
    pruned = {t for t, s in status.items() if s == "pruned"}
    assert pruned, status
    assert set(status.values()) <= {"completed", "pruned"}
    for run in children:
        if run.data.tags["klstudy.status"] == "pruned":
            assert int(run.data.tags["klstudy.pruned_at_step"]) < 300
    study = optuna.load_study(study_name=meta["optuna_study"],
                              storage=f"sqlite:///{submitted['study_dir'] / 'optuna.db'}")
    optuna_pruned = {t.user_attrs["tune_trial_id"] for t in study.trials
                     if t.state == optuna.trial.TrialState.PRUNED}
    optuna_complete = {t.user_attrs["tune_trial_id"] for t in study.trials
                       if t.state == optuna.trial.TrialState.COMPLETE}
    assert optuna_pruned == pruned
    assert optuna_complete == set(status) - pruned


def test_parquet_matches_mlflow(submitted: dict) -> None:
    evals = pd.read_parquet(submitted["study_dir"] / "evaluations")
    valid = evals[evals["split"] == "valid"]
    assert valid["trial_id"].nunique() == N_TRIALS
    assert not valid.duplicated(["trial_id", "step"]).any()
