"""Creating the embedded sqlite MLflow store while other processes open it.

MLflow's migrations are not safe to run twice at once (FIELD-NOTES): four plain
``MlflowClient``s opening one fresh sqlite file together fail in most rounds here (``table runs
already exists``, ``duplicate column name: step``) and can leave ``_alembic_tmp_*`` tables
behind for good. ``study._mlflow_store.client_for`` creates the store in a private file and
links it into place; these tests open it from several real processes at once.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from study._mlflow_store import client_for, sqlite_path
from study._status import StudyError

SPEC = {
    "name": "storerace",
    "model": {"kind": "toy"},
    "data": {"kind": "toy"},
    "train": {"total_steps": 200, "eval_every_steps": 100, "iw_samples": 0},
    "schedule": {"n_cycles": [1], "ratio": [0.5]},
    "seeds": [0],
    "pruning": {"pruner": "none"},
    "resources": {"cpus_per_trial": 1},
}

# A notebook or watcher: no klstudy code, plain MLflow, opens the store as soon as it exists.
WATCHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mlflow.tracking import MlflowClient
    db, until = Path(sys.argv[1]), time.time() + float(sys.argv[2])
    while not db.exists() and time.time() < until:
        time.sleep(0.005)
    ok = errors = 0
    while time.time() < until:
        try:
            MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
            ok += 1
        except Exception as exc:
            errors += 1
            print("watcher error:", str(exc).splitlines()[0][:200], flush=True)
        time.sleep(0.2)
    print(f"watcher ok={ok} errors={errors}", flush=True)
""")


def _open(args: tuple[str, float]) -> str:
    uri, start_at = args
    while time.time() < start_at:  # all processes call client_for at the same moment
        pass
    try:
        client_for(uri).search_experiments(max_results=1)
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def test_sqlite_path() -> None:
    assert sqlite_path("sqlite:////tmp/x/mlflow.db") == Path("/tmp/x/mlflow.db")
    assert sqlite_path("sqlite:///rel.db?timeout=5") == Path("rel.db")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("http://127.0.0.1:5000") is None


@pytest.mark.slow
def test_processes_creating_one_fresh_store_at_once_all_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(_open, [(f"sqlite:///{tmp_path / 'warm.db'}", 0.0)] * 4)  # imports done
        for round_ in range(3):
            uri = f"sqlite:///{tmp_path / f'round{round_}' / 'mlflow.db'}"
            outcomes = pool.map(_open, [(uri, time.time() + 1.5)] * 4)
            assert outcomes == ["ok"] * 4, (round_, outcomes)
            tables = {r[0] for r in sqlite3.connect(sqlite_path(uri)).execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert "runs" in tables and not any(t.startswith("_alembic_tmp") for t in tables)
            assert not list((tmp_path / f"round{round_}").glob(".mlflow.db.init-*"))


@pytest.mark.slow
def test_a_study_starts_while_watchers_open_its_store(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    study_dir = tmp_path / "study"
    watchers = [subprocess.Popen([sys.executable, "-c", WATCHER, str(study_dir / "mlflow.db"),
                                  "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(3)]
    try:
        run = subprocess.run([sys.executable, "-m", "study.cli", "run", str(spec_file),
                              "--study-dir", str(study_dir)], capture_output=True, text=True,
                             timeout=400)
        outputs = [w.communicate(timeout=120)[0] for w in watchers]
    finally:
        for w in watchers:
            w.kill()
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    for out in outputs:
        summary = out.strip().splitlines()[-1]
        assert summary.startswith("watcher ok=") and summary.endswith("errors=0"), out[-2000:]
        assert int(summary.split("ok=")[1].split()[0]) > 0, out[-2000:]


def test_a_store_left_half_migrated_gets_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as conn:  # what an interrupted concurrent migration leaves
        conn.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY)")
    monkeypatch.setattr("study._mlflow_store.WAIT_FOR_OTHER_S", 1.0)
    with pytest.raises(StudyError) as info:
        client_for(f"sqlite:///{db}")
    message = str(info.value)
    assert message.startswith("tracking.uri: the MLflow store") and "half-migrated" in message
    assert str(db) in message and "OperationalError" in message  # the cause, first line
