"""study._pruners: the percentile rule against every trial that reached the step."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from study._optuna_bridge import make_pruner
from study._pruners import PeerHalvingPruner, PeerPercentilePruner, n_hyperband_brackets

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
    # step 200 without the pruned trials: one reference value only
    alone = study_with(SURVIVORS)
    assert not judge(alone, PeerPercentilePruner(50.0, n_startup_trials=2, n_min_trials=2),
                     {200: 0.0})
    assert judge(alone, PeerPercentilePruner(50.0, n_startup_trials=2, n_min_trials=1),
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


def test_a_pruned_trial_stays_in_later_references_with_its_last_value():
    """The survivor ratchet: trials pruned at 100 must not vanish from step 200's reference."""
    study = study_with(SURVIVORS + CUT)
    rule = PeerPercentilePruner(50.0, n_startup_trials=2, n_min_trials=2)
    # step 200: {9 (survivor), 1, 2, 3 (carried)}, median 2.5; the survivor alone says 9
    assert not judge(study, rule, {100: 3.0, 200: 3.0})
    assert judge(study, rule, {100: 3.0, 200: 2.0})


def test_the_issues_order_case_decides_two_identical_curves_alike(tmp_path):
    """n_startup 2, values at steps 300 and 400: A (1, 1), B (3, 3), C (2, 2) complete, D
    (0, 0) is pruned at 300, E (2.5, 2.5) completes; F has C's exact curve and must be decided
    as C was (kept). With D gone from step 400's reference, its median rose to 2.25."""
    from test_pruning import fake_trial, mirror, result, scheduler  # the scheduler's fakes

    m = mirror(tmp_path, n_startup_trials=2)
    sched = scheduler(m, phase_aware=False)
    stopped = {}
    for name, value in zip("ABCDEF", (1.0, 3.0, 2.0, 0.0, 2.5, 2.0), strict=True):
        trial = fake_trial(name)
        for step in (300, 400, 500):  # 500: the final result, never judged
            decision = sched.on_trial_result(None, trial, result(step, value,
                                                                 final=step == 500))
            if decision == "STOP":
                stopped[name] = step
                break
        sched.on_trial_complete(None, trial, result(step, value, final=name not in stopped))
    assert stopped == {"D": 300}, stopped


def test_the_trials_value_at_the_step_is_judged_not_its_best_so_far():
    """A cyclical trial's fixing-stage value dips after a β restart: judged by its value at
    the step (as its peers are), not shielded by an earlier best."""
    peers = [(TrialState.COMPLETE, {10: 1.0, 20: v}) for v in (5.0, 6.0, 7.0)]
    study = study_with(peers)
    rule = PeerPercentilePruner(50.0, n_startup_trials=1)
    assert judge(study, rule, {10: 9.0, 20: 4.0})  # best 9 > median 6, but 4 < 6 at step 20
    assert not judge(study, rule, {10: 0.0, 20: 6.5})  # poor earlier, fine now


# --- successive halving / hyperband, at the same step for every trial -------------------------
def halving(n_startup_trials: int):
    """The default successive-halving pruner, rung at step 300, halving (η 2); it needs
    ``n_startup_trials`` completed trials and as many peer values at the step."""
    return make_pruner("successive_halving", min_resource_steps=300, reduction_factor=2,
                       n_startup_trials=n_startup_trials)


def judge_live(study, pruner, values: dict[int, float]) -> bool:
    """As ``judge``, with the trial in the study's storage (the halving rule writes to it)."""
    trial = study.ask()
    for step, value in values.items():
        trial.report(value, step)
    return pruner.prune(study, study._storage.get_trial(trial._trial_id))


def test_halving_compares_at_the_trials_own_step_with_the_peers_there():
    """Rung 300. The peers were at β_max at 300 and at 400 (different values); a trial whose
    first fixing-stage report is at 400 is compared with their values at 400, not at 300."""
    peers = [(TrialState.COMPLETE, {300: a, 400: b})
             for a, b in ((1.0, 5.0), (1.1, 5.1), (1.2, 5.2), (1.3, 5.3))]
    study = study_with(peers)
    rule = halving(n_startup_trials=2)
    assert judge_live(study, rule, {400: 3.0})  # would be the best of the 300 values
    assert not judge_live(study, rule, {400: 5.25})  # top half of {5.0, 5.1, 5.2, 5.3, 5.25}


def test_halving_has_a_startup_guard_and_a_minimum_of_peers():
    """Optuna's rule prunes the second trial to reach a rung unless it beats the first."""
    first = study_with([(TrialState.RUNNING, {300: 9.0})])
    assert not judge_live(first, halving(n_startup_trials=1), {300: 0.0})  # none completed
    two = study_with([(TrialState.COMPLETE, {300: 9.0}), (TrialState.COMPLETE, {300: 8.0})])
    assert not judge_live(two, halving(n_startup_trials=3), {300: 0.0})  # 2 of 3 completed
    assert judge_live(two, halving(n_startup_trials=2), {300: 0.0})


def test_halving_judges_a_trial_once_per_rung():
    study = study_with([(TrialState.COMPLETE, {300: v, 400: v, 600: v})
                        for v in (1.0, 2.0, 3.0)])
    rule = halving(n_startup_trials=1)
    trial = study.ask()
    trial.report(2.5, 300)
    assert not rule.prune(study, study._storage.get_trial(trial._trial_id))  # kept at rung 0
    trial.report(0.0, 400)  # the same rung (next one: 600): not judged again
    assert not rule.prune(study, study._storage.get_trial(trial._trial_id))
    trial.report(0.0, 600)
    assert rule.prune(study, study._storage.get_trial(trial._trial_id))


def test_halving_prunes_non_finite_values():
    study = study_with([(TrialState.COMPLETE, {300: 1.0})])
    assert judge_live(study, halving(n_startup_trials=1), {300: math.inf})


def test_hyperband_brackets_depend_on_the_trial_not_its_order():
    rule = PeerHalvingPruner(min_resource=100, reduction_factor=3, n_brackets=3)
    a = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={"tune_trial_id": "t7"})
    b = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={"tune_trial_id": "t7"})
    a.number, b.number = 0, 41
    assert rule.bracket_of(a) == rule.bracket_of(b)
    brackets = {rule.bracket_of(optuna.trial.create_trial(
        state=TrialState.RUNNING, user_attrs={"tune_trial_id": f"t{i}"})) for i in range(30)}
    assert brackets == {0, 1, 2}
    assert n_hyperband_brackets(100, 1000, 3) == 3


def test_make_pruner_uses_the_peer_halving_rule_unless_optunas_is_asked():
    sh = make_pruner("successive_halving", min_resource_steps=300, max_resource_steps=3000)
    assert isinstance(sh, PeerHalvingPruner)
    hb = make_pruner("hyperband", min_resource_steps=300, max_resource_steps=3000)
    assert isinstance(hb, PeerHalvingPruner) and hb._n_brackets == 3
    assert isinstance(make_pruner("successive_halving", reference="completed"),
                      optuna.pruners.SuccessiveHalvingPruner)
