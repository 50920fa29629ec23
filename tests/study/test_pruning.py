"""The Optuna-pruner Tune scheduler, driven with small stand-ins for Tune trials."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.schedulers import TrialScheduler

from study._optuna_bridge import OptunaMirror, make_pruner
from study._pruning import OptunaPruningScheduler, pruning_value
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


def mirror(tmp_path, pruner: str = "median", **kwargs: Any) -> OptunaMirror:
    return OptunaMirror(f"sqlite:///{tmp_path / 'optuna.db'}", "s",
                        pruner_kwargs={"kind": pruner, **kwargs}, search_space=SPACE)


def complete(sched: OptunaPruningScheduler, trial: FakeTrial, values: list[float]) -> None:
    for i, v in enumerate(values, start=1):
        sched.on_trial_result(None, trial, result(10 * i, v, final=i == len(values)))
    sched.on_trial_complete(None, trial, result(10 * len(values), values[-1], final=True))


def test_pruning_value_plain_reports_every_value() -> None:
    assert pruning_value(result(5, -3.0, at_beta_max=False), phase_aware=False, carried=None) == -3.0


def test_pruning_value_phase_aware_waits_for_beta_max() -> None:
    assert pruning_value(result(5, -3.0, at_beta_max=False), phase_aware=True, carried=None) is None


def test_pruning_value_phase_aware_carries_last_fixed_value() -> None:
    assert pruning_value(result(5, -9.0, at_beta_max=False), phase_aware=True, carried=-2.0) == -2.0
    assert pruning_value(result(5, -1.5, at_beta_max=True), phase_aware=True, carried=-2.0) == -1.5


@pytest.mark.parametrize("kind", ["none", "median", "percentile", "successive_halving", "hyperband",
                                  "patient"])
def test_make_pruner_knows_every_kind(kind: str) -> None:
    assert isinstance(make_pruner(kind, max_resource_steps=100), optuna.pruners.BasePruner)


def test_make_pruner_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown pruner 'asha'"):
        make_pruner("asha")


def test_median_pruner_stops_a_poor_trial_and_tells_optuna(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=2)
    sched = OptunaPruningScheduler(m, phase_aware=False)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    poor = fake_trial("c")
    assert sched.on_trial_result(None, poor, result(10, -50.0)) == TrialScheduler.STOP
    sched.on_trial_complete(None, poor, result(10, -50.0))
    assert m.state_of("c") == TrialState.PRUNED
    assert m.state_of("a") == TrialState.COMPLETE
    assert m.find("a").value == -1.0


def test_phase_aware_never_prunes_before_beta_max(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=2)
    sched = OptunaPruningScheduler(m, phase_aware=True)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    ramping = fake_trial("c")
    decision = sched.on_trial_result(None, ramping, result(10, -50.0, at_beta_max=False))
    assert decision == TrialScheduler.CONTINUE
    assert m.find("c").intermediate_values == {}


def test_phase_aware_uses_carried_fixing_value(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=2)
    sched = OptunaPruningScheduler(m, phase_aware=True)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    trial = fake_trial("c")
    assert sched.on_trial_result(None, trial, result(10, -1.5)) == TrialScheduler.CONTINUE
    # mid-ramp dip: the pruner sees the carried -1.5 at step 20, better than the median -2.05
    assert sched.on_trial_result(None, trial, result(20, -60.0, at_beta_max=False)) == TrialScheduler.CONTINUE
    assert m.find("c").intermediate_values == {10: -1.5, 20: -1.5}


def test_plain_mode_prunes_a_trial_that_is_still_ramping(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=2)
    sched = OptunaPruningScheduler(m, phase_aware=False)
    complete(sched, fake_trial("a"), [-3.0, -2.0, -1.0])
    complete(sched, fake_trial("b"), [-3.1, -2.1, -1.1])
    ramping = fake_trial("c")
    # the same result the phase-aware scheduler ignores (see above) prunes in plain mode
    assert sched.on_trial_result(None, ramping, result(10, -50.0, at_beta_max=False)) == TrialScheduler.STOP


def test_final_result_is_never_pruned(tmp_path) -> None:
    m = mirror(tmp_path, n_startup_trials=1)
    sched = OptunaPruningScheduler(m, phase_aware=False)
    complete(sched, fake_trial("a"), [-1.0])
    late = fake_trial("b")
    assert sched.on_trial_result(None, late, result(10, -99.0, final=True)) == TrialScheduler.CONTINUE


def test_twin_records_params_and_seed(tmp_path) -> None:
    m = mirror(tmp_path)
    sched = OptunaPruningScheduler(m)
    sched.on_trial_result(None, fake_trial("a", n_cycles=1, seed=3), result(10, -1.0))
    twin = m.find("a")
    assert twin.params == {"n_cycles": 1, "ratio": 0.5, "ramp": "linear", "beta_max": 1.0}
    assert twin.user_attrs == {"tune_trial_id": "a", "seed": 3}


def test_scheduler_survives_pickling_and_reattaches(tmp_path) -> None:
    """After a restore (unpickled scheduler, same storage) no duplicate twin is created and a
    pruned twin stays pruned."""
    m = mirror(tmp_path, n_startup_trials=2)
    sched = OptunaPruningScheduler(m, phase_aware=False)
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
    sched = OptunaPruningScheduler(m)
    trial = fake_trial("a")
    sched.on_trial_result(None, trial, result(10, -1.0))
    sched.on_trial_error(None, trial)
    assert m.state_of("a") == TrialState.FAIL
