"""klstudy's own Optuna pruners: a trial is judged by its value at a step against the values
its peers had at that same step, so that neither trial order nor schedule shape decides.

Optuna's pruners judge in ways that depend on the order in which trials run:

- ``PercentilePruner`` (and ``MedianPruner``) takes a step's reference over the *completed*
  trials only. Where pruning works the completed trials are the survivors of every earlier
  decision, so the bar rises as the study goes on (on PTB, run seed by seed, the last seed was
  cut 12 of 12; README, "Evidence").
- It compares the trial's *best value so far* with the others' values *at the current step*;
  a cyclical trial's fixing-stage value dips after each β restart, so its best-so-far shields
  it where a monotonic trial has no such shield.
- ``SuccessiveHalvingPruner`` compares each trial's first value at or after a rung with the
  values the others had at *their* first step there (on the phase-aware grid: different
  steps), and the second trial to reach a rung is pruned unless it beats the first.

Here (``pruning.reference: reached``, the default) a trial's value at step s is compared with
the values at s of every other trial that got there, whatever became of it: completed, still
running, or pruned — a trial pruned before s counts with its last value, carried forward, so
that a pruned trial does not vanish from the later references while the survivors stay (which
would raise the bar for every trial judged later). ``same_seed`` narrows the peers to the
trials of the trial's seed: a seed fixes the initialisation and the data order of every
configuration it runs, so trials of one seed share an offset, and where the schedules differ
less than the seeds do, a reference pooled over seeds cuts whole seeds.

Nothing is pruned before ``n_startup_trials`` trials have completed, and a step with fewer
than ``n_min_trials`` peer values decides nothing. A NaN or infinite value is pruned: it can
never be compared, nor become the best.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

# Whose values at a step form the pruner's reference (spec ``pruning.reference``).
REFERENCES = ("same_seed", "reached", "completed")
SEED_ATTR = "seed"  # the Optuna twin's user attribute (study._optuna_bridge)
TRIAL_ID_ATTR = "tune_trial_id"
RUNG_ATTR = "klstudy_rung_{}"  # system attribute: the step a trial was judged at for a rung
_PEERS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def peer_values(study: optuna.study.Study, trial: FrozenTrial, step: int, *,
                same_seed: bool = False, peers: list[FrozenTrial] | None = None) -> list[float]:
    """The finite values other trials had at ``step``: their value there, or, for a trial
    pruned before ``step``, its last value (carried forward)."""
    trials = peers if peers is not None else study.get_trials(deepcopy=False, states=_PEERS)
    seed = trial.user_attrs.get(SEED_ATTR)
    values = []
    for t in trials:
        if t.number == trial.number or same_seed and t.user_attrs.get(SEED_ATTR) != seed:
            continue
        if step in t.intermediate_values:
            values.append(t.intermediate_values[step])
        elif t.state == TrialState.PRUNED and t.last_step is not None and t.last_step < step:
            values.append(t.intermediate_values[t.last_step])
    return [v for v in values if math.isfinite(v)]


def _n_completed(trials: list[FrozenTrial]) -> int:
    return sum(t.state == TrialState.COMPLETE for t in trials)


class PeerPercentilePruner(optuna.pruners.BasePruner):
    """Prune a trial whose value at its last step is in the bottom ``percentile`` of the values
    its peers had at that step (:func:`peer_values`); ``percentile`` 50 is the median rule.

    Args:
        percentile: in [0, 100], Optuna's meaning (25: keep the best quarter's side).
        n_startup_trials: completed trials before anything is pruned.
        n_warmup_steps: no pruning at steps before this.
        n_min_trials: a step with fewer peer values decides nothing.
        same_seed: peers are the trials of the trial's seed only.
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
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            return True
        trials = study.get_trials(deepcopy=False, states=_PEERS)
        completed = _n_completed(trials)
        if completed == 0 or completed < self._n_startup_trials:
            return False
        values = peer_values(study, trial, step, same_seed=self._same_seed, peers=trials)
        if len(values) < self._n_min_trials:
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        q = 100.0 - self._percentile if maximize else self._percentile
        reference = float(np.percentile(values, q))
        return value < reference if maximize else value > reference


class PeerHalvingPruner(optuna.pruners.BasePruner):
    """Successive halving at rungs ``min_resource · reduction_factor^(k + bracket)``, judged at
    the same step for every trial.

    A trial is judged once per rung, at its first reported step s at or after the rung's step
    (phase-aware trials report fixing-stage steps only), against the values its peers had at s
    (:func:`peer_values`): it goes on when it is among the best ``max(1, n // reduction_factor)``
    of the n values (its own included), as Optuna's successive halving promotes. A step with
    fewer than ``n_min_trials`` peers decides nothing and the trial is judged again at its next
    report in the rung; nothing is pruned before ``n_startup_trials`` trials have completed.

    Args:
        bracket: the rung offset (Optuna's ``min_early_stopping_rate``); with
            ``n_brackets`` > 1 (hyperband) each trial is in bracket ``crc32(trial id) mod
            n_brackets`` — a function of the trial, never of the order it started in — and is
            compared with the trials of its bracket only.
    """

    def __init__(self, *, min_resource: int, reduction_factor: int = 3, n_startup_trials: int = 5,
                 n_min_trials: int = 1, n_brackets: int = 1, same_seed: bool = False) -> None:
        if min_resource < 1 or reduction_factor < 2 or n_brackets < 1:
            raise ValueError("min_resource must be ≥ 1, reduction_factor ≥ 2, n_brackets ≥ 1, "
                             f"got {min_resource}, {reduction_factor}, {n_brackets}")
        self._min_resource = min_resource
        self._reduction_factor = reduction_factor
        self._n_startup_trials = n_startup_trials
        self._n_min_trials = max(1, n_min_trials)
        self._n_brackets = n_brackets
        self._same_seed = same_seed

    def bracket_of(self, trial: FrozenTrial) -> int:
        if self._n_brackets == 1:
            return 0
        key = str(trial.user_attrs.get(TRIAL_ID_ATTR, trial.number))
        return zlib.crc32(key.encode()) % self._n_brackets

    def _rung(self, step: int, bracket: int) -> tuple[int, int] | None:
        """(rung index, its step) of the highest rung at or before ``step``, or None."""
        k, rung_step = -1, None
        while (s := self._min_resource * self._reduction_factor ** (k + 1 + bracket)) <= step:
            k, rung_step = k + 1, s
        return None if rung_step is None else (k, rung_step)

    def prune(self, study: optuna.study.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            return True
        bracket = self.bracket_of(trial)
        rung = self._rung(step, bracket)
        if rung is None or RUNG_ATTR.format(rung[0]) in trial.system_attrs:
            return False  # before the first rung, or judged at this rung already
        trials = [t for t in study.get_trials(deepcopy=False, states=_PEERS)
                  if self.bracket_of(t) == bracket]
        if _n_completed(trials) < max(1, self._n_startup_trials):
            return False
        values = peer_values(study, trial, step, same_seed=self._same_seed, peers=trials)
        if len(values) < self._n_min_trials:
            return False  # undecided: judged again at its next report in this rung
        study._storage.set_trial_system_attr(trial._trial_id, RUNG_ATTR.format(rung[0]), step)
        ranked = sorted([*values, value], reverse=study.direction == StudyDirection.MAXIMIZE)
        keep = max(1, len(ranked) // self._reduction_factor)
        threshold = ranked[keep - 1]
        if study.direction == StudyDirection.MAXIMIZE:
            return value < threshold
        return value > threshold


def n_hyperband_brackets(min_resource: int, max_resource: int, reduction_factor: int) -> int:
    """Optuna's count: ⌊log_η(max/min)⌋ + 1 brackets."""
    ratio = max(1.0, max_resource / max(1, min_resource))
    return int(math.floor(math.log(ratio, reduction_factor) + 1e-9)) + 1
