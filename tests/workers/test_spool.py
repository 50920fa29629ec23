"""The MLflow spool: durable, bounded, in order, exactly once, never blocking the writer.

MLflow itself is faked here (``FakeClient``: runs in memory, failing on demand); the real
server, stopped and restarted, is in ``tests/study/test_faults_mlflow.py``.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

import workers._spool as spool_module
from workers import Spool, drain_spools, trial_key

URI = "http://127.0.0.1:9"  # never contacted: every test passes a fake client


class FakeClient:
    """The MlflowClient calls the spool makes, on in-memory runs.

    ``fail_next`` calls raise a transient error (as a refused connection does); with
    ``lose_replies`` they first do their work, then raise (the reply was lost).
    """

    def __init__(self, fail_next: int = 0, *, lose_replies: bool = False) -> None:
        self.fail_next, self.lose_replies = fail_next, lose_replies
        self.runs: dict[str, dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()
        self.block: threading.Event | None = None  # set: every call waits for it

    def _call(self, name: str, work: Any) -> Any:
        self.calls[name] += 1
        if self.block is not None:
            self.block.wait()
        if self.fail_next > 0:
            self.fail_next -= 1
            if self.lose_replies:
                work()
            raise MlflowException("API request to http://127.0.0.1:9 failed: connection refused")
        return work()

    def new_run(self, experiment_id: str, tags: dict[str, str]) -> str:
        run_id = f"{len(self.runs):032x}"
        self.runs[run_id] = {"experiment_id": experiment_id, "tags": dict(tags), "params": {},
                             "metrics": [], "status": "RUNNING", "artifacts": {}, "events": []}
        return run_id

    def search_runs(self, experiment_ids: list[str], filter_string: str, max_results: int):
        wanted = dict(re.findall(r"tags\.`([^`]+)` = '([^']*)'", filter_string))

        def work():
            found = [rid for rid, run in self.runs.items()
                     if run["experiment_id"] in experiment_ids
                     and all(run["tags"].get(k) == v for k, v in wanted.items())]
            return [SimpleNamespace(info=SimpleNamespace(run_id=r)) for r in found][:max_results]

        return self._call("search_runs", work)

    def create_run(self, experiment_id: str, run_name: str | None = None, tags=None):
        return self._call("create_run", lambda: SimpleNamespace(
            info=SimpleNamespace(run_id=self.new_run(experiment_id, tags or {}))))

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()):
        def work():
            run = self.runs[run_id]
            run["metrics"].extend(metrics)
            for p in params:
                if run["params"].get(p.key, p.value) != p.value:
                    raise MlflowException("Changing param values is not allowed",
                                          error_code=INVALID_PARAMETER_VALUE)
                run["params"][p.key] = p.value
            run["tags"].update({t.key: t.value for t in tags})
            run["events"].append(("batch", len(metrics), len(tags)))

        return self._call("log_batch", work)

    def get_metric_history(self, run_id: str, key: str):
        return self._call("get_metric_history",
                          lambda: [m for m in self.runs[run_id]["metrics"] if m.key == key])

    def update_run(self, run_id: str, status: str):
        return self._call("update_run", lambda: self._status(run_id, status))

    def set_terminated(self, run_id: str, status: str = "FINISHED"):
        return self._call("set_terminated", lambda: self._status(run_id, status))

    def _status(self, run_id: str, status: str) -> None:
        self.runs[run_id]["status"] = status
        self.runs[run_id]["events"].append(("status", status))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None):
        def work():
            name = Path(local_path).name
            full = f"{artifact_path}/{name}" if artifact_path else name
            self.runs[run_id]["artifacts"][full] = Path(local_path).read_bytes()

        return self._call("log_artifact", work)

    # --- what the tests check ------------------------------------------------------------------
    def points(self, run_id: str) -> Counter[tuple[str, int]]:
        return Counter((m.key, m.step) for m in self.runs[run_id]["metrics"])


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(spool_module, "MIN_BACKOFF_S", 0.01)
    monkeypatch.setattr(spool_module, "MAX_BACKOFF_S", 0.05)


def _define_trial(spool: Spool, trial_id: str = "t0") -> str:
    return spool.define_run(trial_key(trial_id), experiment_id="1", run_name=trial_id,
                            tags={"mlflow.parentRunId": "p", "klstudy.trial_id": trial_id},
                            match_tags={"mlflow.parentRunId": "p", "klstudy.trial_id": trial_id})


def _log_steps(spool: Spool, key: str, steps: range) -> None:
    for step in steps:
        spool.log_metrics(key, {"valid/elbo": -float(step), "train/loss": float(step)}, step=step)


def _only_run(client: FakeClient) -> str:
    assert len(client.runs) == 1, client.runs
    return next(iter(client.runs))


def _exactly_once(client: FakeClient, run_id: str, steps: range) -> None:
    expected = Counter({(k, s): 1 for s in steps for k in ("valid/elbo", "train/loss")})
    assert client.points(run_id) == expected


# --- sending in the background ---------------------------------------------------------------
def test_a_server_that_fails_then_answers_gets_every_point_once(tmp_path):
    client = FakeClient(fail_next=5)
    spool = Spool(tmp_path, URI, client=client)
    key = _define_trial(spool)
    _log_steps(spool, key, range(1, 21))
    spool.terminate(key, "FINISHED", tags={"klstudy.status": "completed"})
    assert spool.flush(10.0)
    spool.close()
    run_id = _only_run(client)
    _exactly_once(client, run_id, range(1, 21))
    assert client.runs[run_id]["status"] == "FINISHED"
    assert client.runs[run_id]["tags"]["klstudy.status"] == "completed"
    assert spool.run_id(key) == run_id


def test_writes_return_while_the_server_hangs(tmp_path):
    client = FakeClient()
    client.block = threading.Event()  # every MLflow call hangs until set
    spool = Spool(tmp_path, URI, client=client)
    key = _define_trial(spool)
    _log_steps(spool, key, range(1, 51))  # returns although the sender is stuck in a call
    spool.terminate(key)
    assert not spool.flush(0.2)
    assert spool.pending_records() == 51
    client.block.set()
    assert spool.flush(10.0)
    spool.close()
    _exactly_once(client, _only_run(client), range(1, 51))


def test_metrics_are_batched_at_most_1000_points_per_call(tmp_path):
    client = FakeClient()
    spool = Spool(tmp_path, URI, client=client, start=False)
    key = _define_trial(spool)
    for step in range(1, 301):
        spool.log_metrics(key, {f"m{i}": float(i) for i in range(10)}, step=step)
    assert spool.send_pending()
    batches = [e for e in client.runs[_only_run(client)]["events"] if e[0] == "batch"]
    assert [n for _, n, _ in batches] == [1000, 1000, 1000]


def test_records_are_sent_in_order_status_last(tmp_path):
    client = FakeClient()
    spool = Spool(tmp_path, URI, client=client, start=False)
    key = _define_trial(spool)
    spool.set_status(key, "RUNNING")
    _log_steps(spool, key, range(1, 4))
    spool.terminate(key, "KILLED", tags={"klstudy.status": "pruned"})
    assert spool.send_pending()
    events = client.runs[_only_run(client)]["events"]
    assert events == [("status", "RUNNING"), ("batch", 6, 0), ("batch", 0, 1),
                      ("status", "KILLED")]


# --- durability and identity -----------------------------------------------------------------
def test_records_outlive_the_spool_object(tmp_path):
    down = FakeClient(fail_next=10**6)
    first = Spool(tmp_path, URI, client=down, start=False)
    key = _define_trial(first)
    _log_steps(first, key, range(1, 11))
    first.log_artifact_bytes(key, b"\x89PNG", "latents/step_0000010.png")
    assert not first.send_pending()
    del first  # the process "dies": only the files remain

    client = FakeClient()
    summary = drain_spools(tmp_path, URI, timeout_s=10.0, client=client)
    run_id = _only_run(client)
    _exactly_once(client, run_id, range(1, 11))
    assert client.runs[run_id]["artifacts"] == {"latents/step_0000010.png": b"\x89PNG"}
    assert summary["ok"] and summary["pending_records"] == 0 and summary["sent_points"] == 20


def test_a_run_is_created_once_even_when_the_create_reply_is_lost(tmp_path):
    client = FakeClient(fail_next=1, lose_replies=True)  # create_run commits, then "fails"
    spool = Spool(tmp_path, URI, client=client, start=False)
    key = _define_trial(spool)
    _log_steps(spool, key, range(1, 3))
    assert not spool.send_pending()
    assert spool.send_pending()
    run_id = _only_run(client)  # found by its tags the second time, not created again
    _exactly_once(client, run_id, range(1, 3))


def test_a_known_run_id_is_a_stream_of_its_own(tmp_path):
    client = FakeClient()
    run_id = client.new_run("1", {})
    spool = Spool(tmp_path, URI, client=client, start=False)
    spool.set_tags(run_id, {"klstudy.status": "finished"})
    spool.terminate(run_id)
    assert spool.send_pending()
    assert client.runs[run_id]["status"] == "FINISHED"
    assert client.runs[run_id]["tags"] == {"klstudy.status": "finished"}


# --- exactly once ----------------------------------------------------------------------------
def test_replayed_steps_are_not_sent_twice(tmp_path):
    client = FakeClient()
    spool = Spool(tmp_path, URI, client=client, start=False)
    key = _define_trial(spool)
    _log_steps(spool, key, range(1, 11))
    assert spool.send_pending()
    _log_steps(spool, key, range(5, 16))  # restarted from an older checkpoint, before sending
    _log_steps(spool, key, range(12, 21))
    assert spool.send_pending()
    _exactly_once(client, _only_run(client), range(1, 21))


def test_a_batch_whose_reply_was_lost_is_not_duplicated(tmp_path):
    client = FakeClient()
    spool = Spool(tmp_path, URI, client=client, start=False)
    key = _define_trial(spool)
    _log_steps(spool, key, range(1, 3))
    assert spool.send_pending()
    client.fail_next, client.lose_replies = 1, True  # the next log_batch commits, then "fails"
    _log_steps(spool, key, range(3, 6))
    assert not spool.send_pending()
    assert spool.send_pending()  # asks the server which steps it holds, sends only the rest
    _exactly_once(client, _only_run(client), range(1, 6))
    assert client.calls["get_metric_history"] == 2  # once per key, only after the doubt


def test_reattaching_to_an_existing_run_skips_the_steps_it_holds(tmp_path):
    client = FakeClient()
    run_id = client.new_run("1", {"mlflow.parentRunId": "p", "klstudy.trial_id": "t0"})
    client.runs[run_id]["metrics"] = [Metric(k, 0.0, 0, s) for s in range(1, 8)
                                      for k in ("valid/elbo", "train/loss")]
    spool = Spool(tmp_path / "fresh", URI, client=client, start=False)  # its spool was lost
    key = _define_trial(spool)
    _log_steps(spool, key, range(4, 13))
    assert spool.send_pending()
    assert _only_run(client) == run_id
    _exactly_once(client, run_id, range(1, 13))


def test_a_rejected_record_is_set_aside_and_the_rest_is_sent(tmp_path):
    client = FakeClient()
    spool = Spool(tmp_path, URI, client=client, start=False)
    key = _define_trial(spool)
    spool.log_params(key, {"lr": 0.1})
    spool.log_params(key, {"lr": 0.2})  # MLflow refuses to change a param
    _log_steps(spool, key, range(1, 3))
    assert spool.send_pending()
    run_id = _only_run(client)
    assert client.runs[run_id]["params"] == {"lr": "0.1"}
    _exactly_once(client, run_id, range(1, 3))
    assert len(list((tmp_path / key / "rejected").iterdir())) == 1
    assert spool.summary()["rejected_records"] == 1


# --- the bound -------------------------------------------------------------------------------
def test_a_full_spool_drops_the_oldest_evaluations_and_says_so(tmp_path, caplog):
    max_bytes = 30_000
    client = FakeClient(fail_next=10**6)
    spool = Spool(tmp_path, URI, client=client, start=False, max_bytes=max_bytes)
    key = _define_trial(spool)
    spool.set_status(key, "RUNNING", tags={"klstudy.status": "running"})
    _log_steps(spool, key, range(1, 501))  # ~130 bytes a record: far more than 30 kB
    spool.terminate(key, "FINISHED")
    size = sum(p.stat().st_size for p in (tmp_path / key).glob("r-*.json"))
    assert size <= max_bytes
    assert "is full" in caplog.text

    client.fail_next = 0
    assert spool.send_pending()
    run_id = _only_run(client)
    sent = client.points(run_id)
    assert max(sent.values()) == 1
    assert ("valid/elbo", 500) in sent and ("valid/elbo", 1) not in sent  # newest kept
    assert client.runs[run_id]["status"] == "FINISHED"  # statuses are never dropped
    dropped = int(client.runs[run_id]["tags"]["klstudy.spool_dropped_points"])
    assert dropped == 2 * 500 - len(sent) == spool.summary()["dropped_points"]


# --- several writers, draining ---------------------------------------------------------------
def test_driver_and_worker_writes_to_one_trial_stream_keep_their_order(tmp_path):
    client = FakeClient()
    worker = Spool(tmp_path, URI, client=client, start=False)
    driver = Spool(tmp_path, URI, client=client, start=False)
    key = _define_trial(worker)
    worker.set_status(key, "RUNNING", tags={"klstudy.status": "running"})
    _log_steps(worker, key, range(1, 4))
    driver.terminate(key, "KILLED", tags={"klstudy.status": "pruned"})  # by key, no run id yet
    summary = drain_spools(tmp_path, URI, timeout_s=10.0, client=client)
    run = client.runs[_only_run(client)]
    assert (run["status"], run["tags"]["klstudy.status"]) == ("KILLED", "pruned")
    assert summary["running"] == [] and summary["streams"] == 1


def test_drain_lists_runs_left_running_and_unresolved_streams(tmp_path):
    client = FakeClient()
    spool = Spool(tmp_path, URI, client=client, start=False)
    key = _define_trial(spool)
    spool.set_status(key, "RUNNING")
    spool.set_tags("not-a-run", {"a": "b"})  # no identity: cannot be sent anywhere
    summary = drain_spools(tmp_path, URI, timeout_s=0.3, client=client)
    assert not summary["ok"]
    assert summary["running"] == [key] and summary["unresolved"] == ["not-a-run"]


def test_drain_of_a_missing_directory_is_a_no_op(tmp_path):
    assert drain_spools(tmp_path / "none", URI, timeout_s=1.0)["ok"]


def test_trial_keys_are_file_names_and_distinct():
    assert trial_key("m2_r0.5_linear_b1.0_s0") == "trial-m2_r0.5_linear_b1.0_s0"
    assert trial_key("a/b") != trial_key("a_b")
    assert "/" not in trial_key("a/b")


def test_a_stream_another_sender_holds_is_left_to_it(tmp_path):
    client = FakeClient()
    spool = Spool(tmp_path, URI, client=client, start=False)
    key = _define_trial(spool)
    _log_steps(spool, key, range(1, 3))
    other = Spool(tmp_path, URI, client=client, start=False)
    other.adopt_all()
    with other._streams[key].locked() as mine:  # another process is sending this stream
        assert mine
        assert not spool.send_pending()
        assert client.runs == {}
    assert spool.send_pending()
    _exactly_once(client, _only_run(client), range(1, 3))


def test_a_finished_stream_written_again_is_sent_again(tmp_path):
    client = FakeClient()
    spool = Spool(tmp_path, URI, client=client, start=False)
    key = _define_trial(spool)
    _log_steps(spool, key, range(1, 3))
    spool.terminate(key, "FINISHED")
    assert spool.send_pending()  # done: the sender stops scanning it
    spool.terminate(key, "KILLED", tags={"klstudy.status": "pruned"})  # e.g. the driver, later
    assert spool.send_pending()
    assert client.runs[_only_run(client)]["status"] == "KILLED"
    assert spool.summary()["streams"] == 1


def test_one_process_shares_one_spool_per_directory(tmp_path):
    a = spool_module.shared_spool(tmp_path, URI)
    try:
        assert spool_module.shared_spool(tmp_path / ".", URI) is a
        assert spool_module.shared_spool(tmp_path, "sqlite:///other.db") is not a
    finally:
        for spool in list(spool_module._SHARED.values()):
            spool.close(0.0)
