"""Opening an MLflow tracking store, and creating a fresh sqlite one safely.

MLflow creates an sqlite store by running its Alembic migrations in place, and those are not
safe to run twice at once: a second process (a notebook, ``klstudy ui``, a watcher) opening the
file while the study creates it fails with ``table … already exists`` / ``duplicate column`` /
``Online migration expected …``, and can leave the file half-migrated for good
(``_alembic_tmp_*`` tables; measured in FIELD-NOTES and ``tests/study/test_mlflow_store.py``).

So a new sqlite store is migrated in a private file beside it and then hard-linked into place
(``os.link`` fails instead of replacing one that appeared meanwhile): whoever opens
``mlflow.db`` finds either no file or a fully migrated one, and never migrates it. klstudy's
own processes also serialise on ``<db>.lock`` while they create or first open a store. A store
that another program is still creating is waited for; one it left broken gets a clear error.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from study._status import StudyError
from workers._secrets import redact_url

log = logging.getLogger(__name__)
_RACE_MARKERS = ("already exists", "duplicate column", "online migration expected",
                 "database is locked", "no such table")
WAIT_FOR_OTHER_S = 60.0  # how long another program's migration of the same file is waited for


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of an ``sqlite:///…`` tracking URI (None for other stores and in-memory)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def _creation_lock(db: Path) -> Iterator[None]:
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _connect(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.search_experiments(max_results=1)  # forces the store (and any migrations)
    return client


def _create_atomically(db: Path) -> None:
    """Migrate a private file, then hard-link it to ``db`` unless ``db`` appeared meanwhile."""
    # unique per call: MLflow caches a store per URI in this process, and a second store
    # created here (run --overwrite) would reuse the cached one of a deleted file
    private = db.with_name(f".{db.name}.init-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    private.unlink(missing_ok=True)
    try:
        _connect(f"sqlite:///{private}")
        try:
            os.link(private, db)
        except FileExistsError:
            log.info("MLflow store %s appeared while it was being created; using it", db)
    finally:
        private.unlink(missing_ok=True)


def client_for(tracking_uri: str) -> Any:
    """An ``MlflowClient`` whose store is ready; a missing sqlite store is created atomically.

    Raises:
        StudyError: the store is still not usable after another program's migration of it was
            waited for ``WAIT_FOR_OTHER_S`` (e.g. it left the file half-migrated).
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        return _connect(tracking_uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with _creation_lock(db):
        if not db.exists():
            _create_atomically(db)
        deadline = time.monotonic() + WAIT_FOR_OTHER_S
        while True:
            try:
                return _connect(tracking_uri)
            except Exception as exc:  # sqlalchemy OperationalError, wrapped by MLflow
                first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                if any(m in first.lower() for m in _RACE_MARKERS) and (
                        time.monotonic() < deadline):
                    log.info("MLflow store %s busy (%s); waiting", db, first[:200])
                    time.sleep(1.0)
                    continue
                raise StudyError(
                    f"tracking.uri: the MLflow store {redact_url(tracking_uri)!r} is not usable "
                    f"({first}). If another program created it at the same moment it may be "
                    "half-migrated: if nothing has been recorded in it yet, delete "
                    f"{str(db)!r} and run again; otherwise restore it from a backup") from None


__all__ = ["client_for", "sqlite_path"]
