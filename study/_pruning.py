"""A Ray Tune trial scheduler that lets an Optuna pruner stop Tune trials.

Ray's ``OptunaSearch`` hard-codes Optuna's ``NopPruner``; this scheduler brings any Optuna
pruner into Tune instead, for grid and TPE studies alike. Each Tune trial is mirrored by an
Optuna twin (``OptunaMirror``); every evaluation is reported to it and the pruner decides.

Schedule-aware pruning (the default): with cyclical β a trial mid-ramp looks worse than one at
β_max for reasons unrelated to its final quality, so the pruner only sees validation ELBO
measured in a fixing stage (β = β_max), carried forward between such evaluations; a trial is
never pruned before it first reaches β_max.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from study._optuna_bridge import OptunaMirror

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)

METRIC = "valid/elbo"  # maximised; β = 1 whatever the training β
TRIAL_KEY = "klstudy_trial_id"


def pruning_value(result: dict[str, Any], *, phase_aware: bool, carried: float | None) -> float | None:
    """The value the pruner should see for this result, or None for "nothing to report yet".

    Args:
        result: a Tune result with ``valid/elbo`` and ``at_beta_max``.
        phase_aware: only fixing-stage values count (carried forward) when True.
        carried: the last fixing-stage value of this trial, if any.
    """
    value = result.get(METRIC)
    if value is None or not math.isfinite(value):
        return carried if phase_aware else None
    if not phase_aware or result.get("at_beta_max"):
        return float(value)
    return carried


class OptunaPruningScheduler(FIFOScheduler):
    """FIFO scheduling; STOP when the trial's Optuna twin is pruned.

    Args:
        mirror: the study's Optuna storage handle (its pruner decides).
        phase_aware: schedule-aware pruning (see module docstring).
    """

    def __init__(self, mirror: OptunaMirror, *, phase_aware: bool = True) -> None:
        super().__init__()
        self.mirror = mirror
        self.phase_aware = phase_aware
        self._carried: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_carried"] = {}  # rebuilt from the twins' intermediate values after restore
        return state

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the metric is fixed: validation ELBO, maximised

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        trial_id = result.get(TRIAL_KEY) or trial.config["trial"]["trial_id"]
        twin = self.mirror.ensure(trial_id, _params(trial.config), seed=_seed(trial.config))
        if twin.state == TrialState.PRUNED:
            return TrialScheduler.STOP  # pruned before a restart: stay pruned
        if twin.state.is_finished() or result.get("final"):
            return TrialScheduler.CONTINUE
        if trial_id not in self._carried and twin.intermediate_values:
            self._carried[trial_id] = twin.intermediate_values[max(twin.intermediate_values)]
        value = pruning_value(result, phase_aware=self.phase_aware,
                              carried=self._carried.get(trial_id))
        if value is None:
            return TrialScheduler.CONTINUE
        self._carried[trial_id] = value
        if self.mirror.report(twin, value, int(result["step"])):
            self.mirror.finish(trial_id, TrialState.PRUNED)
            log.info("trial %s pruned at step %s (value %.4f)", trial_id, result["step"], value)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        trial_id = trial.config["trial"]["trial_id"]
        if result and result.get("final"):
            self.mirror.finish(trial_id, TrialState.COMPLETE, value=result.get(METRIC))
        else:
            self.mirror.finish(trial_id, TrialState.FAIL)
        self._carried.pop(trial_id, None)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.mirror.finish(trial.config["trial"]["trial_id"], TrialState.FAIL)

    def debug_string(self) -> str:
        return f"OptunaPruningScheduler({self.mirror.pruner_kwargs}, phase_aware={self.phase_aware})"


def _params(tune_config: dict) -> dict[str, Any]:
    trial = tune_config["trial"]
    return {k: trial[k] for k in ("n_cycles", "ratio", "ramp", "beta_max")}


def _seed(tune_config: dict) -> int:
    return int(tune_config["trial"]["seed"])
