"""Fault: the MLflow server is down for over a minute while a trial trains (worker side).

A real ``mlflow server`` (its own, not the session fixture, so that it can be stopped and
restarted on the same port) is stopped before a real toy trial starts, through ``run_trial``
and its spool, with the client's retries cut to none; it comes back 65 s later. Asserted:
training and reporting went on during the outage, the trial's run was created once the server
answered, and after ``drain_spools`` every evaluation is in MLflow exactly once (0 lost,
0 duplicated) and the run is FINISHED. (The whole-study variant on Ray is the driver's test.)
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _services import MlflowServer  # tests/ is on sys.path
from mlflow.tracking import MlflowClient

import workers._spool as spool_module
import workers._trainable as trainable
from workers import drain_spools, trial_key

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

OUTAGE_S = 65.0
TRIAL = {"total_steps": 2000, "eval_every_steps": 20, "n_cycles": 4, "iw_samples": 5,
         "eval_batch_size": 50, "eval_subset_sentences": 50, "device": "cpu",
         "num_threads": 1, "trial_id": "outage-0"}
HOLD_FROM_STEP = 1800  # the fake Tune holds these last reports until the server is back


class _Checkpoint:
    store: Path

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_directory(cls, path: str) -> _Checkpoint:
        target = cls.store / f"ckpt-{time.monotonic_ns()}"
        shutil.copytree(path, target)
        return cls(target)


class HoldingTune:
    """``ray.tune`` for ``run_trial``: records each report and its time. It holds the reports
    from ``HOLD_FROM_STEP`` on until the server is back, so that the trial spans the outage
    however fast this machine trains (the code under test never waits on MLflow itself)."""

    def __init__(self, store: Path, server_up: threading.Event) -> None:
        store.mkdir(parents=True)
        self.Checkpoint = type("Checkpoint", (_Checkpoint,), {"store": store})
        self.server_up = server_up
        self.reports: list[tuple[float, dict[str, Any]]] = []

    def get_checkpoint(self) -> None:
        return None

    def report(self, result: dict[str, Any], checkpoint: Any = None) -> None:
        self.reports.append((time.monotonic(), result))
        if result.get("step", 0) >= HOLD_FROM_STEP:
            assert self.server_up.wait(timeout=600)


@pytest.fixture
def server(tmp_path) -> MlflowServer:
    with MlflowServer(tmp_path / "mlflow") as srv:
        yield srv


def _study(server: MlflowServer, spool_dir: Path) -> dict[str, Any]:
    client = MlflowClient(server.uri)
    experiment_id = client.create_experiment("outage")
    parent = client.create_run(experiment_id, run_name="outage", tags={"klstudy.role": "study"})
    return {"name": "outage", "tracking_uri": server.uri, "experiment_id": experiment_id,
            "parent_run_id": parent.info.run_id, "spool_dir": str(spool_dir)}


def test_a_trial_trains_through_a_65_s_mlflow_outage_and_loses_nothing(
        server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    study = _study(server, tmp_path / "spool")
    up = threading.Event()
    times: dict[str, float] = {}

    def outage() -> None:
        time.sleep(OUTAGE_S)
        server.start()  # same port, same store
        times["up"] = time.monotonic()
        up.set()

    server.stop()
    times["down"] = time.monotonic()
    restarter = threading.Thread(target=outage, daemon=True)
    restarter.start()
    tune = HoldingTune(tmp_path / "ckpt", up)
    monkeypatch.setattr(trainable, "_tune", lambda: tune)
    try:
        trainable.run_trial({"trial": TRIAL, "study": study})
        times["trained"] = time.monotonic()
        restarter.join(timeout=300)
        assert up.is_set(), "the MLflow server did not come back"
        key = trial_key(TRIAL["trial_id"])
        left_by_trial = len(list((Path(study["spool_dir"]) / key).glob("r-*.json")))
        summary = drain_spools(study["spool_dir"], server.uri, timeout_s=120.0)
    finally:
        for spool in list(spool_module._SHARED.values()):
            spool.close(0.0)

    # Training went on: evaluations were reported all through the outage, without a run id.
    during = [r for t, r in tune.reports if times["down"] < t < times["up"]]
    assert len(during) >= 10, len(during)
    assert all(r["mlflow_run_id"] == "" for r in during)
    assert tune.reports[-1][1]["final"]
    assert summary["ok"] and summary["pending_records"] == 0, summary

    # Exactly once: every reported (key, step) is in MLflow once, and nothing else is.
    client = MlflowClient(server.uri)
    runs = client.search_runs([study["experiment_id"]],
                              filter_string="tags.`klstudy.role` = 'trial'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["klstudy.status"] == "completed"
    expected = Counter((k, r["step"]) for _, r in tune.reports for k, v in r.items()
                       if "/" in k and isinstance(v, (int, float)) and math.isfinite(v))
    held = Counter((m.key, m.step) for key in {k for k, _ in expected}
                   for m in client.get_metric_history(run.info.run_id, key))
    assert held == expected
    assert summary["sent_points"] == sum(expected.values())
    with capsys.disabled():
        print(f"\n[outage] server down {times['up'] - times['down']:.0f} s; "
              f"{len(tune.reports)} evaluations, {len(during)} during the outage; "
              f"{sum(expected.values())} points spooled, {summary['sent_points']} sent, "
              f"{summary['dropped_points']} dropped; {left_by_trial} records left when the "
              f"trial ended, {times['trained'] - times['up']:.1f} s after the server was back "
              f"(trained {times['trained'] - times['down']:.0f} s)")
