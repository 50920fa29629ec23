"""analysis._load, _mlflow_load: Parquet, MLflow rebuild (same table), errors, per-trial rows."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from _services import free_port

from analysis import _mlflow_load
from analysis._load import (
    EVALUATION_COLUMNS,
    ReportError,
    StudyData,
    best_rows,
    final_rows,
    load_study,
)
from analysis._mlflow_load import load_from_mlflow
from analysis._synthetic import write_synthetic_study
from workers import TRIAL_COLUMNS, TrialConfig

NAME = "demo"
N_TRIALS, N_EVALS = 12, 6
SHARED_TRIAL_COLUMNS = [c for c in TRIAL_COLUMNS if c != "node_ip"]  # MLflow does not hold node_ip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished synthetic study with pruned and failed trials, in Parquet and sqlite MLflow."""
    root = tmp_path_factory.mktemp("load")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    write_synthetic_study(root / NAME, n_trials=N_TRIALS, n_evals=N_EVALS, seed=5,
                          tracking_uri=uri, p_pruned=0.3, p_error=0.15)
    return root / NAME, uri


@pytest.fixture(scope="module")
def data(store) -> StudyData:
    return load_study(store[0])


@pytest.fixture
def study_copy(store, tmp_path) -> Path:
    return Path(shutil.copytree(store[0], tmp_path / NAME))


def sorted_frame(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def test_fixture_has_every_terminal_status(data):
    assert set(data.trials["status"]) == {"completed", "pruned", "error"}


def test_parquet_path_reads_one_row_per_trial_step_and_split(data):
    assert data.source == "parquet" and not data.partial
    assert list(data.evaluations.columns) == list(EVALUATION_COLUMNS)
    expected = sum(2 * last // 50 + (status == "completed") for last, status
                   in zip(data.trials["last_step"], data.trials["status"], strict=True))
    assert len(data.evaluations) == expected
    assert set(data.evaluations["split"]) == {"train", "valid", "test"}


def test_evaluation_dtypes(data):
    dtypes = data.evaluations.dtypes
    assert all(dtypes[c] == np.int64 for c in ("n_cycles", "seed", "step", "total_steps"))
    assert all(dtypes[c] == np.float64 for c in ("ratio", "beta_max", "elbo", "kl", "beta"))
    assert dtypes["final"] == np.bool_ and dtypes["at_beta_max"] == np.bool_
    assert all(pd.api.types.is_string_dtype(dtypes[c]) for c in ("ramp", "split", "status"))


def test_status_is_joined_from_trials(data):
    status = data.trials.set_index("trial_id")["status"]
    assert (data.evaluations["status"] == data.evaluations["trial_id"].map(status)).all()


def test_latents_are_read(data):
    assert not data.latents.empty
    assert set(data.latents["trial_id"]) <= set(data.trials["trial_id"])


def test_mlflow_sqlite_rebuild_equals_parquet(store, data):
    rebuilt = load_from_mlflow(store[1], NAME)
    assert rebuilt.source == "mlflow" and rebuilt.meta == {} and rebuilt.latents.empty
    pd.testing.assert_frame_equal(sorted_frame(rebuilt.evaluations, ["trial_id", "step", "split"]),
                                  sorted_frame(data.evaluations, ["trial_id", "step", "split"]))
    pd.testing.assert_frame_equal(rebuilt.trials[SHARED_TRIAL_COLUMNS],
                                  data.trials[SHARED_TRIAL_COLUMNS])


def test_load_study_rebuilds_from_mlflow_without_parquet(store, study_copy):
    shutil.rmtree(study_copy / "evaluations")
    rebuilt = load_study(study_copy)
    assert rebuilt.source == "mlflow"
    assert rebuilt.meta == json.loads((study_copy / "study.json").read_text())
    assert len(rebuilt.trials) == N_TRIALS


def test_load_study_from_a_tracking_uri_alone(store):
    assert load_study(tracking_uri=store[1], experiment=NAME).source == "mlflow"


def test_corrupt_last_part_is_skipped_with_a_warning(data, study_copy, caplog):
    bad = study_copy / "evaluations" / "part-999999.parquet"
    bad.write_bytes(b"PAR1 half a file")
    with caplog.at_level(logging.WARNING, logger="analysis._load"):
        again = load_study(study_copy)
    pd.testing.assert_frame_equal(again.evaluations, data.evaluations)
    assert "part-999999.parquet" in caplog.text and "last part" in caplog.text


def test_a_repeated_step_keeps_the_last_row(study_copy):
    first = pq.read_table(study_copy / "evaluations" / "part-000000.parquet").to_pandas()
    repeat = first.iloc[[1]].assign(elbo=-99.0)
    pq.write_table(pq.read_table(study_copy / "evaluations" / "part-000000.parquet").from_pandas(
        repeat, preserve_index=False), study_copy / "evaluations" / "part-000500.parquet")
    ev = load_study(study_copy).evaluations
    key = repeat.iloc[0]
    hit = ev[(ev["trial_id"] == key["trial_id"]) & (ev["step"] == key["step"])
             & (ev["split"] == key["split"])]
    assert list(hit["elbo"]) == [-99.0]


def test_without_trials_parquet_trials_come_from_evaluations(study_copy):
    (study_copy / "trials.parquet").unlink()
    data = load_study(study_copy)
    assert len(data.trials) == N_TRIALS and set(data.trials["status"]) == {"running"}
    assert data.partial


def test_running_study_is_partial(tmp_path):
    write_synthetic_study(tmp_path / "s", n_trials=4, n_evals=4, n_running=1)
    data = load_study(tmp_path / "s")
    assert data.partial and data.meta["status"] == "running"


def test_missing_directory_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match="does not exist") as err:
        load_study(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_directory_that_is_no_study_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match="not a study directory"):
        load_study(tmp_path)


def test_no_parquet_and_no_tracking_uri_is_a_report_error(study_copy):
    shutil.rmtree(study_copy / "evaluations")
    meta = json.loads((study_copy / "study.json").read_text())
    (study_copy / "study.json").write_text(json.dumps({**meta, "tracking_uri": None}))
    with pytest.raises(ReportError, match="no evaluations yet"):
        load_study(study_copy)


def test_unknown_experiment_is_a_report_error(store):
    with pytest.raises(ReportError, match="'nope' not found"):
        load_from_mlflow(store[1], "nope")


def test_missing_sqlite_store_is_a_report_error_and_is_not_created(tmp_path):
    with pytest.raises(ReportError, match="no such database file"):
        load_from_mlflow(f"sqlite:///{tmp_path / 'absent.db'}", NAME)
    assert not (tmp_path / "absent.db").exists()


def test_unreachable_server_is_a_report_error():
    with pytest.raises(ReportError, match="not reachable"):
        load_from_mlflow(f"http://127.0.0.1:{free_port()}", NAME)


def test_final_rows_give_each_trials_last_evaluation(data):
    finals = final_rows(data)
    assert list(finals["trial_id"]) == sorted(data.trials["trial_id"])
    last_step = data.trials.set_index("trial_id")["last_step"]
    assert (finals["step"] == finals["trial_id"].map(last_step)).all()
    assert (finals["split"] == "valid").all()
    assert (finals["final"] == (finals["status"] == "completed")).all()


def test_final_rows_on_test_split_have_nan_for_unfinished_trials(data):
    finals = final_rows(data, split="test")
    assert finals["elbo"].notna().tolist() == (finals["status"] == "completed").tolist()


def test_final_rows_include_trials_without_evaluations(data):
    pending = data.trials.iloc[[0]].assign(trial_id="zz-pending", status="pending", last_step=0)
    trials = pd.concat([data.trials, pending], ignore_index=True)
    extended = dataclasses.replace(data, trials=trials)
    row = final_rows(extended).iloc[-1]
    assert row["trial_id"] == "zz-pending" and row["status"] == "pending"
    assert np.isnan(row["elbo"]) and np.isnan(row["step"])


@pytest.mark.parametrize("metric, how",
                         [("elbo", "max"), ("mi", "max"), ("kl", "min"), ("rec", "min")])
def test_best_rows_pick_the_best_value_of_each_trial(data, metric, how):
    best = best_rows(data, metric=metric).set_index("trial_id")[metric]
    valid = data.evaluations[data.evaluations["split"] == "valid"]
    expected = valid.groupby("trial_id")[metric].agg(how)
    pd.testing.assert_series_equal(best, expected, check_names=False)


@pytest.mark.parametrize("kwargs, match", [({"metric": "beta"}, "metric must be one of"),
                                           ({"split": "dev"}, "split must be one of")])
def test_best_rows_reject_unknown_metric_or_split(data, kwargs, match):
    with pytest.raises(ReportError, match=match):
        best_rows(data, **kwargs)


def test_http_bulk_rebuild_equals_parquet(mlflow_server, tmp_path):
    write_synthetic_study(tmp_path / "http-demo", n_trials=6, n_evals=5, seed=9,
                          tracking_uri=mlflow_server.uri, p_pruned=0.3)
    parquet = load_study(tmp_path / "http-demo")
    rebuilt = load_from_mlflow(mlflow_server.uri, "http-demo")
    pd.testing.assert_frame_equal(rebuilt.evaluations, parquet.evaluations)


def test_http_without_bulk_endpoint_falls_back_to_per_run_calls(mlflow_server, tmp_path,
                                                                 monkeypatch):
    write_synthetic_study(tmp_path / "http-old", n_trials=3, n_evals=4, seed=2,
                          tracking_uri=mlflow_server.uri)
    monkeypatch.setattr(_mlflow_load, "_BULK_ENDPOINT",
                        "/ajax-api/2.0/mlflow/metrics/no-such-endpoint")
    rebuilt = load_from_mlflow(mlflow_server.uri, "http-old")
    parquet = load_study(tmp_path / "http-old")
    pd.testing.assert_frame_equal(rebuilt.evaluations, parquet.evaluations)


def test_analysis_never_imports_ray():
    code = ("import sys, analysis; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_trial_runs_without_metrics_give_running_trials_and_no_rows(store):
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store[1])
    exp_id = client.create_experiment("just-started")
    parent = client.create_run(exp_id, run_name="just-started", tags={"klstudy.role": "study"})
    for trial_id in ("t0", "t1"):
        tags = {"mlflow.parentRunId": parent.info.run_id, "klstudy.role": "trial",
                "klstudy.trial_id": trial_id}
        run = client.create_run(exp_id, run_name=trial_id, tags=tags)
    params = [Param(k, str(v)) for k, v in TrialConfig().to_dict().items()]
    client.log_batch(run.info.run_id, params=params)
    data = load_from_mlflow(store[1], "just-started")  # t0 has no params yet: skipped
    assert data.evaluations.empty and list(data.evaluations.columns) == list(EVALUATION_COLUMNS)
    assert list(data.trials["trial_id"]) == ["t1"] and list(data.trials["status"]) == ["running"]
    assert data.partial
