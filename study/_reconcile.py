"""End of a study: send what the spools hold, then make MLflow agree with ``trials.parquet``.

The trials' and the driver's MLflow writes go through on-disk spools (``workers._spool``); when
the tracking server was down, some are still there when Tune returns. ``reconcile`` drains them
and then sets every child run's ``klstudy.status`` tag and MLflow status from the study's own
record, so no run is left RUNNING (or mislabelled) after the study, whatever failed on the way.
An interrupted study's unfinished trials stay RUNNING: ``klstudy resume`` continues them.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.parquet as pq

from study._store import StudyDir

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 60.0
_TERMINAL = {"completed": "FINISHED", "pruned": "KILLED", "error": "FAILED"}


def drain(sd: StudyDir, tracking_uri: str, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
    """Send the spooled writes of the trials (and the driver's statuses of them); True when
    nothing is left."""
    from workers._spool import drain_spools

    ok = True
    for root in (sd.root / "spool",):
        result = drain_spools(root, tracking_uri, timeout_s)
        if not result["ok"]:
            ok = False
            log.warning("%d MLflow writes are still spooled in %s (the tracking server did not "
                        "answer); `klstudy resume` or the next report sends them",
                        result["pending_records"], root)
    return ok


def reconcile(sd: StudyDir, tracking_uri: str, meta: dict[str, Any], study_status: str) -> dict:
    """Drain, then set each trial run's status from trials.parquet; returns what changed."""
    from mlflow.tracking import MlflowClient

    drain(sd, tracking_uri)
    rows = {r["trial_id"]: r for r in _trial_rows(sd)}
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'",
        max_results=50_000)
    changed = {"tagged": 0, "terminated": 0}
    for run in runs:
        row = rows.get(run.data.tags.get("klstudy.trial_id", ""))
        if row is None:
            continue
        status = row["status"]
        if run.data.tags.get("klstudy.status") != status and status in _TERMINAL:
            client.set_tag(run.info.run_id, "klstudy.status", status)
            if status == "error" and row.get("error"):
                client.set_tag(run.info.run_id, "klstudy.error", str(row["error"])[:4000])
            changed["tagged"] += 1
        wanted = _TERMINAL.get(status)
        if wanted is None and study_status != "interrupted":
            wanted = "FAILED"  # never finished, and nobody will resume it as it stands
        if wanted is not None and run.info.status != wanted:
            client.set_terminated(run.info.run_id, wanted)
            changed["terminated"] += 1
    return changed


def _trial_rows(sd: StudyDir) -> list[dict[str, Any]]:
    path = sd.root / "trials.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else []
