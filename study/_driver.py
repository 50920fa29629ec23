"""Run, resume and summarise a study: Ray Tune ``Tuner`` + Optuna pruning + MLflow + Parquet.

``run_study`` starts a study in a fresh study directory; ``resume_study`` restores a killed one
from that directory alone (Tune experiment state, Optuna storage, the same MLflow runs);
``study_status`` reads the directory without starting anything heavy.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from study._store import StudyDir, now_iso

if TYPE_CHECKING:
    from study._spec import StudySpec

log = logging.getLogger(__name__)
# Checkpoints are kept to 2 per trial, which makes Tune snapshot its state on every checkpoint
# and warn about it each time; the snapshots are cheap here (small experiment state).
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# klstudy prints its own progress line; Tune's new console output would add tables around it.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


class StudyError(RuntimeError):
    """A study cannot be started or resumed as asked (user-facing)."""


@dataclass(frozen=True)
class StudySummary:
    study_dir: Path
    name: str
    counts: dict[str, int]
    best_trial: str | None
    best_value: float | None  # of the objective (``objective``: "valid/elbo (max)")
    objective: str
    wall_s: float
    tracking_uri: str
    parent_run_id: str


# --- MLflow parent run ------------------------------------------------------------------------
def _open_parent_run(spec: StudySpec, spec_text: str, sd: StudyDir, tracking_uri: str) -> tuple[str, str]:
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    if experiment is None:
        location = _artifact_location(tracking_uri, sd)
        experiment_id = client.create_experiment(spec.name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=spec.name,
                            tags={"klstudy.role": "study", "klstudy.study": spec.name,
                                  "klstudy.study_dir": str(sd.root)})
    params = [Param(k, v[:6000]) for k, v in _flatten(spec.to_dict()).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    client.log_text(run.info.run_id, spec_text, "spec.yaml")
    return experiment_id, run.info.run_id


def _artifact_location(tracking_uri: str, sd: StudyDir) -> str | None:
    """Where a new experiment keeps artifacts: beside a local store, or wherever a server says.

    Without this, MLflow puts a local store's artifacts in ``./mlruns`` of the current directory.
    """
    if tracking_uri == sd.mlflow_url:
        return sd.artifacts_dir.as_uri()
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None  # a file store keeps artifacts inside itself; a server chooses (served artifacts)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def _close_parent_run(meta: dict[str, Any], summary: StudySummary, status: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=meta["tracking_uri"])
    run_id = meta["parent_run_id"]
    for name, value in summary.counts.items():
        client.log_metric(run_id, f"trials_{name}", value)
    if summary.best_value is not None:
        metric = meta.get("objective", {}).get("metric", "elbo")
        client.log_metric(run_id, f"best_valid_{metric}", summary.best_value)
        client.set_tag(run_id, "klstudy.best_trial", summary.best_trial or "")
        client.set_tag(run_id, "klstudy.objective", summary.objective)
    client.log_metric(run_id, "wall_s", summary.wall_s)
    client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED")


# --- Ray Tune ---------------------------------------------------------------------------------
def _init_ray(address: str | None) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start embedded Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=target, logging_level=logging.WARNING, include_dashboard=False if not target else None,
             log_to_driver=False)
    return target is None


def _eval_step_at(spec: StudySpec, share: float) -> int:
    """The first evaluation step at or after ``share`` of total_steps (the evaluation grid:
    multiples of eval_every_steps, and total_steps)."""
    t = spec.train
    target = math.ceil(share * t.total_steps - 1e-9)
    return min(t.total_steps, max(1, math.ceil(target / t.eval_every_steps)) * t.eval_every_steps)


def pruning_policy(spec: StudySpec):  # -> PruningPolicy
    """What the study's pruner sees (``study._pruning``), from the spec."""
    from study._pruning import PruningPolicy

    p, o = spec.pruning, spec.objective
    min_step = _eval_step_at(spec, p.min_share) if p.min_share > 0 else 0
    grace_step = max(min_step, _eval_step_at(spec, p.fixing_grace_share))
    return PruningPolicy(metric=o.pruning_metric, mode=o.mode, final_metric=o.metric,
                         phase_aware=p.phase_aware, min_step=min_step, grace_step=grace_step)


def _mirror(spec: StudySpec, sd: StudyDir, study_name: str):  # -> OptunaMirror
    from study._optuna_bridge import OptunaMirror

    p, t = spec.pruning, spec.train
    min_step = pruning_policy(spec).min_step
    return OptunaMirror(
        p.storage or sd.optuna_url,
        study_name,
        direction="maximize" if spec.objective.mode == "max" else "minimize",
        pruner_kwargs={
            "kind": p.pruner,
            "n_startup_trials": p.n_startup_trials,
            "n_warmup_steps": p.n_warmup_steps,
            "percentile": p.percentile,
            "patience": p.patience,
            "min_resource_steps": max(p.min_resource * t.eval_every_steps, min_step),
            "max_resource_steps": t.total_steps,
            "reduction_factor": p.reduction_factor,
        },
        sampler_seed=spec.search.seed,
        search_space=spec.search_space(),
    )


def _build_tuner(spec: StudySpec, sd: StudyDir, context: dict[str, Any],
                 optuna_study: str):  # -> tune.Tuner
    from ray import tune

    from study._pruning import OptunaPruningScheduler
    from study._results import StudyRecorder
    from study._search import OptunaTPESearcher
    from workers._trainable import run_trial

    mirror = _mirror(spec, sd, optuna_study)
    scheduler = OptunaPruningScheduler(mirror, policy=pruning_policy(spec))
    r = spec.resources
    trainable = tune.with_resources(run_trial, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})
    if spec.search.kind == "tpe":
        configs = []
        searcher = OptunaTPESearcher(mirror, spec.base_config(), seeds=list(spec.seeds),
                                     n_trials=spec.search.n_trials, extra={"study": context},
                                     metric=spec.objective.key, mode=spec.objective.mode)
        param_space: dict[str, Any] = {}
        tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                      num_samples=spec.search.n_trials,
                                      max_concurrent_trials=r.max_concurrent_trials, reuse_actors=True)
    else:
        configs = spec.grid_configs()
        param_space = {"trial": tune.grid_search([c.to_dict() for c in configs]), "study": context}
        tune_config = tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=r.max_concurrent_trials,
                                      reuse_actors=True)
    recorder = StudyRecorder(sd, study_name=spec.name, configs=configs, mirror=mirror,
                             tracking_uri=context["tracking_uri"], n_trials=spec.n_trials(),
                             objective=(spec.objective.metric, spec.objective.mode))
    run_config = tune.RunConfig(
        name="tune",
        storage_path=str(sd.root),
        callbacks=[recorder],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=1),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


# --- public entry points ----------------------------------------------------------------------
def run_study(spec: StudySpec, spec_text: str, *, study_dir: str | Path, address: str | None = None,
              tracking_uri: str | None = None) -> StudySummary:
    """Run a study to the end in a new study directory (see ``study._store``)."""
    sd = StudyDir(Path(study_dir).resolve())
    if sd.exists():
        raise StudyError(f"--study-dir: {str(sd.root)!r} already holds a study; "
                         f"continue it with `klstudy resume {sd.root}` or choose another directory")
    sd.root.mkdir(parents=True, exist_ok=True)
    (sd.root / "spec.yaml").write_text(spec_text)
    uri = tracking_uri or spec.tracking.uri or sd.mlflow_url
    experiment_id, parent_run_id = _open_parent_run(spec, spec_text, sd, uri)
    # Unique per study: two studies sharing one Optuna storage never share twins.
    optuna_study = f"{spec.name}.{parent_run_id[:12]}"
    meta = {"optuna_study": optuna_study,
            "objective": {"metric": spec.objective.metric, "mode": spec.objective.mode},
            "name": spec.name, "spec": spec.to_dict(), "tracking_uri": uri, "experiment_name": spec.name,
            "experiment_id": experiment_id, "parent_run_id": parent_run_id, "status": "running",
            "n_trials": spec.n_trials(), "started_at": now_iso(), "finished_at": None,
            "address": address}
    sd.write_meta(meta)
    context = {"name": spec.name, "tracking_uri": uri, "experiment_id": experiment_id,
               "parent_run_id": parent_run_id}
    return _fit(sd, meta, address, lambda: _build_tuner(spec, sd, context, optuna_study))


def resume_study(study_dir: str | Path, *, address: str | None = None) -> StudySummary:
    """Restore a killed or failed study from its directory and run it to the end."""
    from ray import tune

    from workers._trainable import run_trial

    sd = StudyDir(Path(study_dir).resolve())
    if not sd.exists():
        raise StudyError(f"resume: {str(sd.root)!r} holds no study ({sd.meta_file.name} missing)")
    meta = sd.read_meta()
    if meta.get("status") == "finished":
        raise StudyError(f"resume: study {meta['name']!r} in {str(sd.root)!r} already finished")
    if not tune.Tuner.can_restore(str(sd.tune_dir)):
        raise StudyError(f"resume: no Tune experiment state in {str(sd.tune_dir)!r} "
                         "(the study was killed before its first trial started); run it again")
    spec = _spec_from_meta(meta)
    r = spec.resources
    trainable = tune.with_resources(run_trial, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})
    sd.update_meta(status="running", resumed_at=now_iso())
    return _fit(sd, meta, address or meta.get("address"),
                lambda: tune.Tuner.restore(str(sd.tune_dir), trainable, resume_unfinished=True,
                                           resume_errored=True))


def _spec_from_meta(meta: dict[str, Any]) -> StudySpec:
    from study._spec import parse_spec

    return parse_spec(meta["spec"])


def _fit(sd: StudyDir, meta: dict[str, Any], address: str | None, make_tuner: Any) -> StudySummary:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.monotonic()
    we_started_ray = _init_ray(address)
    status = "failed"
    try:
        make_tuner().fit()
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        summary = _summarise(sd, meta, time.monotonic() - started)
        sd.update_meta(status=status, finished_at=now_iso(), counts=summary.counts,
                       best_trial=summary.best_trial, best_value=summary.best_value)
        if status != "interrupted":
            try:
                _close_parent_run(meta, summary, status)
            except Exception:
                log.warning("could not close the MLflow parent run", exc_info=True)
        if we_started_ray:
            import ray

            ray.shutdown()
    return summary


def _summarise(sd: StudyDir, meta: dict[str, Any], wall_s: float) -> StudySummary:
    status = study_status(sd.root)
    return StudySummary(sd.root, meta["name"], status["counts"], status["best_trial"],
                        status["best_value"], status["objective"], wall_s, meta["tracking_uri"],
                        meta["parent_run_id"])


def study_status(study_dir: str | Path) -> dict[str, Any]:
    """Counts by status, best trial and progress, read from the study directory only."""
    sd = StudyDir(Path(study_dir).resolve())
    if not sd.exists():
        raise StudyError(f"status: {str(sd.root)!r} holds no study ({sd.meta_file.name} missing)")
    meta = sd.read_meta()
    counts = {"completed": 0, "pruned": 0, "running": 0, "error": 0, "pending": 0}
    trials_file = sd.root / "trials.parquet"
    best_trial, best_value = None, None
    if trials_file.is_file():
        for row in pq.read_table(trials_file).to_pylist():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    counts["pending"] = max(0, meta["n_trials"] - sum(v for k, v in counts.items() if k != "pending"))
    metric, mode = _objective_of(meta)
    finals = {k: v for k, v in _final_valid(sd, metric).items()
              if v is not None and math.isfinite(v)}  # never a NaN "best"
    if finals:
        pick = max if mode == "max" else min
        best_trial, best_value = pick(finals.items(), key=lambda item: item[1])
    return {"name": meta["name"], "status": meta["status"], "study_dir": str(sd.root),
            "n_trials": meta["n_trials"], "counts": counts, "best_trial": best_trial,
            "best_value": best_value, "objective": f"valid/{metric} ({mode})",
            "tracking_uri": meta["tracking_uri"],
            "started_at": meta.get("started_at"), "finished_at": meta.get("finished_at")}


def _objective_of(meta: dict[str, Any]) -> tuple[str, str]:
    """(metric, mode) of a study; studies from before the objective option used ELBO, max."""
    objective = meta.get("objective") or meta.get("spec", {}).get("objective") or {}
    return objective.get("metric", "elbo"), objective.get("mode") or "max"


def _final_valid(sd: StudyDir, metric: str) -> dict[str, float]:
    import pyarrow.dataset as ds

    folder = sd.root / "evaluations"
    if not folder.is_dir() or not any(folder.glob("part-*.parquet")):
        return {}
    table = ds.dataset(str(folder), format="parquet").to_table(
        columns=["trial_id", "split", "final", metric],
        filter=(ds.field("split") == "valid") & (ds.field("final") == True),  # noqa: E712
    )
    return {row["trial_id"]: row[metric] for row in table.to_pylist()}
