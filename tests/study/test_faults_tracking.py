"""Faults around tracking, with real processes: an MLflow server down for over a minute in the
middle of a study, a trial whose loss turns infinite, and credentials in storage URLs.

The MLflow server here is this module's own (so it can be stopped and started again on the
same port); the Optuna storage is a real PostgreSQL with a password."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from _postgres import PostgresServer
from _services import MlflowServer
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

TRACK_PW = "tr4ck-s3cret-pw"
# every MLflow call fails fast while the server is down (FIELD-NOTES: ~4 min of retries else)
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> MlflowServer:
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(scope="module")
def pg(tmp_path_factory) -> PostgresServer:
    with PostgresServer(tmp_path_factory.mktemp("pg"), databases=("optuna",)) as srv:
        yield srv


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600):
    full = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **env}
    return subprocess.run([sys.executable, "-m", "study.cli", *args], env=full,
                          capture_output=True, text=True, timeout=timeout)


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def toy_spec(name: str, **train) -> dict:
    return {"name": name, "model": {"kind": "toy"}, "data": {"kind": "toy"},
            "train": {"total_steps": 200, "eval_every_steps": 50, "iw_samples": 0, **train},
            "schedule": {"n_cycles": [1, 2], "ratio": [0.5]}, "seeds": [0],
            "pruning": {"pruner": "none"}, "resources": {"cpus_per_trial": 1}}


def child_runs(uri: str, meta: dict) -> list:
    return MlflowClient(uri).search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")


def test_credentials_are_never_shown_or_stored_as_text(tmp_path, server, pg) -> None:
    storage = pg.url("optuna")
    assert pg.password in storage
    spec = {**toy_spec("secrets"), "pruning": {"pruner": "median", "storage": storage}}
    spec_file = write_spec(tmp_path, spec)
    tracking = server.uri.replace("http://", f"http://klstudy:{TRACK_PW}@")
    study_dir = tmp_path / "study"
    done = run_cli(["run", str(spec_file), "--study-dir", str(study_dir)],
                   {"KLSTUDY_TRACKING_URI": tracking})
    assert done.returncode == 0, done.stdout + done.stderr
    secrets = {pg.password, TRACK_PW}
    for text in (done.stdout, done.stderr):
        leaks = [line for line in text.splitlines() if any(s in line for s in secrets)]
        assert not leaks, leaks
    assert "***" in done.stdout  # the redacted URI is what is shown
    # every file of the study directory, text or pickle, but the 0600 secrets file
    secrets_file = study_dir / "secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    for path in study_dir.rglob("*"):
        if path.is_file() and path != secrets_file:
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path
    meta = json.loads((study_dir / "study.json").read_text())
    client = MlflowClient(server.uri)
    runs = [client.get_run(meta["parent_run_id"]), *child_runs(server.uri, meta)]
    assert len(runs) == 3
    for run in runs:
        shown = json.dumps({**run.data.params, **run.data.tags})
        assert not any(s in shown for s in secrets), run.info.run_id
        for artifact in client.list_artifacts(run.info.run_id):
            if not artifact.is_dir:
                local = client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))
                assert not any(s.encode() in Path(local).read_bytes() for s in secrets)
    # the Optuna trials did land in PostgreSQL, through the real (revealed) URL
    count = pg.psql("select count(*) from trials", database="optuna")
    assert int(count.strip()) == 2
    shown = run_cli(["status", str(study_dir)], {})
    assert shown.returncode == 0 and not any(s in shown.stdout for s in secrets)


def test_an_infinite_loss_is_an_error_with_its_reason_and_not_retried(tmp_path, server) -> None:
    spec = toy_spec("nan")
    spec["schedule"]["beta_max"] = [1.0, 1e300]  # β·KL overflows float32 at step 2
    study_dir = tmp_path / "study"
    done = run_cli(["run", str(write_spec(tmp_path, spec)), "--study-dir", str(study_dir),
                    "--tracking-uri", server.uri], {})
    assert done.returncode == 0, done.stdout + done.stderr
    trials = pd.read_parquet(study_dir / "trials.parquet").set_index("trial_id")
    bad = trials[trials["beta_max"] > 1]
    assert list(bad["status"]) == ["error"] * 2  # M = 1 and M = 2 at β_max 1e300
    assert all("NonFiniteLossError" in e for e in bad["error"])
    assert list(trials[trials["beta_max"] == 1]["status"]) == ["completed"] * 2
    meta = json.loads((study_dir / "study.json").read_text())
    assert meta["status"] == "finished"
    by_trial = {r.data.tags["klstudy.trial_id"]: r for r in child_runs(server.uri, meta)}
    failed = by_trial[bad.index[0]]
    assert failed.info.status == "FAILED"
    assert "NonFiniteLossError" in failed.data.tags["klstudy.error"]
    # not retried: the worker ended it cleanly, so Tune recorded no failure for it
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(study_dir / "tune"))
    assert all(t.num_failures == 0 for t in analysis.trials)
    report = run_cli(["report", str(study_dir)], {})
    assert report.returncode == 0, report.stderr
    html = (study_dir / "report" / "report.html").read_text()
    assert "NonFiniteLossError" in html


def test_a_minute_long_mlflow_outage_loses_nothing(tmp_path, server) -> None:
    spec = toy_spec("outage", total_steps=5000, eval_every_steps=100)
    spec["schedule"] = {"n_cycles": [1, 2, 4], "ratio": [0.5]}
    study_dir = tmp_path / "study"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           **FAST_FAIL}
    proc = subprocess.Popen([sys.executable, "-m", "study.cli", "run",
                             str(write_spec(tmp_path, spec)), "--study-dir", str(study_dir),
                             "--tracking-uri", server.uri], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = study_dir / "evaluations"
    deadline = time.monotonic() + 300
    while not (parts.is_dir() and any(parts.glob("part-*.parquet"))):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.5)
    server.stop()
    down_at = time.time()
    time.sleep(65)
    written_during = [p for p in parts.glob("part-*.parquet") if p.stat().st_mtime > down_at]
    server.start()  # same port, same store
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert written_during, "training stopped while MLflow was down"
    meta = json.loads((study_dir / "study.json").read_text())
    assert meta["status"] == "finished"
    evals = pd.read_parquet(study_dir / "evaluations").query("split == 'valid'")
    client = MlflowClient(server.uri)
    runs = child_runs(server.uri, meta)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert client.get_run(meta["parent_run_id"]).info.status == "FINISHED"
    for run in runs:
        tid = run.data.tags["klstudy.trial_id"]
        steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, "valid/elbo"))
        want = set(evals[evals["trial_id"] == tid]["step"])
        assert set(steps) == want, tid  # 0 lost
        assert max(steps.values()) == 1, tid  # 0 duplicated
