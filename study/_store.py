"""The study directory: where everything needed to resume and report a study lives.

    <study_dir>/
      study.json              name, resolved spec, tracking URI, MLflow ids, status, times
      spec.yaml               the spec as given
      tune/                   Ray Tune experiment storage (Tuner.restore reads it)
      optuna.db               Optuna storage (unless the spec names an RDB URL)
      mlflow.db, mlartifacts/ the embedded MLflow store (unless a tracking URI is given)
      evaluations/part-*.parquet, latents/part-*.parquet, trials.parquet   (workers._records)
      .lock                   held (flock) by the one driver running the study; says who
      secrets.json            0600: URLs with credentials, when the spec or CLI gave such URLs
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
STUDY_FILE = "study.json"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StudyDir:
    root: Path

    @property
    def meta_file(self) -> Path:
        return self.root / STUDY_FILE

    @property
    def tune_dir(self) -> Path:
        return self.root / "tune"

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.root / 'optuna.db'}"

    @property
    def mlflow_url(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "mlartifacts"

    def exists(self) -> bool:
        return self.meta_file.is_file()

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta_file.read_text())

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.meta_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.meta_file)

    def update_meta(self, **changes: Any) -> dict[str, Any]:
        meta = self.read_meta()
        meta.update(changes)
        self.write_meta(meta)
        return meta


LOCK_FILE = ".lock"


class StudyLocked(RuntimeError):
    """Another process holds the study directory's lock; ``holder`` says who."""

    def __init__(self, holder: dict[str, Any]) -> None:
        super().__init__(describe_holder(holder))
        self.holder = holder


def describe_holder(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"({holder.get('command', '?')}, since {holder.get('since', '?')})")


class StudyLock:
    """An exclusive ``flock`` on ``<study_dir>/.lock``, held while a driver runs the study.

    The kernel drops the lock when the holder dies, however it dies, so a killed driver never
    leaves a stale lock. The file records the holder (pid, host, command, since) for messages.
    """

    def __init__(self, sd: StudyDir, command: str) -> None:
        self.path = sd.root / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> StudyLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StudyLocked(_read_holder(self.path)) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": now_iso()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StudyLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def lock_holder(sd: StudyDir) -> dict[str, Any] | None:
    """Who holds the study's lock now, or None (tries the lock without keeping it)."""
    path = sd.root / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(path) or {"pid": "?"}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_parts(folder: Path, columns: list[str]) -> Iterator[pa.Table]:
    """``columns`` of each finished part in ``folder``, in order; a part being written
    (``part-*.tmp``) is never read and a damaged one is skipped with a warning."""
    for part in sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []:
        try:
            yield pq.read_table(part, columns=columns)
        except Exception as exc:
            log.warning("skipping unreadable %s (%s)", part, exc)


class PartWriter:
    """Appends row batches as numbered Parquet files: readable while the study runs.

    Each part is written to a temporary name and renamed, so readers never see half a file.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        existing = sorted(directory.glob("part-*.parquet"))
        self._next = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0

    def write(self, rows: list[dict[str, Any]]) -> Path | None:
        if not rows:
            return None
        path = self.directory / f"part-{self._next:06d}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
        self._next += 1
        return path


def write_table(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Rewrite a small Parquet table atomically (e.g. trials.parquet)."""
    if rows:
        table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    else:
        table = pa.table({c: pa.array([], pa.string()) for c in columns})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class Throttle:
    """True at most once per ``interval_s`` seconds."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            return True
        return False
