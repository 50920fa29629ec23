"""klstudy status: what it prints for a study that nothing drives, and for one in use."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from study._status import study_status
from study._store import StudyDir, StudyLock
from study.cli import main


def make_study(root: Path, statuses: list[str], *, status: str = "interrupted") -> StudyDir:
    sd = StudyDir(root)
    sd.write_meta({"name": "st", "status": status, "n_trials": 6,
                   "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"})
    pq.write_table(pa.table({"trial_id": [f"t{i:04d}" for i in range(len(statuses))],
                             "status": statuses}), root / "trials.parquet")
    return sd


def test_trials_left_running_by_a_stop_are_shown_as_interrupted(tmp_path, capsys):
    make_study(tmp_path, ["completed", "running", "running", "pruned"])
    assert study_status(tmp_path)["interrupted"] == 2
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("trials 6: 1 completed, 1 pruned, 2 interrupted (running when the study stopped), "
            "0 failed, 2 pending") in out
    assert " running," not in out and f"klstudy resume {tmp_path}" in out


def test_a_study_in_use_shows_its_running_trials_as_running(tmp_path, capsys):
    sd = make_study(tmp_path, ["completed", "running"], status="running")
    with StudyLock(sd, "klstudy run"):
        assert study_status(tmp_path)["interrupted"] == 0
        assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 completed, 0 pruned, 1 running, 0 failed, 4 pending" in out
    assert "in use by pid" in out
