"""Sending one spool stream to MLflow: resolve the run, send records in order, exactly once.

Metric points are idempotent per (run, key, step): the stream's state keeps the largest step
sent per key, and a point at or below it is skipped (a trial replaying steps from an older
checkpoint re-logs them). When the sender cannot be sure what the server holds (a send that
failed half-way, a crash mid-send, a run found by its tags instead of created) it first reads
the server's largest step per key (``get_metric_history``). Tags, params, statuses and
artifacts are idempotent by nature and are simply re-sent.

A server error that retrying cannot fix (MLflow error codes in :data:`PERMANENT_CODES`) rejects
the records concerned (moved to ``rejected/``, counted, logged); every other error is transient
and propagates, so that the caller backs off and tries again later.
"""

from __future__ import annotations

import base64
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers._spool_store import Stream, discard, read_record, record_kind

log = logging.getLogger(__name__)

PERMANENT_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST",
                             "INVALID_STATE", "BAD_REQUEST"})
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limits
MAX_TAGS_PER_CALL = 100
_BATCHABLE = ("metrics", "tags")


def is_permanent(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in PERMANENT_CODES


def send_stream(stream: Stream, client: Any) -> str:
    """Send a stream's pending records; returns "empty", "pending" (records are left, e.g. when
    more arrived meanwhile), "busy" (another process sends it) or "unresolved" (no identity).

    Raises:
        Exception: whatever transient error the client raised; nothing sent is lost.
    """
    with stream.locked() as mine:
        if not mine:
            return "busy"
        records = stream.pending()
        if not records:
            return "empty"
        state = stream.read_state()
        run_id = _resolve(stream, state, client)
        if run_id is None:
            return "unresolved"
        for group in _groups(records):
            stream.inflight.update(group)
            try:
                _send_group(stream, client, run_id, group, state)
            finally:
                stream.inflight.difference_update(group)
        return "pending" if stream.pending() else "empty"


def _resolve(stream: Stream, state: dict[str, Any], client: Any) -> str | None:
    if state.get("run_id"):
        return state["run_id"]
    ident = stream.identity()
    if ident is None:
        return None
    if "run_id" in ident:
        run_id, existing = ident["run_id"], True
    else:
        spec = ident["create"]
        run_id = _find_run(client, spec)
        existing = run_id is not None
        if run_id is None:
            run = client.create_run(spec["experiment_id"], run_name=spec.get("run_name"),
                                    tags=spec.get("tags") or {})
            run_id = run.info.run_id
            log.info("spool: created MLflow run %s for %s", run_id, stream.key)
    # A run that existed before may already hold points we spooled: ask before sending.
    state.update(run_id=run_id, unsure=existing, synced=[], unknown=[])
    stream.write_state(state)
    return run_id


def _find_run(client: Any, spec: dict[str, Any]) -> str | None:
    match = spec.get("match_tags") or {}
    filter_string = " and ".join(f"tags.`{k}` = '{v}'" for k, v in sorted(match.items()))
    found = client.search_runs([spec["experiment_id"]], filter_string=filter_string,
                               max_results=1)
    return found[0].info.run_id if found else None


def _groups(records: list[Path]) -> Iterator[list[Path]]:
    """Consecutive metrics/tags records form one group (sent with log_batch); every other
    record is a group of its own. Order is kept."""
    group: list[Path] = []
    for path in records:
        if record_kind(path) in _BATCHABLE:
            group.append(path)
            continue
        if group:
            yield group
            group = []
        yield [path]
    if group:
        yield group


def _send_group(stream: Stream, client: Any, run_id: str, group: list[Path],
                state: dict[str, Any]) -> None:
    docs = [(path, doc) for path in group if (doc := read_record(path)) is not None]
    if not docs:
        return
    kind = docs[0][1]["kind"]
    try:
        if kind in _BATCHABLE:
            n_points = _send_batch(client, run_id, [doc for _, doc in docs], state, stream)
        else:
            n_points = 0
            _send_single(client, run_id, docs[0][1], state)
    except Exception as exc:
        if not is_permanent(exc):
            raise
        _reject(stream, [path for path, _ in docs], exc)
        state["rejected_records"] = state.get("rejected_records", 0) + len(docs)
        stream.write_state(state)
        return
    state["sent_points"] = state.get("sent_points", 0) + n_points
    state["sent_records"] = state.get("sent_records", 0) + len(docs)
    stream.write_state(state)  # the watermark first: a crash before discard re-sends nothing
    discard([path for path, _ in docs])


def _send_batch(client: Any, run_id: str, docs: list[dict[str, Any]], state: dict[str, Any],
                stream: Stream) -> int:
    from mlflow.entities import Metric, RunTag

    keys = {p[0] for doc in docs for p in doc.get("points", ())}
    _sync_steps(client, run_id, keys, state, stream)
    steps: dict[str, int] = dict(state["steps"])
    metrics, tags = [], {}
    for doc in docs:
        for key, value, timestamp, step in doc.get("points", ()):
            if step > steps.get(key, -1):
                metrics.append(Metric(key, float(value), int(timestamp), int(step)))
                steps[key] = int(step)
        tags.update(doc.get("tags") or {})
    tag_list = [RunTag(k, str(v)) for k, v in tags.items()]
    if not metrics and not tag_list:
        return 0
    sent_keys = {m.key for m in metrics}
    # Until the server confirmed every chunk, what it holds of these keys is unknown.
    state["unknown"] = sorted(set(state.get("unknown", [])) | sent_keys)
    stream.write_state(state)
    n_calls = max(-(-len(metrics) // MAX_METRICS_PER_CALL), -(-len(tag_list) // MAX_TAGS_PER_CALL))
    for i in range(n_calls):
        client.log_batch(
            run_id,
            metrics=metrics[i * MAX_METRICS_PER_CALL:(i + 1) * MAX_METRICS_PER_CALL],
            tags=tag_list[i * MAX_TAGS_PER_CALL:(i + 1) * MAX_TAGS_PER_CALL],
        )
    state.update(steps=steps, unknown=sorted(set(state["unknown"]) - sent_keys),
                 synced=sorted(set(state.get("synced", [])) | sent_keys))
    return len(metrics)


def _sync_steps(client: Any, run_id: str, keys: set[str], state: dict[str, Any],
                stream: Stream) -> None:
    """Take the server's largest step of each key whose server state is unknown: keys of a
    send that may have failed half-way, and (``unsure``: a run this stream did not create)
    every key not checked yet."""
    unknown, synced = set(state.get("unknown", [])), set(state.get("synced", []))
    todo = sorted(k for k in keys if k in unknown or (state.get("unsure") and k not in synced))
    for key in todo:
        history = client.get_metric_history(run_id, key)
        if history:
            top = max(int(m.step) for m in history)
            state["steps"][key] = max(state["steps"].get(key, -1), top)
    if todo:
        state.update(synced=sorted(synced | set(todo)), unknown=sorted(unknown - set(todo)))
        stream.write_state(state)


def _send_single(client: Any, run_id: str, doc: dict[str, Any], state: dict[str, Any]) -> None:
    from mlflow.entities import Param, RunTag

    kind = doc["kind"]
    if kind == "params":
        params = [Param(k, str(v)) for k, v in doc["params"].items()]
        for i in range(0, len(params), MAX_TAGS_PER_CALL):
            client.log_batch(run_id, params=params[i:i + MAX_TAGS_PER_CALL])
    elif kind == "status":
        if doc.get("tags"):
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in doc["tags"].items()])
        if doc["status"] == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, doc["status"])
        state["status"] = doc["status"]
    elif kind == "artifact":
        _send_artifact(client, run_id, doc)
    else:
        raise AssertionError(kind)


def _send_artifact(client: Any, run_id: str, doc: dict[str, Any]) -> None:
    directory, _, name = doc["artifact_file"].rpartition("/")
    with tempfile.TemporaryDirectory(prefix="klstudy-spool-") as tmp:
        local = Path(tmp) / name
        local.write_bytes(base64.b64decode(doc["data"]))
        client.log_artifact(run_id, str(local), artifact_path=directory or None)


def _reject(stream: Stream, paths: list[Path], exc: BaseException) -> None:
    rejected = stream.path / "rejected"
    rejected.mkdir(exist_ok=True)
    for path in paths:
        try:
            os.replace(path, rejected / path.name)
        except FileNotFoundError:
            pass
    log.warning("spool: MLflow rejected %d record(s) of %s (kept in %s): %s",
                len(paths), stream.key, rejected, exc)
