"""The paper's β schedule (Fu et al. 2019, eq. 6–7) and the learning-rate schedule.

Pure, closed-form functions of the 1-based optimizer step ``t``: no state, no arrays.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

Ramp = Literal["linear", "sigmoid", "cosine"]
LrSchedule = Literal["constant", "cyclical_cosine"]

RAMPS: tuple[str, ...] = get_args(Ramp)
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)

_SIGMOID_K = 12.0  # steepness of the official code's 1/(1+exp(-(12v-6)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


_SIG_LO = _sigmoid(-_SIGMOID_K / 2)
_SIG_HI = _sigmoid(_SIGMOID_K / 2)


def ramp_value(u: float, ramp: Ramp) -> float:
    """g(u) on [0, 1]: increasing, g(0) = 0 and g(1) = 1 exactly."""
    _check_ramp(ramp)
    if u <= 0.0:
        return 0.0
    if u >= 1.0:
        return 1.0
    if ramp == "linear":
        return u
    if ramp == "cosine":
        return (1.0 - math.cos(math.pi * u)) / 2.0
    if ramp == "sigmoid":
        s = _sigmoid(_SIGMOID_K * (u - 0.5))
        return (s - _SIG_LO) / (_SIG_HI - _SIG_LO)
    raise AssertionError(ramp)  # unreachable: _check_ramp


def _check_ramp(ramp: str) -> None:
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")


def _check_step(step: int, total_steps: int, n_cycles: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if n_cycles < 1:
        raise ValueError(f"n_cycles must be at least 1, got {n_cycles}")
    if n_cycles > total_steps:
        raise ValueError(f"n_cycles must be <= total_steps={total_steps}, got {n_cycles}")
    if not 1 <= step <= total_steps:
        raise ValueError(f"step must be in [1, total_steps={total_steps}], got {step}")


def cycle_position(step: int, *, total_steps: int, n_cycles: int) -> float:
    """τ(t) = mod(t − 1, ⌈T/M⌉) / (T/M): the position of step t inside its cycle, in [0, 1)."""
    _check_step(step, total_steps, n_cycles)
    period = math.ceil(total_steps / n_cycles)
    return ((step - 1) % period) / (total_steps / n_cycles)


def beta_at(
    step: int,
    *,
    total_steps: int,
    n_cycles: int,
    ratio: float,
    ramp: Ramp = "linear",
    beta_max: float = 1.0,
    beta_min: float = 0.0,
) -> float:
    """β at optimizer step ``step`` (1-based), per the paper's eq. 6–7.

    Args:
        step: the paper's t, in [1, total_steps].
        total_steps: T, the trial's total number of optimizer steps.
        n_cycles: M ≥ 1; M = 1 is monotonic annealing.
        ratio: R ∈ [0, 1], the proportion of each cycle spent ramping; R = 0 is the constant schedule.
        ramp: the ramp function g.
        beta_max: β in the fixing stage, > 0.
        beta_min: where each ramp starts, in [0, β_max] (the official PTB scripts start at
            0.1); 0 is the paper's schedule.

    Returns:
        β_min + (β_max − β_min) · g(τ/R) while τ ≤ R (R > 0), β_max otherwise.

    Raises:
        ValueError: for an argument outside the ranges above.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if not beta_max > 0.0:
        raise ValueError(f"beta_max must be > 0, got {beta_max}")
    if not 0.0 <= beta_min <= beta_max:
        raise ValueError(f"beta_min must be in [0, beta_max={beta_max}], got {beta_min}")
    _check_ramp(ramp)
    tau = cycle_position(step, total_steps=total_steps, n_cycles=n_cycles)
    if ratio > 0.0 and tau <= ratio:
        # β_min = 0 gives exactly β_max · g (0 + x and x − 0 are exact): the paper's schedule
        return beta_min + (beta_max - beta_min) * ramp_value(tau / ratio, ramp)
    return beta_max


def at_beta_max(step: int, *, total_steps: int, n_cycles: int, ratio: float) -> bool:
    """True when step t is in a fixing stage (β = β_max).

    With R = 1 the ramp only approaches β_max; there the last step of each cycle counts
    as the fixing stage (DESIGN §4).
    """
    tau = cycle_position(step, total_steps=total_steps, n_cycles=n_cycles)
    if ratio <= 0.0 or tau >= ratio:  # τ = R: β = β_max · g(1) = β_max
        return True
    if ratio >= 1.0:
        return is_cycle_end(step, total_steps=total_steps, n_cycles=n_cycles)
    return False


def is_evaluation_step(step: int, *, total_steps: int, eval_every_steps: int) -> bool:
    """True when the trainer evaluates after step t: multiples of the interval, and T."""
    if eval_every_steps < 1:
        raise ValueError(f"eval_every_steps must be at least 1, got {eval_every_steps}")
    return 1 <= step <= total_steps and (step % eval_every_steps == 0 or step == total_steps)


def last_evaluation_of_cycle(
    step: int, *, total_steps: int, n_cycles: int, eval_every_steps: int
) -> int | None:
    """The last evaluation step inside the cycle that holds step t, or None when it has none.

    A cycle is the run of steps ``c·P + 1 … min((c + 1)·P, T)`` with P = ⌈T/M⌉; evaluations
    happen at multiples of ``eval_every_steps`` and at T.
    """
    _check_step(step, total_steps, n_cycles)
    if eval_every_steps < 1:
        raise ValueError(f"eval_every_steps must be at least 1, got {eval_every_steps}")
    period = math.ceil(total_steps / n_cycles)
    first = (step - 1) // period * period + 1
    last = min(first + period - 1, total_steps)
    if last == total_steps:
        return total_steps
    candidate = last // eval_every_steps * eval_every_steps
    return candidate if candidate >= first else None


def fixing_stage_eval(
    step: int, *, total_steps: int, n_cycles: int, ratio: float, eval_every_steps: int
) -> bool:
    """Whether the evaluation after step t stands for its cycle's fixing stage.

    True at every evaluation with β = β_max (:func:`at_beta_max`) and at the last evaluation
    of each cycle. The fixing stage is a suffix of its cycle, so whenever a cycle holds an
    evaluation at β = β_max its last evaluation is one of them; when it holds none (R = 1 or
    near 1, an interval that does not divide ⌈T/M⌉, or the short last cycle that restarts at
    β = 0) its last evaluation is the one closest to the end of the ramp and stands in for it.
    So every cycle that holds an evaluation has a flagged one. False for a step that is not
    an evaluation step (multiples of ``eval_every_steps``, and ``total_steps``).

    Raises:
        ValueError: for an argument outside the ranges of :func:`beta_at`, or
            ``eval_every_steps`` < 1.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    last = last_evaluation_of_cycle(
        step, total_steps=total_steps, n_cycles=n_cycles, eval_every_steps=eval_every_steps
    )
    if not is_evaluation_step(step, total_steps=total_steps, eval_every_steps=eval_every_steps):
        return False
    return step == last or at_beta_max(
        step, total_steps=total_steps, n_cycles=n_cycles, ratio=ratio
    )


def is_cycle_end(step: int, *, total_steps: int, n_cycles: int) -> bool:
    """True when step t is the last step of its cycle (or of training)."""
    _check_step(step, total_steps, n_cycles)
    period = math.ceil(total_steps / n_cycles)
    return step == total_steps or step % period == 0


def lr_at(
    step: int,
    *,
    lr: float,
    schedule: LrSchedule = "constant",
    total_steps: int,
    n_cycles: int,
) -> float:
    """Learning rate at step t: constant, or lr · ½(1 + cos(π·τ)) restarting every cycle.

    ``n_cycles`` is the number of learning-rate cycles: the β schedule's M by default
    (``TrialConfig.lr_n_cycles`` None), or a count of its own (paper Table 4's "Mon β + Cyc η":
    M = 1 for β, several cycles for η).
    """
    if schedule == "constant":
        _check_step(step, total_steps, n_cycles)
        return lr
    if schedule == "cyclical_cosine":
        tau = cycle_position(step, total_steps=total_steps, n_cycles=n_cycles)
        return lr * 0.5 * (1.0 + math.cos(math.pi * tau))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
