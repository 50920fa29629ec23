"""A Ray Tune trial scheduler that lets an Optuna pruner stop Tune trials.

Ray's ``OptunaSearch`` hard-codes Optuna's ``NopPruner``; this scheduler brings any Optuna
pruner into Tune instead, for grid and TPE studies alike. Each Tune trial is mirrored by an
Optuna twin (``OptunaMirror``); evaluations are reported to it and the pruner decides.

What the pruner sees (:class:`PruningPolicy`) is built so that pruning cannot decide the study's
conclusion (DESIGN §4):

- the study objective (``objective.metric``, validation split) in the objective's direction;
- nothing before ``min_step`` (``pruning.min_share`` of T): no trial is pruned earlier, and an
  early value can never become the "best so far" that shields a trial later;
- all trials share T and the evaluation grid, so a report at step s compares every trial at the
  same fraction of its training;
- schedule-aware (``phase_aware``, the default): a trial mid-ramp looks worse than one at β_max
  for reasons unrelated to its final quality, so a trial reports only the values it measured in
  a fixing stage (``at_beta_max``: β = β_max, or the last evaluation of a cycle that has none),
  at the step it measured them; mid-ramp it reports nothing and cannot be pruned. Every
  comparison is then between values of the same step: an earlier design carried the last
  fixing-stage value forward, and a cyclical trial mid-ramp at step s was judged by its value
  from an earlier step against the others' values at s — on PTB, where the ELBO still climbs,
  that pruned 7 of the 7 trials it judged (README, "Evidence"). A trial that has not reached a
  fixing stage yet (monotonic with a large R, R = 1) reports nothing until ``grace_step``
  (``pruning.fixing_grace_share`` of T), then its current value: no schedule escapes comparison
  for more than that share of its run.

Together with the interleaved grid order (``study._grid``: the first completed trials, which
the median pruner uses as its reference, span M and R), no family is immune by grid order or
schedule shape; ``bench/pruning.py`` measures it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from study._optuna_bridge import OptunaMirror
from workers import fixing_stage_eval

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)

TRIAL_KEY = "klstudy_trial_id"
PARAM_KEYS = ("n_cycles", "ratio", "ramp", "beta_max")


@dataclass(frozen=True)
class PruningPolicy:
    """What the pruner is shown, and from when.

    Args:
        metric: the validation metric reported (the objective, or its proxy for ``iw_nll``).
        mode: ``max`` or ``min``: which direction is better (the Optuna study's direction).
        final_metric: the metric told to Optuna when a trial completes (the objective).
        phase_aware: report fixing-stage values only, carried forward (module docstring).
        min_step: no report (so no pruning) at evaluations before this optimizer step.
        grace_step: from this step a trial without any fixing-stage value reports its current
            value (phase-aware only).
    """

    metric: str = "elbo"
    mode: Literal["max", "min"] = "max"
    final_metric: str = "elbo"
    phase_aware: bool = True
    min_step: int = 0
    grace_step: int = 0

    @property
    def key(self) -> str:
        return f"valid/{self.metric}"

    @property
    def final_key(self) -> str:
        return f"valid/{self.final_metric}"


def _number(value: Any) -> float | None:
    """A metric value as a float (NaN and ±inf included), or None when it is not a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def pruning_value(result: dict[str, Any], *, policy: PruningPolicy,
                  seen_fixing: bool) -> float | None:
    """The value the pruner should see for this result, or None for "nothing to report".

    A NaN or infinite value is reported as it is: the scheduler prunes it (it can never be
    compared, nor be the best).

    Args:
        result: a Tune result with ``step``, ``at_beta_max`` and ``valid/<metric>``.
        policy: see :class:`PruningPolicy`.
        seen_fixing: whether the trial has had a fixing-stage evaluation (this one included).
    """
    step = int(result["step"])
    if step < policy.min_step:
        return None
    current = _number(result.get(policy.key))
    if not policy.phase_aware or result.get("at_beta_max"):
        return current
    if not seen_fixing and step >= policy.grace_step:
        return current  # never at β_max so far: judged as it is, after the grace
    return None


class OptunaPruningScheduler(FIFOScheduler):
    """FIFO scheduling; STOP when the trial's Optuna twin is pruned.

    Args:
        mirror: the study's Optuna storage handle (its pruner decides).
        policy: what the pruner sees (:class:`PruningPolicy`).
    """

    def __init__(self, mirror: OptunaMirror, *, policy: PruningPolicy | None = None) -> None:
        super().__init__()
        self.mirror = mirror
        self.policy = policy or PruningPolicy()
        self._fixed: dict[str, bool] = {}  # trial id: has it had a fixing-stage evaluation
        self._twinned: set[str] = set()  # pruner "none": twins made, nothing else to do

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fixed"] = {}  # recomputed from each trial's schedule after a restore
        state["_twinned"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A scheduler pickled by an older klstudy (in a study's tuner.pkl) lacks newer fields
        # and may hold ones this version no longer uses.
        state = {k: v for k, v in state.items() if k != "_carried"}
        self.__dict__.update({"_fixed": {}, "_twinned": set(), **state})

    @property
    def _never_prunes(self) -> bool:
        return self.mirror.pruner_kwargs.get("kind", "none") == "none"

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the metric and mode are the study objective's

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        trial_id = result.get(TRIAL_KEY) or trial.config["trial"]["trial_id"]
        if "step" not in result or result.get("klstudy_error"):
            return TrialScheduler.CONTINUE  # a failure report: on_trial_complete tells Optuna
        if result.get("replayed") and not result.get("final"):
            return TrialScheduler.CONTINUE  # re-reported from a final checkpoint: judged before
        if self._never_prunes:
            # Nothing can be pruned: only the twin is needed (its final value comes with
            # on_trial_complete). Reporting every evaluation to the Optuna storage cost each
            # trial a ~22 ms driver round trip per report (bench/orchestration.py).
            if trial_id not in self._twinned:
                self.mirror.ensure(trial_id, trial_params(trial.config, self.mirror.search_space),
                                   seed=_seed(trial.config))
                self._twinned.add(trial_id)
            return TrialScheduler.CONTINUE
        twin = self.mirror.ensure(trial_id, trial_params(trial.config, self.mirror.search_space),
                                  seed=_seed(trial.config))
        if twin.state == TrialState.PRUNED:
            return TrialScheduler.STOP  # pruned before a restart: stay pruned
        if twin.state.is_finished() or result.get("final"):
            return TrialScheduler.CONTINUE
        step = int(result["step"])
        if not self._fixed.get(trial_id):  # first sight (also after a restore), or not yet
            self._fixed[trial_id] = bool(result.get("at_beta_max")) or fixed_before(
                trial.config["trial"], step)
        value = pruning_value(result, policy=self.policy, seen_fixing=self._fixed[trial_id])
        if value is None:
            return TrialScheduler.CONTINUE
        if self.mirror.report(twin, value, step) or not math.isfinite(value):
            self.mirror.finish(trial_id, TrialState.PRUNED)
            log.info("trial %s pruned at step %s (%s %.4f)", trial_id, step,
                     self.policy.metric, value)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        trial_id = trial.config["trial"]["trial_id"]
        if result and result.get("final"):
            # Optuna takes an infinite value as a COMPLETE trial's; a NaN or missing one is a
            # FAIL, and study._results records that trial as an error, so both agree.
            value = final_objective(result, self.policy.final_key)
            self.mirror.finish(trial_id, TrialState.COMPLETE if value is not None
                               else TrialState.FAIL, value=value)
        else:
            self.mirror.finish(trial_id, TrialState.FAIL)
        self._fixed.pop(trial_id, None)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.mirror.finish(trial.config["trial"]["trial_id"], TrialState.FAIL)

    def debug_string(self) -> str:
        return f"OptunaPruningScheduler({self.mirror.pruner_kwargs}, {self.policy})"


def final_objective(result: dict[str, Any], key: str) -> float | None:
    """A final result's objective value for Optuna: a number (±inf included), None for NaN or
    missing (the twin then FAILs)."""
    value = _number(result.get(key))
    return None if value is None or math.isnan(value) else value


def fixed_before(config: dict[str, Any], step: int) -> bool:
    """Whether a trial had a fixing-stage evaluation before ``step``: a function of its
    schedule alone (:func:`workers.fixing_stage_eval`), so a restored scheduler knows it also
    when those evaluations came before ``min_step`` and were never reported."""
    t, every = int(config["total_steps"]), int(config["eval_every_steps"])
    schedule = {"total_steps": t, "n_cycles": int(config["n_cycles"]),
                "ratio": float(config["ratio"]), "eval_every_steps": every}
    return any(fixing_stage_eval(s, **schedule) for s in range(every, min(step, t + 1), every))


def trial_params(tune_config: dict, space: dict[str, Any] | None = None) -> dict[str, Any]:
    """The searched parameters of a trial (the study's axes), as its Optuna twin records them."""
    trial = tune_config["trial"]
    return {k: trial[k] for k in (space or PARAM_KEYS)}


def _seed(tune_config: dict) -> int:
    return int(tune_config["trial"]["seed"])
