"""klstudy's own Optuna pruner: the percentile (median) rule against every trial at the step.

Optuna's ``PercentilePruner`` (and ``MedianPruner``) takes a step's reference over the
*completed* trials only. In a study where pruning works, the completed trials are the ones that
survived every earlier decision, so the reference drifts towards the best seeds and a trial
started later faces a stricter bar than one started early: in a grid run seed by seed, the last
seed is cut almost whole (measured on PTB: 12 of 12; README, "Evidence"). Here the reference is
every other trial that reported a value at that step, whatever became of it (completed, pruned
or still running): a trial is judged against its peers at the same point of training.

``same_seed`` narrows the peers to the trials run with the same seed. A seed fixes the
initialisation and the data order of every configuration it runs, so trials of one seed share
an offset: where the schedules differ less than the seeds do (every collapsed trial of the toy
sits at Rec ≈ log 10, a few thousandths apart), a reference pooled over seeds cuts whole seeds
rather than poor configurations. Compared within its seed, a trial is judged on what its
configuration does, as the report's paired tests judge it.
"""

from __future__ import annotations

import math

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

# Whose values at a step form the pruner's reference (spec ``pruning.reference``).
REFERENCES = ("same_seed", "reached", "completed")
SEED_ATTR = "seed"  # the Optuna twin's user attribute (study._optuna_bridge)
_PEERS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class PeerPercentilePruner(optuna.pruners.BasePruner):
    """Prune a trial whose best value so far is in the bottom ``percentile`` of the values that
    the other trials reported at its last step.

    As Optuna's ``PercentilePruner`` (``percentile`` 50 is the median rule): nothing is pruned
    before ``n_startup_trials`` trials have completed or before ``n_warmup_steps``, a NaN value
    is pruned, and a step with fewer than ``n_min_trials`` reference values prunes nothing. The
    difference is the reference: completed, pruned and running trials that reached the step —
    with ``same_seed``, only those run with the trial's seed (Optuna user attribute ``seed``).
    """

    def __init__(self, percentile: float, *, n_startup_trials: int = 5, n_warmup_steps: int = 0,
                 n_min_trials: int = 1, same_seed: bool = False) -> None:
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        if n_startup_trials < 0 or n_warmup_steps < 0 or n_min_trials < 1:
            raise ValueError("n_startup_trials and n_warmup_steps must be ≥ 0, n_min_trials ≥ 1, "
                             f"got {n_startup_trials}, {n_warmup_steps}, {n_min_trials}")
        self._percentile = percentile
        self._n_startup_trials = n_startup_trials
        self._n_warmup_steps = n_warmup_steps
        self._n_min_trials = n_min_trials
        self._same_seed = same_seed

    def prune(self, study: optuna.study.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self._n_warmup_steps:
            return False
        trials = study.get_trials(deepcopy=False, states=_PEERS)
        completed = sum(t.state == TrialState.COMPLETE for t in trials)
        if completed == 0 or completed < self._n_startup_trials:
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        own = np.asarray(list(trial.intermediate_values.values()), dtype=float)
        if np.isnan(own).all():
            return True
        best = float(np.nanmax(own) if maximize else np.nanmin(own))
        seed = trial.user_attrs.get(SEED_ATTR)
        values = [t.intermediate_values[step] for t in trials
                  if t.number != trial.number and step in t.intermediate_values
                  and (not self._same_seed or t.user_attrs.get(SEED_ATTR) == seed)]
        values = [v for v in values if math.isfinite(v)]
        if len(values) < self._n_min_trials:
            return False
        q = 100.0 - self._percentile if maximize else self._percentile
        reference = float(np.percentile(values, q))
        return best < reference if maximize else best > reference
