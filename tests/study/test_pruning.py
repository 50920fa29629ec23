"""The Optuna-pruner Tune scheduler, driven with small stand-ins for Tune trials."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.schedulers import TrialScheduler

from study._optuna_bridge import OptunaMirror, make_pruner
from study._pruning import OptunaPruningScheduler, PruningPolicy, pruning_value
from workers import TrialConfig

SPACE = {"n_cycles": [1, 4], "ratio": [0.5], "ramp": ["linear"], "beta_max": [1.0]}


@dataclass
class FakeTrial:
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)


def fake_trial(name: str, n_cycles: int = 4, seed: int = 0) -> FakeTrial:
    cfg = TrialConfig(trial_id=name, n_cycles=n_cycles, ratio=0.5, seed=seed)
    return FakeTrial({"trial": cfg.to_dict()})


def result(step: int, elbo: float, *, at_beta_max: bool = True, final: bool = False) -> dict:
    return {"valid/elbo": elbo, "step": step, "at_beta_max": at_beta_max, "final": final}


def mirror(tmp_path, pruner: str = "median", *, direction: str = "maximize",
           **kwargs: Any) -> OptunaMirror:
    return OptunaMirror(f"sqlite:///{tmp_path / 'optuna.db'}", "s", direction=direction,
                        pruner_kwargs={"kind": pruner, **kwargs}, search_space=SPACE)


PLAIN = PruningPolicy(phase_aware=False)
AWARE = PruningPolicy(phase_aware=True, grace_step=1000)  # grace longer than these trials


def scheduler(m: OptunaMirror, *, phase_aware: bool = True, **policy: Any) -> OptunaPruningScheduler:
    return OptunaPruningScheduler(m, policy=PruningPolicy(phase_aware=phase_aware, **policy))


def complete(sched: OptunaPruningScheduler, trial: FakeTrial, values: list[float]) -> None:
    for i, v in enumerate(values, start=1):
        sched.on_trial_result(None, trial, result(10 * i, v, final=i == len(values)))
    sched.on_trial_complete(None, trial, result(10 * len(values), values[-1], final=True))


def test_pruning_value_plain_reports_every_value() -> None:
    ramping = result(5, -3.0, at_beta_max=False)
    assert pruning_value(ramping, policy=PLAIN, seen_fixing=False) == -3.0


def test_pruning_value_phase_aware_waits_for_beta_max() -> None:
    ramping = result(5, -3.0, at_beta_max=False)
    assert pruning_value(ramping, policy=AWARE, seen_fixing=False) is None


def test_pruning_value_phase_aware_reports_fixing_values_only_at_their_own_step() -> None:
    assert pruning_value(result(5, -2.0), policy=AWARE, seen_fixing=True) == -2.0
    # mid-ramp after a fixing stage: nothing (an earlier value carried to this step would be
    # compared with the other trials' values of this step, a bias against cyclical schedules)
    assert pruning_value(result(6, -9.0, at_beta_max=False), policy=AWARE, seen_fixing=True) \
        is None
    late = PruningPolicy(phase_aware=True, grace_step=5)
    assert pruning_value(result(6, -9.0, at_beta_max=False), policy=late, seen_fixing=True) \
        is None


@pytest.mark.parametrize("policy", [PLAIN, AWARE])
def test_pruning_value_is_none_before_the_minimum_share(policy: PruningPolicy) -> None:
    early = PruningPolicy(phase_aware=policy.phase_aware, min_step=50)
    assert pruning_value(result(40, -1.0), policy=early, seen_fixing=True) is None
    assert pruning_value(result(50, -1.0), policy=early, seen_fixing=True) == -1.0


def test_a_trial_still_ramping_is_compared_with_its_current_value_after_the_grace() -> None:
    """Monotonic with a large R (or R = 1) must not escape comparison for most of its run."""
    policy = PruningPolicy(phase_aware=True, min_step=25, grace_step=50)
    ramping = {s: result(s, -7.0, at_beta_max=False) for s in (30, 50, 90)}
    assert pruning_value(ramping[30], policy=policy, seen_fixing=False) is None
    assert pruning_value(ramping[50], policy=policy, seen_fixing=False) == -7.0
    assert pruning_value(ramping[90], policy=policy, seen_fixing=False) == -7.0


def test_pruning_value_reads_the_policy_metric() -> None:
    policy = PruningPolicy(metric="rec", mode="min", phase_aware=False)
    assert pruning_value({"step": 5, "valid/rec": 2.5, "valid/elbo": -9.0}, policy=policy,
                         seen_fixing=False) == 2.5


def test_non_finite_values_are_reported_as_they_are() -> None:
    value = pruning_value(result(5, float("nan")), policy=PLAIN, seen_fixing=False)
    assert value is not None and math.isnan(value)
    assert pruning_value(result(5, math.inf), policy=PLAIN, seen_fixing=False) == math.inf
    assert pruning_value({"step": 5, "valid/elbo": "x"}, policy=PLAIN, seen_fixing=False) is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("pruner", ["median", "successive_halving", "hyperband"])
def test_a_non_finite_value_stops_the_trial_and_its_twin_is_pruned(tmp_path, bad, pruner):
    """An infinite PPL (or a NaN) is never comparable: the scheduler prunes it at once, and
    Optuna and the study's record agree (the recorder reads the twin's PRUNED)."""
    m = mirror(tmp_path, pruner, n_startup_trials=2, min_resource_steps=10,
               max_resource_steps=30)
    sched = scheduler(m, phase_aware=False)
    trial = fake_trial("inf")
    assert sched.on_trial_result(None, trial, result(10, bad)) == TrialScheduler.STOP
    assert m.state_of("inf") == TrialState.PRUNED


def test_pruner_none_never_stops_a_non_finite_trial(tmp_path) -> None:
    m = mirror(tmp_path, "none")
    sched = scheduler(m, phase_aware=False)
    assert sched.on_trial_result(None, fake_trial("a"), result(10, math.inf)) \
        == TrialScheduler.CONTINUE


def test_an_infinite_final_objective_completes_and_a_nan_one_fails(tmp_path) -> None:
    m = mirror(tmp_path, "none", direction="minimize")
    sched = scheduler(m, phase_aware=False, metric="ppl", mode="min", final_metric="ppl")
    for name, final in (("inf", math.inf), ("nan", math.nan)):
        trial = fake_trial(name)
        done = {"valid/ppl": final, "step": 30, "at_beta_max": True, "final": True}
        sched.on_trial_result(None, trial, done)
        sched.on_trial_complete(None, trial, done)
    assert m.state_of("inf") == TrialState.COMPLETE and m.find("inf").value == math.inf
    assert m.state_of("nan") == TrialState.FAIL


@pytest.mark.parametrize("kind", ["none", "median", "percentile", "successive_halving", "hyperband",
                                  "patient"])
def test_make_pruner_knows_every_kind(kind: str) -> None:
    assert isinstance(make_pruner(kind, max_resource_steps=100), optuna.pruners.BasePruner)


def test_make_pruner_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown pruner 'asha'"):
        make_pruner("asha")


def test_median_pruner_stops_a_poor_trial_and_tells_optuna(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=2)
    sched = scheduler(m, phase_aware=False)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    poor = fake_trial("c")
    assert sched.on_trial_result(None, poor, result(10, -50.0)) == TrialScheduler.STOP
    sched.on_trial_complete(None, poor, result(10, -50.0))
    assert m.state_of("c") == TrialState.PRUNED
    assert m.state_of("a") == TrialState.COMPLETE
    assert m.find("a").value == -1.0


def test_phase_aware_never_prunes_before_beta_max_within_the_grace(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=2)
    sched = scheduler(m, phase_aware=True, grace_step=1000)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    ramping = fake_trial("c")
    decision = sched.on_trial_result(None, ramping, result(10, -50.0, at_beta_max=False))
    assert decision == TrialScheduler.CONTINUE
    assert m.find("c").intermediate_values == {}


def test_phase_aware_compares_values_of_the_same_step_only(tmp_path) -> None:
    """The PTB failure of the carried-forward design: a cyclical trial, good at its fixing
    step 10, mid-ramp at step 20 while the references climbed; it is not judged at 20 by its
    step-10 value (it would be pruned: -2.9 < median -2.05), and at 30 it is judged fairly."""
    m = mirror(tmp_path, n_startup_trials=2)
    sched = scheduler(m, phase_aware=True)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    trial = fake_trial("c")
    assert sched.on_trial_result(None, trial, result(10, -2.9)) == TrialScheduler.CONTINUE
    ramping = result(20, -60.0, at_beta_max=False)
    assert sched.on_trial_result(None, trial, ramping) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trial, result(30, -1.0)) == TrialScheduler.CONTINUE
    assert m.find("c").intermediate_values == {10: -2.9, 30: -1.0}
    poor = fake_trial("d")  # the same rule still prunes a trial worse at its own step
    assert sched.on_trial_result(None, poor, result(10, -3.5)) == TrialScheduler.STOP


def test_a_step_with_too_few_references_decides_nothing(tmp_path) -> None:
    """Only one completed trial was at β_max at step 20: no median of one is used."""
    m = mirror(tmp_path, n_startup_trials=2)
    sched = scheduler(m, phase_aware=True)
    a, b = fake_trial("a"), fake_trial("b")
    for trial, at_20 in ((a, True), (b, False)):
        for step, value in ((10, -3.0), (20, -2.0), (30, -1.0)):
            sched.on_trial_result(None, trial, result(step, value, at_beta_max=step != 20
                                                      or at_20, final=step == 30))
        sched.on_trial_complete(None, trial, result(30, -1.0, final=True))
    poor = fake_trial("c")
    sched.on_trial_result(None, poor, result(10, -2.9))
    assert sched.on_trial_result(None, poor, result(20, -50.0)) == TrialScheduler.CONTINUE


def test_a_trial_never_at_beta_max_is_judged_at_every_step_after_the_grace(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=2)
    sched = scheduler(m, phase_aware=True, grace_step=20)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    ramping = fake_trial("c")
    assert sched.on_trial_result(None, ramping, result(20, -1.9, at_beta_max=False)) \
        == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, ramping, result(30, -1.05, at_beta_max=False)) \
        == TrialScheduler.CONTINUE
    assert m.find("c").intermediate_values == {20: -1.9, 30: -1.05}


def test_plain_mode_prunes_a_trial_that_is_still_ramping(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=2)
    sched = scheduler(m, phase_aware=False)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    ramping = fake_trial("c")
    # the same result the phase-aware scheduler ignores (see above) prunes in plain mode
    assert sched.on_trial_result(None, ramping, result(10, -50.0, at_beta_max=False)) == TrialScheduler.STOP


def test_final_result_is_never_pruned(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=1)
    sched = scheduler(m, phase_aware=False)
    complete(sched, fake_trial("a"), [-1.0])
    late = fake_trial("b")
    assert sched.on_trial_result(None, late, result(10, -99.0, final=True)) == TrialScheduler.CONTINUE


def test_twin_records_params_and_seed(tmp_path) -> None:
    m = mirror(tmp_path)
    sched = scheduler(m)
    sched.on_trial_result(None, fake_trial("a", n_cycles=1, seed=3), result(10, -1.0))
    twin = m.find("a")
    assert twin.params == {"n_cycles": 1, "ratio": 0.5, "ramp": "linear", "beta_max": 1.0}
    assert twin.user_attrs == {"tune_trial_id": "a", "seed": 3}


def test_scheduler_survives_pickling_and_reattaches(tmp_path) -> None:
    """After a restore (unpickled scheduler, same storage) no duplicate twin is created and a
    pruned twin stays pruned."""
    m = mirror(tmp_path, n_startup_trials=2)
    sched = scheduler(m, phase_aware=False)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    running, poor = fake_trial("c"), fake_trial("d")
    sched.on_trial_result(None, running, result(10, -3.0))
    assert sched.on_trial_result(None, poor, result(10, -80.0)) == TrialScheduler.STOP
    restored: OptunaPruningScheduler = pickle.loads(pickle.dumps(sched))
    assert restored.on_trial_result(None, running, result(20, -2.0)) == TrialScheduler.CONTINUE
    assert restored.on_trial_result(None, poor, result(10, -80.0)) == TrialScheduler.STOP
    ids = [t.user_attrs["tune_trial_id"] for t in restored.mirror.study.get_trials()]
    assert sorted(ids) == ["a", "b", "c", "d"]
    assert restored.mirror.find("c").intermediate_values == {10: -3.0, 20: -2.0}


def test_error_marks_twin_failed(tmp_path) -> None:
    m = mirror(tmp_path)
    sched = scheduler(m)
    trial = fake_trial("a")
    sched.on_trial_result(None, trial, result(10, -1.0))
    sched.on_trial_error(None, trial)
    assert m.state_of("a") == TrialState.FAIL


def test_a_trial_at_beta_max_before_the_minimum_share_is_not_judged_mid_ramp_later(tmp_path):
    """A cyclical trial at β_max before min_step, mid-ramp at and after min_step and the
    grace: nothing is reported until its next fixing stage."""
    m = mirror(tmp_path, n_startup_trials=2)
    sched = scheduler(m, phase_aware=True, min_step=20, grace_step=20)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    trial = fake_trial("c")
    assert sched.on_trial_result(None, trial, result(10, -1.5)) == TrialScheduler.CONTINUE
    assert m.find("c").intermediate_values == {}  # before min_step: nothing reported
    sched.on_trial_result(None, trial, result(20, -60.0, at_beta_max=False))
    assert m.find("c").intermediate_values == {}
    sched.on_trial_result(None, trial, result(30, -1.05))
    assert m.find("c").intermediate_values == {30: -1.05}


def test_minimize_objective_prunes_the_high_values(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=2, direction="minimize")
    sched = scheduler(m, phase_aware=False, metric="rec", mode="min", final_metric="rec")
    for name, values in (("a", [3.0, 2.0, 1.0]), ("b", [3.1, 2.1, 1.1])):
        trial = fake_trial(name)
        for i, v in enumerate(values, start=1):
            sched.on_trial_result(None, trial, {"valid/rec": v, "step": 10 * i,
                                                "at_beta_max": True, "final": i == 3})
        sched.on_trial_complete(None, trial, {"valid/rec": values[-1], "step": 30, "final": True})
    assert m.find("a").value == 1.0
    good, poor = fake_trial("c"), fake_trial("d")
    low = {"valid/rec": 0.5, "step": 10, "at_beta_max": True}
    high = {"valid/rec": 50.0, "step": 10, "at_beta_max": True}
    assert sched.on_trial_result(None, good, low) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, poor, high) == TrialScheduler.STOP


def test_a_completed_trial_with_a_non_finite_objective_is_failed(tmp_path) -> None:
    m = mirror(tmp_path)
    sched = scheduler(m, phase_aware=False)
    trial = fake_trial("a")
    sched.on_trial_result(None, trial, result(10, -1.0))
    sched.on_trial_complete(None, trial, result(20, float("nan"), final=True))
    assert m.state_of("a") == TrialState.FAIL


def test_mirror_rejects_an_unknown_direction(tmp_path) -> None:
    with pytest.raises(ValueError, match="direction must be"):
        mirror(tmp_path, direction="up")


# --- the policy the driver builds from a spec ---------------------------------------------------
def _spec(**sections: Any):
    from study._spec import parse_spec

    data = {"name": "p", "model": {"kind": "toy"}, "data": {"kind": "toy"},
            "train": {"total_steps": 1000, "eval_every_steps": 60},
            "schedule": {"n_cycles": [1, 4], "ratio": [0.5]}, **sections}
    return parse_spec(data)


def test_policy_steps_lie_on_the_evaluation_grid() -> None:
    from study._driver import pruning_policy

    policy = pruning_policy(_spec())
    # 25% of 1000 = 250 -> the next evaluation is 300; 50% = 500 -> 540
    assert (policy.min_step, policy.grace_step) == (300, 540)
    assert (policy.metric, policy.mode, policy.final_metric) == ("elbo", "max", "elbo")


def test_policy_follows_the_objective_and_options() -> None:
    from study._driver import pruning_policy

    spec = _spec(objective={"metric": "iw_nll"},
                 pruning={"min_share": 0.0, "fixing_grace_share": 0.1, "phase_aware": False})
    policy = pruning_policy(spec)
    assert (policy.min_step, policy.grace_step) == (0, 120)
    assert (policy.metric, policy.mode, policy.final_metric) == ("nll_elbo", "min", "iw_nll")
    assert policy.phase_aware is False


def test_grace_is_never_before_the_minimum_share() -> None:
    from study._driver import pruning_policy

    policy = pruning_policy(_spec(pruning={"min_share": 0.8, "fixing_grace_share": 0.1}))
    assert policy.grace_step == policy.min_step == 840


def test_a_share_of_one_is_the_last_step_even_off_the_interval() -> None:
    from study._driver import pruning_policy

    assert pruning_policy(_spec(pruning={"min_share": 1.0})).min_step == 1000


def test_pruner_none_makes_each_twin_once_and_reports_no_intermediates(tmp_path) -> None:
    m = mirror(tmp_path, "none")
    sched = scheduler(m, phase_aware=False)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    poor = fake_trial("b")
    for step in (10, 20):
        assert sched.on_trial_result(None, poor, result(step, -50.0)) == TrialScheduler.CONTINUE
    assert m.state_of("b") == TrialState.RUNNING and m.find("b").intermediate_values == {}
    assert m.find("a").state == TrialState.COMPLETE and m.find("a").value == -1.0
    assert len(m.study.get_trials()) == 2  # one twin per trial, however many reports
    restored = pickle.loads(pickle.dumps(sched))  # a resumed driver finds the twin again
    restored.on_trial_result(None, poor, result(30, -40.0))
    assert len(restored.mirror.study.get_trials()) == 2


def test_a_scheduler_pickled_by_an_older_klstudy_still_works(tmp_path) -> None:
    """tuner.pkl of a study started before ``_twinned`` existed: resume must not crash."""
    m = mirror(tmp_path, "none")
    state = scheduler(m, phase_aware=False).__getstate__()
    del state["_twinned"], state["_fixed"]  # what an older version's tuner.pkl holds
    state["_carried"] = {"a": -2.0}  # a field of the carried-forward design
    restored = OptunaPruningScheduler.__new__(OptunaPruningScheduler)
    restored.__setstate__(state)  # what unpickling does
    trial = fake_trial("a")
    assert restored.on_trial_result(None, trial, result(10, -2.0)) == TrialScheduler.CONTINUE
    assert m.state_of("a") == TrialState.RUNNING


def test_a_restored_scheduler_knows_a_trial_was_fixed_before_the_minimum_share(tmp_path):
    """M 4, R 0.5, T 1,000, evaluations every 100: β_max at 200, 400 and 500, ramping again at
    600. With min_share and the grace at 600, nothing before 600 is reported; the restored
    scheduler must still know that the trial has had its fixing stage, and not judge its
    mid-ramp value at 600 as that of a trial never at β_max."""
    from workers import fixing_stage_eval

    m = mirror(tmp_path, n_startup_trials=0)
    sched = scheduler(m, phase_aware=True, min_step=600, grace_step=600)
    cfg = TrialConfig(trial_id="c", n_cycles=4, ratio=0.5, total_steps=1000,
                      eval_every_steps=100)
    trial = FakeTrial({"trial": cfg.to_dict()})

    def at(step: int) -> dict:
        fixing = fixing_stage_eval(step, total_steps=1000, n_cycles=4, ratio=0.5,
                                   eval_every_steps=100)
        return result(step, -1.0, at_beta_max=fixing)

    assert [at(s)["at_beta_max"] for s in (100, 200, 600, 700)] == [False, True, False, True]
    for step in range(100, 600, 100):
        sched.on_trial_result(None, trial, at(step))
    restored: OptunaPruningScheduler = pickle.loads(pickle.dumps(sched))  # Tune's restore
    assert restored.on_trial_result(None, trial, at(600)) == TrialScheduler.CONTINUE
    assert m.find("c").intermediate_values == {}
    restored.on_trial_result(None, trial, at(700))
    assert m.find("c").intermediate_values == {700: -1.0}


def test_results_replayed_from_a_final_checkpoint_are_never_judged(tmp_path) -> None:
    """A restored worker re-reports a finished trial's evaluations: none is judged again."""
    m = mirror(tmp_path, n_startup_trials=2)
    sched = scheduler(m, phase_aware=False)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    done = fake_trial("c")
    for step in (10, 20):
        replayed = {**result(step, -50.0), "replayed": True}
        assert sched.on_trial_result(None, done, replayed) == TrialScheduler.CONTINUE
    assert m.find("c") is None or m.find("c").intermediate_values == {}


def test_a_twin_enqueued_by_a_killed_driver_is_taken_not_duplicated(tmp_path) -> None:
    """A driver killed between enqueueing a twin and asking for it leaves a WAITING trial with
    the twin's params; the next driver takes that one instead of adding a second twin."""
    m = mirror(tmp_path)
    params = {"n_cycles": 1, "ratio": 0.5, "ramp": "linear", "beta_max": 1.0}
    m.study.enqueue_trial(params, skip_if_exists=False)  # the killed driver's last act
    twin = m.ensure("a", params, seed=0)
    trials = m.study.get_trials()
    assert len(trials) == 1, [(t.number, t.state) for t in trials]
    assert twin.params == params and twin.user_attrs["tune_trial_id"] == "a"
    assert trials[0].state == TrialState.RUNNING
