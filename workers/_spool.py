"""A bounded on-disk spool for MLflow writes: training appends, a background thread sends.

Every write (metric points, tags, params, a run status, a small artifact) is appended as a
record file under ``directory/<key>/`` and returns at once, whatever MLflow is doing: it
survives the death of the process as soon as it returns, and is flushed to the device within
a second (``workers._spool_store.SYNC_EVERY_S``; a status at once).
A thread sends the records in order (``log_batch`` of ≤ 1,000 points) while the server answers
and backs off (0.5 s doubling to 15 s) while it does not; records survive the process, so a
new :class:`Spool` on the same directory, or :func:`drain_spools` at the end of a study, sends
what an earlier one left. Points are idempotent per (run, key, step), see
:mod:`workers._spool_send`; the stream files are described in :mod:`workers._spool_store`.

Bound: each stream holds at most ``max_bytes`` (50 MB) of unsent records. When an append
would pass it, the oldest metric records are dropped until the stream is at 80% of the bound
(newest evaluations kept; tags, params and statuses never dropped), the drop is logged and
counted, and the run gets the tag ``klstudy.spool_dropped_points``. Nothing here raises because
MLflow is down.

A stream's run is either known (``attach(run_id)``, or any method given a run id as key) or
described (``define_run(key, …)``): the sender then finds it by its ``match_tags`` or creates
it, exactly once, when the server first answers, so training can start during an outage.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workers._spool_send import send_stream
from workers._spool_store import Stream, looks_like_run_id, trial_key

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 50_000_000  # per stream (one trial's run)
EVICT_TO_SHARE = 0.8  # on overflow, drop the oldest metric records down to this share
MIN_BACKOFF_S, MAX_BACKOFF_S = 0.5, 15.0
IDLE_POLL_S = 5.0  # an idle sender looks again this often (other writers may append)
_TERMINAL = ("FINISHED", "FAILED", "KILLED")

__all__ = ["DEFAULT_MAX_BYTES", "Spool", "drain_spools", "shared_spool", "trial_key"]


class Spool:
    """Durable, bounded, asynchronous MLflow writes for the runs under one directory.

    Args:
        directory: the spool root (one sub-directory per run stream).
        tracking_uri: the MLflow tracking URI records are sent to.
        max_bytes: bound of unsent records per stream.
        client: an ``MlflowClient``-like object (default: one for ``tracking_uri``, made lazily).
        start: start the background sender (False: send only in :meth:`send_pending`/flush).
        durable: flush records to the device (within ``SYNC_EVERY_S``), state files at once.
    """

    def __init__(self, directory: str | os.PathLike[str], tracking_uri: str, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, client: Any = None, start: bool = True,
                 durable: bool = True) -> None:
        self.root = Path(directory)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self.max_bytes = max_bytes
        self.durable = durable
        self._client = client
        self._writer = f"{os.getpid()}{os.urandom(3).hex()}"
        self._streams: dict[str, Stream] = {}  # streams to send (finished, emptied ones leave)
        self._known: set[str] = set()  # every stream this spool wrote to or adopted
        self._sizes: dict[str, int] = {}
        self._dropped: dict[str, list[int]] = {}  # key -> [records, points]
        self._cond = threading.Condition()
        self._wake = self._closed = self._backing_off = False
        self._down_since: float | None = None
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="klstudy-spool", daemon=True)
            self._thread.start()

    # --- runs ----------------------------------------------------------------------------------
    def define_run(self, key: str, *, experiment_id: str, run_name: str,
                   tags: Mapping[str, str], match_tags: Mapping[str, str]) -> str:
        """Describe the run of stream ``key``: found by ``match_tags`` or created (with
        ``tags``) by the sender; returns ``key``."""
        self._stream(key).set_identity({"create": {
            "experiment_id": str(experiment_id), "run_name": run_name, "tags": dict(tags),
            "match_tags": dict(match_tags)}})
        return key

    def attach(self, run_id: str, *, key: str | None = None) -> str:
        """Stream writes to an existing MLflow run; returns the stream key (``run_id``)."""
        key = key or run_id
        self._stream(key).set_identity({"run_id": run_id})
        return key

    def run_id(self, key: str) -> str | None:
        """The MLflow run id of stream ``key`` once the sender resolved it (never blocks)."""
        return self._stream(key).read_state().get("run_id")

    # --- writes (each returns at once) ---------------------------------------------------------
    def log_metrics(self, key: str, metrics: Mapping[str, float], *, step: int,
                    timestamp_ms: int | None = None) -> None:
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        points = [[k, float(v), now, int(step)] for k, v in metrics.items()]
        if points:
            self._append(key, "metrics", {"points": points})

    def set_tags(self, key: str, tags: Mapping[str, Any]) -> None:
        if tags:
            self._append(key, "tags", {"tags": {k: str(v) for k, v in tags.items()}})

    def log_params(self, key: str, params: Mapping[str, Any]) -> None:
        if params:
            self._append(key, "params", {"params": {
                k: "None" if v is None else str(v) for k, v in params.items()}})

    def set_status(self, key: str, status: str, *, tags: Mapping[str, Any] | None = None) -> None:
        """Set the run's MLflow status (RUNNING, or terminal: FINISHED, FAILED, KILLED), with
        ``tags`` set just before it."""
        if status != "RUNNING" and status not in _TERMINAL:
            raise ValueError(f"spool: status must be RUNNING or one of {_TERMINAL}, "
                             f"got {status!r}")
        self._append(key, "status", {"status": status,
                                     "tags": {k: str(v) for k, v in (tags or {}).items()}})

    def terminate(self, key: str, status: str = "FINISHED", *,
                  tags: Mapping[str, Any] | None = None) -> None:
        """End the run (``set_terminated``) with ``status`` after everything spooled before."""
        if status not in _TERMINAL:
            raise ValueError(f"spool: terminal status must be one of {_TERMINAL}, got {status!r}")
        self.set_status(key, status, tags=tags)

    def log_artifact_bytes(self, key: str, data: bytes, artifact_file: str) -> None:
        """A small artifact (``artifact_file`` like ``latents/step_0000100.png``)."""
        self._append(key, "artifact", {"artifact_file": artifact_file,
                                       "data": base64.b64encode(data).decode()})

    def log_dict(self, key: str, obj: Any, artifact_file: str) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str)
        self.log_artifact_bytes(key, text.encode(), artifact_file)

    # --- sending -------------------------------------------------------------------------------
    def send_pending(self) -> bool:
        """One pass over this spool's streams in the calling thread; True when nothing is left.

        Raises nothing: a failure is logged and left for the next pass."""
        ok = True
        for key, stream in list(self._streams.items()):
            try:
                stream.sync()
                outcome = send_stream(stream, self.client)
            except Exception as exc:
                self._note_down(exc)
                return False
            ok = ok and outcome == "empty"
            with self._cond:
                self._sizes[key] = stream.size_bytes()
                if outcome == "empty" and stream.read_state().get("status") in _TERMINAL:
                    self._forget(key)  # a finished run: stop scanning it (a write re-adds it)
        self._note_up()
        return ok

    def _forget(self, key: str) -> None:
        if not self._streams[key].pending():  # nothing arrived since the pass
            del self._streams[key]
            self._sizes.pop(key, None)

    def pending_records(self) -> int:
        return sum(len(s.pending()) for s in list(self._streams.values()))

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every record to be sent; True if none is left."""
        deadline = time.monotonic() + timeout_s
        if self._thread is None or not self._thread.is_alive():
            while not self.send_pending() and time.monotonic() < deadline:
                time.sleep(min(MIN_BACKOFF_S, max(0.0, deadline - time.monotonic())))
            return self.pending_records() == 0
        with self._cond:
            self._wake = True
            self._cond.notify_all()
        while self.pending_records():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._cond:
                self._cond.wait(min(0.05, remaining))
        return True

    def close(self, timeout_s: float = 0.0) -> bool:
        """Flush for up to ``timeout_s``, then stop the sender; what is left stays on disk."""
        flushed = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        with _SHARED_LOCK:
            for k, v in list(_SHARED.items()):
                if v is self:
                    del _SHARED[k]
        return flushed

    def adopt_all(self) -> int:
        """Take on every stream under the directory (what :func:`drain_spools` sends)."""
        for path in sorted(self.root.iterdir()):
            if path.is_dir() and not path.name.startswith("."):
                self._stream(path.name)
        return len(self._known)

    def summary(self) -> dict[str, Any]:
        """Counts over the streams this spool wrote to or adopted (what every sender of them
        recorded in their state)."""
        out: dict[str, Any] = {"streams": len(self._known), "pending_records": 0,
                               "sent_points": 0, "sent_records": 0, "rejected_records": 0,
                               "dropped_points": 0, "unresolved": [], "running": []}
        for key in sorted(self._known):
            stream = self._streams.get(key) or Stream(self.root, key, writer=self._writer)
            state, n_pending = stream.read_state(), len(stream.pending())
            out["pending_records"] += n_pending
            for name in ("sent_points", "sent_records", "rejected_records"):
                out[name] += state.get(name, 0)
            out["dropped_points"] += _dropped_points(stream)
            if n_pending and not state.get("run_id"):
                out["unresolved"].append(key)
            if state.get("status") == "RUNNING":
                out["running"].append(key)
        return out

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # --- internals -----------------------------------------------------------------------------
    def _stream(self, key: str) -> Stream:
        stream = self._streams.get(key)
        if stream is None:
            if not key or key.startswith(".") or "/" in key:
                raise ValueError(f"spool: a stream key is a plain file name, got {key!r}")
            stream = Stream(self.root, key, writer=self._writer, durable=self.durable)
            if stream.identity() is None and looks_like_run_id(key):
                stream.set_identity({"run_id": key})
            with self._cond:
                self._streams[key] = stream
                self._known.add(key)
                self._sizes[key] = stream.size_bytes()
        return stream

    def _append(self, key: str, kind: str, body: dict[str, Any]) -> None:
        stream = self._stream(key)
        size = len(json.dumps(body)) + 64
        if self._sizes.get(key, 0) + size > self.max_bytes and not self._make_room(stream, size):
            if kind in ("metrics", "artifact"):
                self._count_drop(stream, 1, len(body.get("points", ())))
                return
        stream.append(kind, body)
        with self._cond:
            self._sizes[key] = self._sizes.get(key, 0) + size
            if not self._backing_off:
                self._cond.notify_all()

    def _make_room(self, stream: Stream, size: int) -> bool:
        """Evict the oldest metric records; True when ``size`` more bytes then fit."""
        target = max(0, int(self.max_bytes * EVICT_TO_SHARE) - size)
        records, points = stream.evict_oldest_metrics(target)
        if records:
            self._count_drop(stream, records, points)
        with self._cond:
            self._sizes[stream.key] = stream.size_bytes()
            return self._sizes[stream.key] + size <= self.max_bytes

    def _count_drop(self, stream: Stream, records: int, points: int) -> None:
        counts = self._dropped.setdefault(stream.key, [0, 0])
        counts[0] += records
        counts[1] += points
        log.warning("spool %s is full (%d bytes): dropped the %d oldest record(s) (%d points); "
                    "%d records, %d points dropped so far, the newest kept", stream.path,
                    self.max_bytes, records, points, counts[0], counts[1])
        (stream.path / f"dropped-{self._writer}.json").write_text(json.dumps(
            {"records": counts[0], "points": counts[1]}))
        stream.append("tags", {"tags": {"klstudy.spool_dropped_points": str(counts[1])}})

    def _loop(self) -> None:
        delay = 0.0
        while True:
            with self._cond:
                if not self._wake and not self._closed:
                    self._cond.wait(timeout=delay or IDLE_POLL_S)
                if self._closed:
                    return
                self._wake = False
            ok = self.send_pending()
            delay = 0.0 if ok else min(max(2 * delay, MIN_BACKOFF_S), MAX_BACKOFF_S)
            with self._cond:
                self._backing_off = not ok
                self._cond.notify_all()  # flush() waiters re-check

    def _note_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("spool: MLflow at %s did not take records (%s: %s); they stay in %s "
                        "and are sent when it answers", self.tracking_uri,
                        type(exc).__name__, str(exc)[:300], self.root)

    def _note_up(self) -> None:
        if self._down_since is not None:
            log.warning("spool: MLflow at %s answers again after %.0f s", self.tracking_uri,
                        time.monotonic() - self._down_since)
            self._down_since = None


def _dropped_points(stream: Stream) -> int:
    total = 0
    for path in stream.path.glob("dropped-*.json"):
        try:
            total += int(json.loads(path.read_text()).get("points", 0))
        except (OSError, ValueError):
            continue
    return total


_SHARED: dict[tuple[str, str], Spool] = {}
_SHARED_LOCK = threading.Lock()


def shared_spool(directory: str | os.PathLike[str], tracking_uri: str) -> Spool:
    """The process-wide spool of ``(directory, tracking_uri)`` (one sender thread per process,
    also across the trials a reused Ray actor runs)."""
    key = (str(Path(directory).resolve()), tracking_uri)
    with _SHARED_LOCK:
        spool = _SHARED.get(key)
        if spool is None or spool._closed:
            spool = _SHARED[key] = Spool(directory, tracking_uri)
        return spool


def drain_spools(root: str | os.PathLike[str], tracking_uri: str, timeout_s: float, *,
                 client: Any = None) -> dict[str, Any]:
    """Send whatever any stream under ``root`` holds, for up to ``timeout_s``.

    Returns :meth:`Spool.summary` plus ``ok`` (nothing left): ``pending_records`` left,
    ``sent_points``/``sent_records``/``rejected_records``/``dropped_points`` over the streams'
    lifetime, ``unresolved`` (keys whose run could not be found or created) and ``running``
    (keys whose last status sent was RUNNING: the caller decides how they ended).
    """
    root = Path(root)
    if not root.is_dir():
        return {"ok": True, "streams": 0, "pending_records": 0, "sent_points": 0,
                "sent_records": 0, "rejected_records": 0, "dropped_points": 0,
                "unresolved": [], "running": []}
    spool = Spool(root, tracking_uri, client=client)
    try:
        spool.adopt_all()
        ok = spool.flush(timeout_s)
        return {"ok": ok, **spool.summary()}
    finally:
        spool.close(0.0)
