"""The Tune trainable: first-evaluation checkpoints, final-result replay, deterministic errors
without retry, and MLflow logging through the spool (a real sqlite store; Tune faked)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

import workers._spool as spool_module
import workers._trainable as trainable
from workers import TrialConfig, drain_spools, train_trial, trial_key
from workers._trainable import ERROR_KEY, FINAL_RESULT_FILE, run_trial


class FakeCheckpoint:
    """``tune.Checkpoint``: from_directory persists a copy (as Tune does at report time)."""

    store: Path

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_directory(cls, path: str) -> FakeCheckpoint:
        target = cls.store / f"checkpoint_{len(list(cls.store.glob('checkpoint_*'))):06d}"
        shutil.copytree(path, target)
        return cls(target)

    def to_directory(self, path: str) -> str:
        shutil.copytree(self.path, path)
        return path


class FakeTune:
    """What ``run_trial`` uses of ``ray.tune``: report, get_checkpoint, Checkpoint, and the
    trial's storage (``store``, where reported checkpoints land, as in Tune's trial folder)."""

    def __init__(self, store: Path, restore: FakeCheckpoint | None = None,
                 fail_at_step: int | None = None) -> None:
        store.mkdir(parents=True, exist_ok=True)
        self.Checkpoint = type("Checkpoint", (FakeCheckpoint,), {"store": store})
        self.restore, self.fail_at_step = restore, fail_at_step
        self.reports: list[tuple[dict[str, Any], FakeCheckpoint | None]] = []

    def get_checkpoint(self) -> FakeCheckpoint | None:
        return self.restore

    def get_context(self) -> Any:
        import pyarrow.fs as pafs

        storage = SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(),
                                  trial_fs_path=str(self.Checkpoint.store))
        return SimpleNamespace(get_storage=lambda: storage)

    def report(self, result: dict[str, Any], checkpoint: FakeCheckpoint | None = None) -> None:
        if self.fail_at_step is not None and result.get("step") == self.fail_at_step:
            raise RuntimeError("the worker lost its node")
        self.reports.append((result, checkpoint))

    @property
    def steps(self) -> list[int]:
        return [r["step"] for r, _ in self.reports]


TRIAL = {"total_steps": 60, "eval_every_steps": 10, "n_cycles": 2, "iw_samples": 5,
         "eval_batch_size": 10, "device": "cpu", "num_threads": 1, "trial_id": "t-1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A real MLflow sqlite store (its schema made once for the module)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def study(store, tmp_path, request) -> dict[str, Any]:
    client = MlflowClient(store)
    experiment_id = client.create_experiment(request.node.name[:200],
                                             artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment_id, tags={"klstudy.role": "study"})
    yield {"name": "s", "tracking_uri": store, "experiment_id": experiment_id,
           "parent_run_id": parent.info.run_id, "spool_dir": str(tmp_path / "spool")}
    for spool in list(spool_module._SHARED.values()):  # stop the sender threads of this test
        spool.close(0.0)


def _run(tmp_path: Path, study: dict[str, Any] | None, trial: dict[str, Any] | None = None,
         **tune_kw: Any) -> FakeTune:
    return _run_with(FakeTune(tmp_path / "tune", **tune_kw), study, trial)


def _run_with(tune: FakeTune, study: dict[str, Any] | None,
              trial: dict[str, Any] | None = None) -> FakeTune:
    original = trainable._tune
    trainable._tune = lambda: tune
    try:
        run_trial({"trial": {**TRIAL, **(trial or {})}, "study": study})
    finally:
        trainable._tune = original
    return tune


def _trial_run(study: dict[str, Any]):
    assert drain_spools(study["spool_dir"], study["tracking_uri"], timeout_s=30.0)["ok"]
    runs = MlflowClient(study["tracking_uri"]).search_runs(
        [study["experiment_id"]], filter_string="tags.`klstudy.role` = 'trial'")
    assert len(runs) == 1
    return runs[0]


def _metric_steps(study: dict[str, Any], run_id: str, key: str) -> list[int]:
    history = MlflowClient(study["tracking_uri"]).get_metric_history(run_id, key)
    return sorted(m.step for m in history)


# --- checkpoints -----------------------------------------------------------------------------
def test_the_first_evaluation_is_checkpointed_and_the_trajectory_is_unchanged(tmp_path):
    tune = _run(tmp_path, None)
    assert tune.steps == [10, 20, 30, 40, 50, 60]
    with_ckpt = [r["step"] for r, ckpt in tune.reports if ckpt is not None]
    assert with_ckpt == [10, 60]  # the first evaluation, then every 30 s, and the last
    straight = train_trial(TrialConfig(**TRIAL))
    for (result, _), ev in zip(tune.reports, straight.evaluations, strict=True):
        assert {k: v for k, v in result.items() if "/" in k} == ev.flat()


def test_a_restore_from_an_intermediate_checkpoint_trains_on_from_it(tmp_path):
    first = _run(tmp_path / "a", None)
    tune = _run(tmp_path / "b", None, restore=first.reports[0][1])  # the step-10 checkpoint
    assert tune.steps == [20, 30, 40, 50, 60]
    assert [r for r, _ in tune.reports] == [r for r, _ in first.reports[1:]]


def test_the_final_checkpoint_holds_the_final_result(tmp_path):
    tune = _run(tmp_path, None)
    result, ckpt = tune.reports[-1]
    assert result["final"] and (ckpt.path / FINAL_RESULT_FILE).is_file()
    assert not (tune.reports[0][1].path / FINAL_RESULT_FILE).exists()


def test_a_worker_restored_from_the_final_checkpoint_re_reports_instead_of_training(
        tmp_path, study):
    first = _run(tmp_path / "a", study)
    final, ckpt = first.reports[-1]
    again = _run(tmp_path / "b", study, restore=ckpt)
    assert again.steps == first.steps  # re-reported, not trained (below)
    assert all(r["replayed"] and c is None for r, c in again.reports)
    assert [r["final"] for r, _ in again.reports] == [False] * 5 + [True]
    for (shown, _), (trained, _) in zip(again.reports, first.reports, strict=True):
        assert {k: v for k, v in shown.items() if "/" in k} == {
            k: v for k, v in trained.items() if "/" in k}
    replayed, new_ckpt = again.reports[-1]
    assert {k: v for k, v in replayed.items() if "/" in k} == {
        k: v for k, v in final.items() if "/" in k}
    run = _trial_run(study)
    assert run.info.status == "FINISHED" and run.data.tags["klstudy.status"] == "completed"
    assert replayed["mlflow_run_id"] in ("", run.info.run_id)


def test_a_final_checkpoint_tune_never_registered_is_found_in_storage(tmp_path, study):
    """The driver died after the final checkpoint reached the trial folder and before it saved
    its state: Tune restores the step-10 checkpoint (or none); the trial is not trained again."""
    first = _run(tmp_path, study)
    final = first.reports[-1][0]
    for restore in (first.reports[0][1], None):
        again = _run_with(FakeTune(tmp_path / "tune", restore=restore), study)
        # every evaluation the trial's worker reported, again (the driver that was killed may
        # have lost the rows of those after the checkpoint it registered), none trained
        assert again.steps == [10, 20, 30, 40, 50, 60], again.steps
        assert all(r["replayed"] for r, _ in again.reports)
        replayed = again.reports[-1][0]
        assert replayed["final"] and replayed["step"] == final["step"] == 60
        assert {k: v for k, v in replayed.items() if "/" in k} == {
            k: v for k, v in final.items() if "/" in k}
    run = _trial_run(study)
    assert run.info.status == "FINISHED" and run.data.tags["klstudy.status"] == "completed"


def test_a_half_copied_final_result_in_storage_means_training_on(tmp_path):
    first = _run(tmp_path, None)
    final_ckpt = first.reports[-1][1].path
    (final_ckpt / FINAL_RESULT_FILE).write_text('{"final": tr')
    again = _run_with(FakeTune(tmp_path / "tune", restore=first.reports[0][1]), None)
    assert again.steps == [20, 30, 40, 50, 60]


# --- MLflow through the spool ----------------------------------------------------------------
def test_a_completed_trial_has_one_finished_run_with_every_evaluation_once(tmp_path, study):
    tune = _run(tmp_path, study)
    run = _trial_run(study)
    assert run.info.status == "FINISHED"
    assert run.data.tags["klstudy.status"] == "completed"
    assert run.data.tags["klstudy.trial_id"] == "t-1"
    assert run.data.tags["mlflow.parentRunId"] == study["parent_run_id"]
    assert run.data.params["n_cycles"] == "2"
    assert _metric_steps(study, run.info.run_id, "valid/elbo") == tune.steps
    assert _metric_steps(study, run.info.run_id, "test/elbo") == [60]
    artifacts = {a.path for a in MlflowClient(study["tracking_uri"]).list_artifacts(
        run.info.run_id)}
    assert {"config.json", "latents"} <= artifacts


def test_a_retried_trial_reuses_its_run_and_logs_no_step_twice(tmp_path, study):
    tune = FakeTune(tmp_path / "a", fail_at_step=40)
    with pytest.raises(RuntimeError):
        _run_with(tune, study)
    restore = tune.reports[0][1]  # Tune retries from the last checkpoint: step 10
    again = _run(tmp_path / "b", study, restore=restore)
    assert again.steps == [20, 30, 40, 50, 60]  # 20 and 30 are replayed
    run = _trial_run(study)
    assert run.info.status == "FINISHED"
    for key in ("valid/elbo", "train/loss"):
        assert _metric_steps(study, run.info.run_id, key) == [10, 20, 30, 40, 50, 60]


@pytest.mark.timeout(120)
def test_training_never_waits_on_a_server_that_hangs(tmp_path, study, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")  # each call would hang 10 min
    with socket.socket() as hanging:  # takes connections into its backlog, never answers
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(64)
        down = {**study, "tracking_uri": f"http://127.0.0.1:{hanging.getsockname()[1]}"}
        tune = _run(tmp_path, down)
        assert tune.steps == [10, 20, 30, 40, 50, 60]  # every evaluation reported, none waited
        assert all(r["mlflow_run_id"] == "" for r, _ in tune.reports)
        key = Path(study["spool_dir"]) / trial_key("t-1")
        assert len(list(key.glob("r-*.json"))) >= 6  # the writes wait on disk
    run = _trial_run(study)  # drained into the store once one answers
    assert run.info.status == "FINISHED"
    assert _metric_steps(study, run.info.run_id, "valid/elbo") == tune.steps


def test_a_finished_run_restored_from_an_older_checkpoint_trains_on_and_stays_clean(
        tmp_path, study):
    first = _run(tmp_path / "a", study)  # completed, but Tune's state kept the step-10 one
    assert _trial_run(study).info.status == "FINISHED"
    again = _run(tmp_path / "b", study, restore=first.reports[0][1])
    assert again.steps == [20, 30, 40, 50, 60] and not again.reports[-1][0].get("replayed")
    run = _trial_run(study)
    assert run.info.status == "FINISHED" and run.data.tags["klstudy.status"] == "completed"
    for key in ("valid/elbo", "test/elbo"):
        assert _metric_steps(study, run.info.run_id, key) == (
            first.steps if key == "valid/elbo" else [60])


# --- failures --------------------------------------------------------------------------------
def test_a_non_finite_loss_ends_the_trial_as_an_error_without_raising(tmp_path, study):
    tune = _run(tmp_path, study, trial={"lr": 1e6, "total_steps": 2000,
                                        "eval_every_steps": 1000})
    last = tune.reports[-1][0]
    assert last[ERROR_KEY].startswith("NonFiniteLossError: trial t-1: loss is")
    assert last["final"] is False and last["klstudy_trial_id"] == "t-1"
    run = _trial_run(study)
    assert run.info.status == "FAILED"
    assert run.data.tags["klstudy.status"] == "error"
    assert run.data.tags["klstudy.error"] == last[ERROR_KEY]


def test_a_data_error_ends_the_trial_as_an_error_without_raising(tmp_path, study):
    tune = _run(tmp_path, study, trial={"data": "text", "data_path": str(tmp_path / "none")})
    assert [r[ERROR_KEY] for r, _ in tune.reports] == [
        f"DataError: data.path: not a directory, got {str(tmp_path / 'none')!r}"]
    assert _trial_run(study).info.status == "FAILED"


def test_a_config_error_ends_the_trial_as_an_error_without_raising(tmp_path):
    tune = _run(tmp_path, None, trial={"total_steps": 0})
    assert tune.reports[-1][0][ERROR_KEY].startswith("ConfigError: ")


def test_other_failures_propagate_for_tune_to_retry(tmp_path, study):
    with pytest.raises(RuntimeError, match="lost its node"):
        _run(tmp_path, study, fail_at_step=30)
    run = _trial_run(study)
    assert run.info.status == "RUNNING"  # Tune retries it; the driver records how it ends
    assert run.data.tags["klstudy.last_error"] == "RuntimeError: the worker lost its node"

