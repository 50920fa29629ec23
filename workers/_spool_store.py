"""The files of one spool stream: durable records, the sender's state, a lock, the size bound.

A stream is a directory ``root/<key>/`` holding the writes for one MLflow run:

- ``run.json``: the run's identity, ``{"run_id": …}`` or ``{"create": {experiment_id, run_name,
  tags, match_tags}}`` (found by its ``match_tags``, created when missing, exactly once);
- ``r-<time_ns>-<writer>-<n>-<kind>.json``: one pending record per append, renamed into place
  (so a reader never sees half a record), flushed to disk within ``SYNC_EVERY_S``; deleted once
  sent. Names sort in append order;
- ``state.json``: what the sender knows: the resolved run id, the largest step sent per metric
  key, counts, and which keys the server may hold more of than that (``unknown`` while a send
  is in flight, so that a crash then means "ask the server"; ``unsure`` for a run found, not
  created);
- ``.lock``: ``flock``-ed by the one process sending the stream.

Several processes may append to one stream (a worker and the driver); one sends at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECORD_GLOB = "r-*.json"
KINDS = ("metrics", "tags", "params", "status", "artifact")
IDENTITY_FILE = "run.json"
# Records are on disk (in the page cache, renamed into place) when ``append`` returns, so they
# survive the death of the process at once; they are flushed to the device at most this long
# after (a status at once), so a machine crash loses at most this much.
SYNC_EVERY_S = 1.0
STATE_FILE = "state.json"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def trial_key(trial_id: str) -> str:
    """The stream key of a trial's run: ``trial-<id>``, made file-name safe (a short hash of
    the original id is appended when characters had to be replaced, so keys never collide)."""
    safe = _UNSAFE.sub("_", trial_id)[:120]
    if safe != trial_id:
        safe += "-" + hashlib.sha1(trial_id.encode()).hexdigest()[:8]
    return f"trial-{safe}"


def looks_like_run_id(key: str) -> bool:
    return bool(_RUN_ID.fullmatch(key))


def _write_durably(path: Path, data: bytes, *, durable: bool) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename), fsync'd when ``durable``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_filesystem(directory: Path) -> None:
    """Flush the file system holding ``directory`` to disk (Linux ``syncfs``, else ``sync``):
    one call for every record written since the last, instead of ~4 ms of fsync per record."""
    if _LIBC is not None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            if _LIBC.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()


def _load_libc() -> Any:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc if hasattr(libc, "syncfs") else None
    except OSError:
        return None


_LIBC = _load_libc()


def record_kind(path: Path) -> str:
    return path.stem.rsplit("-", 1)[-1]


class Stream:
    """One stream directory; appends are thread-safe, sending is guarded by :meth:`locked`."""

    def __init__(self, root: Path, key: str, *, writer: str, durable: bool = True) -> None:
        self.key = key
        self.path = root / key
        self.path.mkdir(parents=True, exist_ok=True)
        self.durable = durable
        self._writer = writer
        self._n = 0
        self._last_ns = 0
        self._lock = threading.Lock()
        self._last_sync = time.monotonic()
        self._unsynced = False
        self.inflight: set[Path] = set()  # records being sent now: never evicted

    # --- identity and state ------------------------------------------------------------------
    def identity(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / IDENTITY_FILE).read_text())
        except FileNotFoundError:
            return None

    def set_identity(self, identity: dict[str, Any]) -> None:
        data = json.dumps(identity, sort_keys=True).encode()
        file = self.path / IDENTITY_FILE
        if not file.is_file() or file.read_bytes() != data:
            _write_durably(file, data, durable=self.durable)

    def read_state(self) -> dict[str, Any]:
        """The sender's state; reset when ``run.json`` changed since it was written."""
        ident = self.identity()
        digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        try:
            state = json.loads((self.path / STATE_FILE).read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        if state.get("identity") != digest:
            state = {"identity": digest, "run_id": None, "steps": {}, "sent_points": 0,
                     "sent_records": 0, "rejected_records": 0, "status": None,
                     "unsure": False, "synced": [], "unknown": []}
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        _write_durably(self.path / STATE_FILE, json.dumps(state, sort_keys=True).encode(),
                       durable=self.durable)

    # --- records -----------------------------------------------------------------------------
    def append(self, kind: str, body: dict[str, Any]) -> Path:
        """Write one record durably; returns its path (names sort in append order)."""
        assert kind in KINDS, kind
        data = json.dumps({"kind": kind, **body}, allow_nan=True).encode()
        with self._lock:
            ns = max(time.time_ns(), self._last_ns + 1)  # monotone even if the clock steps back
            self._last_ns, self._n = ns, self._n + 1
            path = self.path / f"r-{ns:020d}-{self._writer}-{self._n:08d}-{kind}.json"
            _write_durably(path, data, durable=False)
            self._unsynced = True
            due = kind == "status" or time.monotonic() - self._last_sync >= SYNC_EVERY_S
        if due:
            self.sync()
        return path

    def sync(self) -> None:
        """Flush this stream's records written so far to the device (if ``durable``)."""
        if not (self.durable and self._unsynced):
            return
        self._unsynced = False
        self._last_sync = time.monotonic()
        _sync_filesystem(self.path)

    def pending(self) -> list[Path]:
        return sorted(self.path.glob(RECORD_GLOB))

    def size_bytes(self) -> int:
        total = 0
        for path in self.path.glob(RECORD_GLOB):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def evict_oldest_metrics(self, target_bytes: int) -> tuple[int, int]:
        """Delete the oldest metrics records (not those in flight) until the stream holds at
        most ``target_bytes``; returns (records, points) dropped."""
        size, records, points = self.size_bytes(), 0, 0
        for path in self.pending():
            if size <= target_bytes:
                break
            if record_kind(path) != "metrics" or path in self.inflight:
                continue
            try:
                n_bytes = path.stat().st_size
                n_points = len(json.loads(path.read_text()).get("points", ()))
                path.unlink()
            except (FileNotFoundError, ValueError):
                continue
            size, records, points = size - n_bytes, records + 1, points + n_points
        return records, points

    @contextlib.contextmanager
    def locked(self) -> Iterator[bool]:
        """Try to become this stream's sender; yields False when another one is."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            except OSError as exc:  # a file system without locks (some NFS set-ups)
                _warn_no_lock(self.path, exc)
                yield True
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


_NO_LOCK_WARNED: set[str] = set()


def _warn_no_lock(path: Path, exc: OSError) -> None:
    if str(path.parent) not in _NO_LOCK_WARNED:
        _NO_LOCK_WARNED.add(str(path.parent))
        log.warning("spool: cannot lock streams under %s (%s); sending without a lock, so two "
                    "senders of one stream could send a point twice", path.parent, exc)


def read_record(path: Path) -> dict[str, Any] | None:
    """A record's content; None when it vanished (sent or evicted meanwhile) or is unreadable
    (then it is moved aside to ``bad/`` and logged, never retried)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        bad = path.parent / "bad"
        bad.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            os.replace(path, bad / path.name)
        log.warning("spool: unreadable record %s moved to %s", path, bad)
        return None


def discard(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
