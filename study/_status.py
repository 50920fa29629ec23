"""``klstudy status``: counts, best trial and state of a study, read from its directory only.

Nothing here starts Ray or MLflow; unreadable or half-written files are reported, not raised.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from study._store import StudyDir, lock_holder, read_parts

log = logging.getLogger(__name__)


class StudyError(RuntimeError):
    """A study cannot be started, resumed or read as asked (user-facing)."""


def objective_of(meta: dict[str, Any]) -> tuple[str, str]:
    """(metric, mode) of a study; studies from before the objective option used ELBO, max."""
    objective = meta.get("objective") or meta.get("spec", {}).get("objective") or {}
    return objective.get("metric", "elbo"), objective.get("mode") or "max"


def read_meta_checked(sd: StudyDir, command: str) -> dict[str, Any]:
    if not sd.exists():
        raise StudyError(f"{command}: {str(sd.root)!r} holds no study ({sd.meta_file.name} "
                         "missing)")
    try:
        return sd.read_meta()
    except (OSError, ValueError) as exc:
        raise StudyError(f"{command}: {sd.meta_file} is unreadable ({exc}); the study's records "
                         f"(evaluations/, trials.parquet, MLflow) are still there") from None


def trial_counts(sd: StudyDir, n_trials: int) -> dict[str, int]:
    counts = {"completed": 0, "pruned": 0, "running": 0, "error": 0, "pending": 0}
    trials_file = sd.root / "trials.parquet"
    if trials_file.is_file():
        try:
            for row in pq.read_table(trials_file).to_pylist():
                counts[row["status"]] = counts.get(row["status"], 0) + 1
        except Exception as exc:  # a truncated file: say so, count nothing
            log.warning("%s is unreadable (%s)", trials_file, exc)
    counts["pending"] = max(0, n_trials - sum(v for k, v in counts.items() if k != "pending"))
    return counts


def study_status(study_dir: str | Path) -> dict[str, Any]:
    """Counts by status, best trial (finite objective values only) and progress.

    ``interrupted`` is how many of the ``running`` trials no driver runs any more (the study is
    not locked): those a stop cut off, which a resume restarts from their last checkpoint.
    """
    sd = StudyDir(Path(study_dir).resolve())
    meta = read_meta_checked(sd, "status")
    counts = trial_counts(sd, meta["n_trials"])
    metric, mode = objective_of(meta)
    finals = {k: v for k, v in final_valid(sd, metric).items()
              if v is not None and math.isfinite(v)}  # never a NaN "best"
    holder = lock_holder(sd)
    # nothing drives the study: trials recorded as running were cut off by the stop
    interrupted = counts["running"] if holder is None else 0
    best_trial, best_value = None, None
    if finals:
        pick = max if mode == "max" else min
        best_trial, best_value = pick(finals.items(), key=lambda item: item[1])
    return {"name": meta["name"], "status": meta["status"], "study_dir": str(sd.root),
            "n_trials": meta["n_trials"], "counts": counts, "best_trial": best_trial,
            "best_value": best_value, "objective": f"valid/{metric} ({mode})",
            "interrupted": interrupted,
            "tracking_uri": meta["tracking_uri"], "locked_by": holder,
            "started_at": meta.get("started_at"), "finished_at": meta.get("finished_at")}


def final_valid(sd: StudyDir, metric: str) -> dict[str, float]:
    """{trial id: final validation ``metric``} from the finished Parquet parts (a part being
    written, ``part-*.tmp``, or a damaged one is skipped)."""
    out: dict[str, float] = {}
    for table in read_parts(sd.root / "evaluations", ["trial_id", "split", "final", metric]):
        for row in table.to_pylist():
            if row["split"] == "valid" and row["final"]:
                out[row["trial_id"]] = row[metric]
    return out
