"""The study's Ray Tune ``Tuner``: its trainable's search space (a grid, TPE, or a race's due
round), the Optuna mirror and pruning policy its trials report to, and where its experiment
lives. Split from ``study._driver``, which runs and resumes studies with it."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from study._store import StudyDir
from workers._secrets import redact_url

if TYPE_CHECKING:
    from study._spec import StudySpec

log = logging.getLogger(__name__)


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
        redact_url(p.storage) or sd.optuna_url,
        study_name,
        secrets_dir=str(sd.root),
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
            "reference": p.reference,
        },
        sampler_seed=spec.search.seed,
        search_space=spec.search_space(),
    )


def _build_tuner(spec: StudySpec, sd: StudyDir, context: dict[str, Any], optuna_study: str,
                 *, finished: set[str] | None = None):  # -> tune.Tuner | None
    """The study's Tuner. ``finished``: trial ids that ended before a restart of the Tune
    experiment (``_restore_or_restart``); they are not run again, and TPE goes on from the
    trials it already asked for. None when nothing is left to run."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from study._pruning import OptunaPruningScheduler
    from study._results import StudyRecorder
    from study._search import OptunaTPESearcher, tpe_history
    from workers._trainable import run_trial

    mirror = _mirror(spec, sd, optuna_study)
    scheduler = OptunaPruningScheduler(mirror, policy=pruning_policy(spec))
    r = spec.resources
    trainable = tune.with_resources(run_trial, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})
    if spec.search.kind == "tpe":
        assert spec.search.n_trials is not None
        configs = []
        n_asked, requeue = 0, []
        if finished is not None:
            n_asked, requeue = tpe_history(mirror, _trial_rows(sd), spec.base_config(), finished)
        n_samples = len(requeue) + max(0, spec.search.n_trials - n_asked)
        if n_samples == 0:
            return None
        searcher = OptunaTPESearcher(mirror, spec.base_config(), seeds=list(spec.seeds),
                                     n_trials=spec.search.n_trials, extra={"study": context},
                                     metric=spec.objective.key, mode=spec.objective.mode,
                                     start_index=n_asked, requeue=requeue)
        param_space: dict[str, Any] = {}
        tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                      num_samples=n_samples,
                                      max_concurrent_trials=r.max_concurrent_trials,
                                      reuse_actors=True)
    else:
        configs = spec.grid_configs()
        if spec.search.kind == "race":  # the due round only (study._race_run)
            from study._race_run import race_tags, round_configs

            due = round_configs(spec, sd)
            if due is None:
                return None  # the race is done
            race_round, configs = due
            context = {**context, "run_tags": race_tags(race_round)}
        to_run = [c for c in configs if c.trial_id not in (finished or set())]
        if not to_run:
            return None
        param_space = {"trial": tune.grid_search([c.to_dict() for c in to_run]),
                       "study": context}
        tune_config = tune.TuneConfig(scheduler=scheduler,
                                      max_concurrent_trials=r.max_concurrent_trials,
                                      reuse_actors=True)
    race = spec.search.kind == "race"  # a round: its trials and the earlier rounds', not the grid
    recorder = StudyRecorder(sd, study_name=spec.name, configs=configs, mirror=mirror,
                             tracking_uri=context["tracking_uri"],
                             n_trials=None if race else spec.n_trials(),
                             objective=(spec.objective.metric, spec.objective.mode))
    if spec.search.kind == "race":
        recorder.progress_prefix = f"race round {context['run_tags']['race_round']}: "
    run_config = tune.RunConfig(
        **_experiment_place(spec, sd, param_space),
        callbacks=[recorder, CSVLoggerCallback(), JsonLoggerCallback()],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=1),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=run_config)


def _experiment_place(spec: StudySpec, sd: StudyDir, param_space: dict[str, Any]) -> dict:
    """Tune's storage: ``tune/``; a race: one fresh experiment per round under ``race/``."""
    if spec.search.kind != "race":
        return {"name": "tune", "storage_path": str(sd.root)}
    round_number = param_space["study"]["run_tags"]["race_round"]
    base, n = f"round-{int(round_number):02d}", 0
    while (sd.root / "race" / (f"{base}-{n}" if n else base)).exists():
        n += 1  # a round resumed: its unfinished trials run again in a new experiment
    return {"name": f"{base}-{n}" if n else base, "storage_path": str(sd.root / "race")}


# --- public entry points ----------------------------------------------------------------------


def _trial_rows(sd: StudyDir) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = sd.root / "trials.parquet"
    try:
        return pq.read_table(path).to_pylist() if path.is_file() else []
    except Exception as exc:  # a damaged record: nothing counts as finished, all run again
        log.warning("%s is unreadable (%s)", path, exc)
        return []
