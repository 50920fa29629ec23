"""The study's MLflow parent run: opened at the start, closed at the end, reopened on resume.

Every text that goes to MLflow has credentials redacted (``study._secrets``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study._mlflow_store import client_for
from study._store import StudyDir
from workers._secrets import redact_text

if TYPE_CHECKING:
    from study._spec import StudySpec


def open_parent_run(spec: StudySpec, spec_text: str, sd: StudyDir,
                    tracking_uri: str) -> tuple[str, str]:
    """(experiment id, parent run id) of a new study: params and spec.yaml, redacted."""
    from mlflow.entities import Param

    client = client_for(tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    if experiment is None:
        location = artifact_location(tracking_uri, sd)
        experiment_id = client.create_experiment(spec.name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=spec.name,
                            tags={"klstudy.role": "study", "klstudy.study": spec.name,
                                  "klstudy.study_dir": str(sd.root)})
    params = [Param(k, redact_text(v)[:6000]) for k, v in flatten(spec.to_dict()).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    client.log_text(run.info.run_id, redact_text(spec_text), "spec.yaml")
    return experiment_id, run.info.run_id


def artifact_location(tracking_uri: str, sd: StudyDir) -> str | None:
    """Where a new experiment keeps artifacts: beside a local store, or wherever a server says.

    Without this, MLflow puts a local store's artifacts in ``./mlruns`` of the current directory.
    """
    if tracking_uri == sd.mlflow_url:
        return sd.artifacts_dir.as_uri()
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return (store.parent / "mlartifacts").as_uri()
    return None  # a file store keeps artifacts inside itself; a server chooses (served artifacts)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def close_parent_run(tracking_uri: str, meta: dict[str, Any], summary: Any, status: str) -> None:
    """Counts, best objective value and wall time; FINISHED, or FAILED for a failed study.

    An interrupted study's run stays RUNNING: ``klstudy resume`` continues it.
    """
    client = client_for(tracking_uri)
    run_id = meta["parent_run_id"]
    for name, value in summary.counts.items():
        client.log_metric(run_id, f"trials_{name}", value)
    if summary.best_value is not None:
        metric = (meta.get("objective") or {}).get("metric", "elbo")
        client.log_metric(run_id, f"best_valid_{metric}", summary.best_value)
        client.set_tag(run_id, "klstudy.best_trial", summary.best_trial or "")
        client.set_tag(run_id, "klstudy.objective", summary.objective)
    client.log_metric(run_id, "wall_s", summary.wall_s)
    client.set_tag(run_id, "klstudy.status", status)
    if status != "interrupted":
        client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED")


def reopen_parent_run(tracking_uri: str, meta: dict[str, Any]) -> None:
    """Mark the parent run RUNNING again when a study is resumed."""
    client = client_for(tracking_uri)
    client.update_run(meta["parent_run_id"], status="RUNNING")
    client.set_tag(meta["parent_run_id"], "klstudy.status", "running")


__all__ = ["artifact_location", "client_for", "close_parent_run", "flatten", "open_parent_run",
           "reopen_parent_run"]
