"""The β schedule of DESIGN §1 (paper eq. 6–7) and the learning-rate schedule.

Notation: T total steps, M cycles, R ratio, P = ⌈T/M⌉ the period in steps,
τ(t) = ((t − 1) mod P) / (T/M).
"""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers import (
    RAMPS,
    at_beta_max,
    beta_at,
    cycle_position,
    fixing_stage_eval,
    is_cycle_end,
    is_evaluation_step,
    last_evaluation_of_cycle,
    lr_at,
    ramp_value,
)

PROPERTY = settings(max_examples=100, deadline=None)


@st.composite
def schedules(draw, ratio: st.SearchStrategy[float] | None = None):
    """(T, M, R, ramp, β_max) with M ≤ T ≤ 2000; M often does not divide T."""
    total = draw(st.integers(1, 2000))
    n_cycles = draw(st.integers(1, min(total, 40)) | st.integers(1, total))
    return {
        "total_steps": total,
        "n_cycles": n_cycles,
        "ratio": draw(st.floats(0.0, 1.0) if ratio is None else ratio),
        "ramp": draw(st.sampled_from(RAMPS)),
        "beta_max": draw(st.floats(1e-3, 10.0)),
    }


def _betas(s: dict) -> list[float]:
    return [beta_at(t, **s) for t in range(1, s["total_steps"] + 1)]


def _period(s: dict) -> int:
    return math.ceil(s["total_steps"] / s["n_cycles"])


def _full_cycles(s: dict) -> list[range]:
    """Step ranges of the cycles that have all P steps (the last one may be truncated)."""
    p = _period(s)
    return [range(c * p + 1, c * p + p + 1) for c in range(s["total_steps"] // p)]


# --- properties over (T, M, R, ramp, β_max) ----------------------------------------------------
@PROPERTY
@given(schedules())
def test_beta_stays_within_zero_and_beta_max(s):
    assert all(0.0 <= b <= s["beta_max"] for b in _betas(s))


@PROPERTY
@given(schedules())
def test_beta_at_first_step_is_zero_or_beta_max_when_constant(s):
    expected = s["beta_max"] if s["ratio"] == 0.0 else 0.0
    assert beta_at(1, **s) == expected


@PROPERTY
@given(schedules())
def test_full_cycle_reaches_beta_max_exactly_iff_a_step_reaches_tau_ratio(s):
    # The largest τ of a full cycle is (P − 1)·M/T (exact rational). β = β_max exactly at a step
    # with τ > R (fixing stage) or τ = R (g(1) = 1); otherwise β = β_max·g(τ/R) with τ/R < 1.
    # Within float rounding of τ (|margin| ≤ 1e-6) both outcomes are legitimate: cosine's
    # g(1 − δ) = 1 − (πδ)²/4 rounds to 1.0 for δ ≲ 1e-8. R = 1 has margin ≤ −1/T: never reached.
    tau_max = Fraction((_period(s) - 1) * s["n_cycles"], s["total_steps"])
    margin = tau_max - Fraction(s["ratio"])
    for cycle in _full_cycles(s):
        reached = any(beta_at(t, **s) == s["beta_max"] for t in cycle)
        if s["ratio"] == 0.0 or margin > 1e-6:
            assert reached
        elif margin < -1e-6:
            assert not reached


@PROPERTY
@given(schedules())
def test_beta_is_periodic_with_period_ceil_t_over_m(s):
    betas, p = _betas(s), _period(s)
    assert all(betas[i] == betas[i + p] for i in range(len(betas) - p))


@PROPERTY
@given(schedules())
def test_beta_is_non_decreasing_inside_each_cycle(s):
    betas, p = _betas(s), _period(s)
    for start in range(0, len(betas), p):
        cycle = betas[start : start + p]
        assert all(a <= b for a, b in pairwise(cycle))


@PROPERTY
@given(schedules(ratio=st.just(1.0)))
def test_ratio_one_ramps_over_the_whole_cycle_without_reaching_beta_max(s):
    # τ ≤ (P − 1)·M/T ≤ 1 − 1/T < 1, so g(τ) ≤ g(1 − 1/2000) < 1 − 1e-7 for every ramp:
    # β_max is approached, never reached, and no step is outside the ramp.
    betas = _betas(s)
    assert all(b < s["beta_max"] for b in betas)
    for cycle in _full_cycles(s):
        if len(cycle) > 1:
            assert all(beta_at(t, **s) < beta_at(t + 1, **s) for t in cycle[:-1])


@PROPERTY
@given(schedules(ratio=st.just(0.0)))
def test_ratio_zero_is_the_constant_schedule(s):
    assert set(_betas(s)) == {s["beta_max"]}


@PROPERTY
@given(schedules())
def test_single_cycle_is_monotonic(s):
    s = {**s, "n_cycles": 1}
    betas = _betas(s)
    assert all(a <= b for a, b in pairwise(betas))


@PROPERTY
@given(schedules())
def test_at_beta_max_marks_the_fixing_stage(s):
    for t in range(1, s["total_steps"] + 1):
        tau = cycle_position(t, total_steps=s["total_steps"], n_cycles=s["n_cycles"])
        fixed = at_beta_max(
            t, total_steps=s["total_steps"], n_cycles=s["n_cycles"], ratio=s["ratio"]
        )
        if s["ratio"] == 1.0:
            end = is_cycle_end(t, total_steps=s["total_steps"], n_cycles=s["n_cycles"])
            assert fixed == end
        else:
            assert fixed == (tau >= s["ratio"])
            assert not fixed or beta_at(t, **s) == s["beta_max"]


# --- ramps -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ramp", RAMPS)
def test_ramp_endpoints_are_exact(ramp):
    assert ramp_value(0.0, ramp) == 0.0
    assert ramp_value(1.0, ramp) == 1.0


@pytest.mark.parametrize("ramp", RAMPS)
def test_ramp_is_continuous_at_the_endpoints(ramp):
    # The official code's sigmoid starts at σ(−6) ≈ 0.0025, not 0; ours is rescaled.
    assert ramp_value(1e-9, ramp) == pytest.approx(0.0, abs=1e-6)
    assert ramp_value(1.0 - 1e-9, ramp) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("ramp", RAMPS)
def test_ramp_midpoint_is_one_half(ramp):
    assert ramp_value(0.5, ramp) == pytest.approx(0.5, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(RAMPS), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_ramp_is_non_decreasing(ramp, u, v):
    lo, hi = sorted((u, v))
    assert ramp_value(lo, ramp) <= ramp_value(hi, ramp)


@pytest.mark.parametrize(
    ("ramp", "u", "expected"),
    [
        ("linear", 0.3, 0.3),
        # (1 − cos(0.48π)) / 2 = (1 − 0.0627905) / 2
        ("cosine", 0.48, 0.4686047402),
        # (σ(−3) − σ(−6)) / (σ(6) − σ(−6)) = (0.0474259 − 0.0024726) / 0.9950548
        ("sigmoid", 0.25, 0.0451766597),
    ],
)
def test_ramp_values_by_hand(ramp, u, expected):
    assert ramp_value(u, ramp) == pytest.approx(expected, abs=1e-9)


# --- hand-computed schedules -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (1, 0.0),  # τ = 0/25
        (7, 0.48),  # τ = 6/25 = 0.24, g(0.24/0.5) = 0.48
        (13, 0.96),  # τ = 12/25 = 0.48, g(0.96)
        (14, 1.0),  # τ = 13/25 = 0.52 > R: fixing stage
        (25, 1.0),  # τ = 24/25, last step of cycle 1
        (26, 0.0),  # τ = 0: cycle 2 restarts at 0
        (38, 0.96),  # same position as step 13
        (100, 1.0),
    ],
)
def test_linear_schedule_t100_m4_r05(step, expected):
    # T = 100, M = 4: P = ⌈100/4⌉ = 25 = T/M, τ(t) = ((t − 1) mod 25) / 25.
    assert beta_at(step, total_steps=100, n_cycles=4, ratio=0.5) == pytest.approx(expected)


def test_beta_max_scales_the_schedule():
    # Same T = 100, M = 4, R = 0.5 at step 13: 0.5 · 0.96.
    beta = beta_at(13, total_steps=100, n_cycles=4, ratio=0.5, beta_max=0.5)
    assert beta == pytest.approx(0.48)


def test_cosine_schedule_by_hand():
    # T = 100, M = 4, R = 0.5, step 7: u = 0.24/0.5 = 0.48, g = (1 − cos(0.48π))/2 = 0.4686047.
    beta = beta_at(7, total_steps=100, n_cycles=4, ratio=0.5, ramp="cosine")
    assert beta == pytest.approx(0.4686047402, abs=1e-9)


def test_truncated_last_cycle_when_period_does_not_divide_t():
    # T = 10, M = 4: P = ⌈2.5⌉ = 3 but T/M = 2.5, so τ = (t − 1 mod 3)/2.5 ∈ {0, 0.4, 0.8}.
    # Three full cycles (steps 1–3, 4–6, 7–9) and a truncated fourth (step 10 alone), which
    # restarts the ramp: with R = 0.5 the last training step has β = 0.
    betas = [beta_at(t, total_steps=10, n_cycles=4, ratio=0.5) for t in range(1, 11)]
    assert betas == pytest.approx([0.0, 0.8, 1.0, 0.0, 0.8, 1.0, 0.0, 0.8, 1.0, 0.0])


def test_tau_equal_to_ratio_gives_beta_max_and_counts_as_fixing_stage():
    # T = 4, M = 1: τ(4) = 3/4 = R exactly, β = g(1) = 1.
    assert beta_at(4, total_steps=4, n_cycles=1, ratio=0.75) == 1.0
    assert at_beta_max(4, total_steps=4, n_cycles=1, ratio=0.75)
    assert not at_beta_max(3, total_steps=4, n_cycles=1, ratio=0.75)


@pytest.mark.parametrize(
    ("total", "n_cycles", "ends"),
    [(100, 4, [25, 50, 75, 100]), (10, 4, [3, 6, 9, 10]), (7, 1, [7]), (5, 5, [1, 2, 3, 4, 5])],
)
def test_is_cycle_end(total, n_cycles, ends):
    found = [
        t for t in range(1, total + 1) if is_cycle_end(t, total_steps=total, n_cycles=n_cycles)
    ]
    assert found == ends


def test_at_beta_max_with_ratio_one_is_the_last_step_of_each_cycle():
    fixed = [t for t in range(1, 11) if at_beta_max(t, total_steps=10, n_cycles=4, ratio=1.0)]
    assert fixed == [3, 6, 9, 10]


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"step": 0}, r"step must be in \[1, total_steps=10\], got 0"),
        ({"step": 11}, r"step must be in \[1, total_steps=10\], got 11"),
        ({"n_cycles": 0}, r"n_cycles must be at least 1, got 0"),
        ({"n_cycles": 11}, r"n_cycles must be <= total_steps=10, got 11"),
        ({"total_steps": 0, "step": 1, "n_cycles": 1}, r"total_steps must be at least 1, got 0"),
        ({"ratio": -0.1}, r"ratio must be in \[0, 1\], got -0.1"),
        ({"ratio": 1.5}, r"ratio must be in \[0, 1\], got 1.5"),
        ({"ratio": float("nan")}, r"ratio must be in \[0, 1\], got nan"),
        ({"beta_max": 0.0}, r"beta_max must be > 0, got 0.0"),
        ({"beta_max": -1.0}, r"beta_max must be > 0, got -1.0"),
        ({"ramp": "tanh"}, r"ramp must be one of .*, got 'tanh'"),
        ({"ramp": "tanh", "step": 1}, r"got 'tanh'"),  # τ = 0: g is never evaluated
        ({"ramp": "tanh", "step": 10}, r"got 'tanh'"),  # τ > R: fixing stage
    ],
)
def test_beta_at_rejects_bad_arguments(overrides, match):
    args = {"step": 5, "total_steps": 10, "n_cycles": 2, "ratio": 0.5, "ramp": "linear"}
    args |= overrides
    step = args.pop("step")
    with pytest.raises(ValueError, match=match):
        beta_at(step, **args)


def test_ramp_value_rejects_unknown_ramp_at_the_endpoints():
    with pytest.raises(ValueError, match="got 'tanh'"):
        ramp_value(0.0, "tanh")  # type: ignore[arg-type]


# --- learning rate -----------------------------------------------------------------------------
def test_constant_lr_is_constant():
    lrs = {lr_at(t, lr=3e-4, total_steps=50, n_cycles=3) for t in range(1, 51)}
    assert lrs == {3e-4}


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (1, 1e-3),  # τ = 0: cos 0 = 1
        (6, 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.25))),  # τ = 5/20
        (11, 0.5e-3),  # τ = 10/20 = ½: mid-cycle
        (20, 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.95))),  # last step of cycle 1
        (21, 1e-3),  # cycle 2 restarts
        (31, 0.5e-3),
    ],
)
def test_cyclical_cosine_lr_by_hand(step, expected):
    # T = 100, M = 5: P = T/M = 20, τ(t) = ((t − 1) mod 20) / 20.
    lr = lr_at(step, lr=1e-3, schedule="cyclical_cosine", total_steps=100, n_cycles=5)
    assert lr == pytest.approx(expected, rel=1e-12)


@PROPERTY
@given(schedules())
def test_cyclical_cosine_lr_restarts_with_each_beta_cycle(s):
    total, n_cycles = s["total_steps"], s["n_cycles"]
    lrs = [
        lr_at(t, lr=0.1, schedule="cyclical_cosine", total_steps=total, n_cycles=n_cycles)
        for t in range(1, total + 1)
    ]
    p = _period(s)
    assert all(0.0 < lr <= 0.1 for lr in lrs)
    assert all(lrs[i] == 0.1 for i in range(0, total, p))
    assert all(lrs[i] == lrs[i + p] for i in range(total - p))


@pytest.mark.parametrize("schedule", ["constant", "cyclical_cosine"])
def test_lr_at_rejects_step_out_of_range(schedule):
    with pytest.raises(ValueError, match="got 11"):
        lr_at(11, lr=1e-3, schedule=schedule, total_steps=10, n_cycles=2)


def test_lr_at_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="got 'step'"):
        lr_at(1, lr=1e-3, schedule="step", total_steps=10, n_cycles=2)  # type: ignore[arg-type]


# --- the fixing-stage flag on the evaluation grid ----------------------------------------------
@st.composite
def eval_grids(draw):
    """(T, M, R, eval_every): intervals that often do not divide ⌈T/M⌉, R often 1 or near 1."""
    s = draw(schedules(ratio=st.sampled_from([0.0, 0.25, 0.5, 0.9, 0.99, 1.0]) | st.floats(0, 1)))
    every = draw(st.integers(1, s["total_steps"]) | st.integers(1, max(1, _period(s) * 2)))
    return {"total_steps": s["total_steps"], "n_cycles": s["n_cycles"], "ratio": s["ratio"],
            "eval_every_steps": min(every, s["total_steps"])}


def _evaluations(g: dict) -> list[int]:
    every, total = g["eval_every_steps"], g["total_steps"]
    return sorted({*range(every, total + 1, every), total})


def _cycles(g: dict) -> list[range]:
    p = math.ceil(g["total_steps"] / g["n_cycles"])
    return [range(a, min(a + p, g["total_steps"] + 1)) for a in range(1, g["total_steps"] + 1, p)]


def _flag(t: int, g: dict) -> bool:
    return fixing_stage_eval(t, **g)


def _fixed(t: int, g: dict) -> bool:
    return at_beta_max(t, total_steps=g["total_steps"], n_cycles=g["n_cycles"], ratio=g["ratio"])


@PROPERTY
@given(eval_grids())
def test_every_cycle_with_an_evaluation_has_a_flagged_one(g):
    evals = set(_evaluations(g))
    for cycle in _cycles(g):
        inside = [t for t in cycle if t in evals]
        if inside:
            assert any(_flag(t, g) for t in inside), (cycle, inside)


@PROPERTY
@given(eval_grids())
def test_a_flagged_evaluation_is_at_beta_max_or_the_last_of_its_cycle(g):
    evals = _evaluations(g)
    for cycle in _cycles(g):
        inside = [t for t in cycle if t in evals]
        for t in inside:
            if _flag(t, g):
                assert _fixed(t, g) or t == inside[-1]
            if _fixed(t, g):  # every evaluation at β = β_max is flagged
                assert _flag(t, g)
        if inside:
            assert last_evaluation_of_cycle(inside[0], **{k: g[k] for k in (
                "total_steps", "n_cycles", "eval_every_steps")}) == inside[-1]


@PROPERTY
@given(eval_grids())
def test_steps_that_are_not_evaluations_are_never_flagged(g):
    evals = set(_evaluations(g))
    for t in range(1, g["total_steps"] + 1):
        if t not in evals:
            assert not _flag(t, g)
            assert not is_evaluation_step(t, total_steps=g["total_steps"],
                                          eval_every_steps=g["eval_every_steps"])


@PROPERTY
@given(eval_grids())
def test_with_an_evaluation_in_the_fixing_stage_no_ramp_evaluation_is_flagged(g):
    evals = _evaluations(g)
    for cycle in _cycles(g):
        inside = [t for t in cycle if t in evals]
        if any(_fixed(t, g) for t in inside):
            assert all(_flag(t, g) == _fixed(t, g) for t in inside)


def test_fixing_stage_flag_when_the_interval_misses_cycle_ends():
    # The case: T 10000, M 8, R 1, eval every 200: P = 1250, cycle ends 1250, 2500, …
    # mostly fall between evaluations; each cycle's last evaluation is flagged instead.
    g = {"total_steps": 10_000, "n_cycles": 8, "ratio": 1.0, "eval_every_steps": 200}
    flagged = [t for t in _evaluations(g) if _flag(t, g)]
    assert flagged == [1200, 2400, 3600, 5000, 6200, 7400, 8600, 10_000]
    # R = 0.5 on the same grid: every evaluation from the middle of a cycle on.
    g["ratio"] = 0.5
    first_cycle = [t for t in _evaluations(g) if _flag(t, g) and t <= 1250]
    assert first_cycle == [800, 1000, 1200]  # τ(t) ≥ 0.5 ⇔ t − 1 ≥ 625


def test_fixing_stage_flag_on_a_truncated_last_cycle():
    # T = 10, M = 4, R = 0.5, eval every 5: cycles 1–3, 4–6, 7–9, 10. Step 5 (τ 0.4) is the
    # last evaluation of cycle 2 and has none at β_max; step 10 restarts at β = 0 and is the
    # only evaluation of the truncated cycle 4.
    g = {"total_steps": 10, "n_cycles": 4, "ratio": 0.5, "eval_every_steps": 5}
    assert [t for t in (5, 10) if _flag(t, g)] == [5, 10]
    assert not _fixed(5, g) and not _fixed(10, g)


def test_fixing_stage_eval_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"eval_every_steps must be at least 1, got 0"):
        fixing_stage_eval(1, total_steps=10, n_cycles=1, ratio=0.5, eval_every_steps=0)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\], got 2"):
        fixing_stage_eval(1, total_steps=10, n_cycles=1, ratio=2, eval_every_steps=1)
    with pytest.raises(ValueError, match=r"step must be in"):
        fixing_stage_eval(11, total_steps=10, n_cycles=1, ratio=0.5, eval_every_steps=1)
