"""study._pruners: the percentile rule against every trial that reached the step."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from study._optuna_bridge import make_pruner
from study._pruners import PeerPercentilePruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_with(trials: list[tuple[TrialState, dict[int, float]]], *, direction="maximize"):
    study = optuna.create_study(direction=direction)
    for state, values in trials:
        study.add_trial(optuna.trial.create_trial(
            state=state, value=0.0 if state == TrialState.COMPLETE else None,
            intermediate_values=values))
    return study


def judge(study, pruner, values: dict[int, float]) -> bool:
    frozen = optuna.trial.create_trial(state=TrialState.RUNNING, intermediate_values=values)
    frozen.number = len(study.trials)
    return pruner.prune(study, frozen)


# Two completed survivors at 9 and 10; three pruned trials at 1, 2 and 3 at step 100.
SURVIVORS = [(TrialState.COMPLETE, {100: 9.0, 200: 9.0}), (TrialState.COMPLETE, {100: 10.0})]
CUT = [(TrialState.PRUNED, {100: v}) for v in (1.0, 2.0, 3.0)]


def test_pruned_trials_count_in_the_reference():
    study = study_with(SURVIVORS + CUT)
    rule = PeerPercentilePruner(50.0, n_startup_trials=2, n_min_trials=2)
    # reference = median of {9, 10, 1, 2, 3} = 3: a 5 survives; Optuna's median of {9, 10} not
    assert not judge(study, rule, {100: 5.0})
    assert judge(study, rule, {100: 2.5})
    optuna_rule = make_pruner("median", n_startup_trials=2, reference="completed")
    assert judge(study, optuna_rule, {100: 5.0})


def test_running_peers_count_but_the_trial_itself_does_not():
    study = study_with(SURVIVORS + [(TrialState.RUNNING, {100: 0.0})])
    rule = PeerPercentilePruner(50.0, n_startup_trials=2, n_min_trials=3)
    assert judge(study, rule, {100: 8.0})  # median of {9, 10, 0} = 9
    assert not judge(study, rule, {100: 9.5})
    # the judged trial stored in the study: its own value is not one of its references
    own = study_with(SURVIVORS + [(TrialState.RUNNING, {100: 0.0}),
                                  (TrialState.RUNNING, {100: 1.0})])
    four = PeerPercentilePruner(50.0, n_startup_trials=2, n_min_trials=4)
    assert not four.prune(own, own.trials[-1])  # 3 references < 4: no decision


def test_startup_warmup_and_min_trials_hold_pruning_back():
    study = study_with(SURVIVORS + CUT)
    assert not judge(study, PeerPercentilePruner(50.0, n_startup_trials=3), {100: 0.0})
    assert not judge(study, PeerPercentilePruner(50.0, n_startup_trials=2, n_warmup_steps=150),
                     {100: 0.0})
    # step 200: one reference value only
    assert not judge(study, PeerPercentilePruner(50.0, n_startup_trials=2, n_min_trials=2),
                     {200: 0.0})
    assert judge(study, PeerPercentilePruner(50.0, n_startup_trials=2, n_min_trials=1),
                 {200: 0.0})


def test_minimize_and_percentile_follow_optunas_meaning():
    values = [(TrialState.COMPLETE, {10: float(v)}) for v in range(1, 11)]  # 1 … 10
    study = study_with(values, direction="minimize")
    keep_best_quarter = PeerPercentilePruner(25.0, n_startup_trials=1)
    assert not judge(study, keep_best_quarter, {10: 3.0})  # 25th percentile = 3.25
    assert judge(study, keep_best_quarter, {10: 3.5})
    maxi = study_with(values)
    assert not judge(maxi, keep_best_quarter, {10: 7.9})  # 75th percentile = 7.75
    assert judge(maxi, keep_best_quarter, {10: 7.5})


def test_a_nan_trial_is_pruned_and_nan_references_are_ignored():
    study = study_with(SURVIVORS + [(TrialState.PRUNED, {100: math.nan})])
    rule = PeerPercentilePruner(50.0, n_startup_trials=2, n_min_trials=2)
    assert judge(study, rule, {100: math.nan})
    assert not judge(study, rule, {100: 9.6})  # median of {9, 10} = 9.5


def test_make_pruner_uses_the_peer_rule_by_default():
    assert isinstance(make_pruner("median"), PeerPercentilePruner)
    assert isinstance(make_pruner("percentile"), PeerPercentilePruner)
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        patient = make_pruner("patient")
    assert isinstance(patient._wrapped_pruner, PeerPercentilePruner)
    assert isinstance(make_pruner("median", reference="completed"), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("percentile", reference="completed"),
                      optuna.pruners.PercentilePruner)


def test_make_pruner_rejects_an_unknown_reference():
    with pytest.raises(ValueError, match="pruning.reference"):
        make_pruner("median", reference="survivors")


def test_same_seed_compares_a_trial_with_its_own_seeds_trials_only():
    study = optuna.create_study(direction="maximize")
    for seed, value in [(0, 9.0), (0, 8.0), (1, 2.0), (1, 1.0), (1, 3.0)]:
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=0.0, intermediate_values={100: value},
            user_attrs={"seed": seed}))
    frozen = optuna.trial.create_trial(state=TrialState.RUNNING, intermediate_values={100: 5.0},
                                       user_attrs={"seed": 1})
    frozen.number = len(study.trials)
    pooled = PeerPercentilePruner(50.0, n_startup_trials=1)
    by_seed = PeerPercentilePruner(50.0, n_startup_trials=1, same_seed=True)
    assert pooled.prune(study, frozen) is False  # median of all five = 3
    frozen.user_attrs["seed"] = 0
    assert by_seed.prune(study, frozen) is True  # seed 0's median = 8.5
    frozen.user_attrs["seed"] = 1
    assert by_seed.prune(study, frozen) is False  # seed 1's median = 2
    assert isinstance(make_pruner("median", reference="same_seed"), PeerPercentilePruner)
    assert make_pruner("median", reference="same_seed")._same_seed
