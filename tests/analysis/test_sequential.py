"""The group-sequential exact sign-flip test the race claims its verdict with
(analysis.sequential_sign_flip): its level over all looks, checked exactly by enumerating every
sign vector, and how early it can claim."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from analysis import pocock_spending, sequential_sign_flip
from analysis._signflip import sign_flip_test


def _crossing_rate(magnitudes: np.ndarray, looks: list[int], alpha: float) -> float:
    """Under the null every sign vector of the magnitudes is equally likely: the exact chance
    that the running means cross a boundary at some look."""
    hits = 0
    for signs in itertools.product((-1.0, 1.0), repeat=magnitudes.size):
        first, _, _ = sequential_sign_flip(magnitudes * np.array(signs), looks, looks[-1], alpha)
        hits += first is not None
    return hits / 2 ** magnitudes.size


@pytest.mark.parametrize("magnitudes", [
    np.ones(10),  # bimodal outcomes: every seed differs by the same amount
    np.array([0.25, 1.0, 0.5, 1.0, 0.75, 0.25, 1.0, 0.5, 1.0, 0.75]),
    np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0, 1.0, 0.5]),  # ties at zero
])
def test_the_chance_of_a_false_claim_over_all_looks_is_at_most_alpha(magnitudes) -> None:
    looks = list(range(3, 11))
    rate = _crossing_rate(magnitudes, looks, 0.05)
    assert 0.02 < rate <= 0.05 + 1e-12  # at most alpha, and not a test that never claims


def test_testing_every_look_at_alpha_would_claim_too_often() -> None:
    """The spending is needed: the fixed-sample test at 0.05 at every look of 10 seeds
    claims on more than 5% of null sign vectors."""
    magnitudes, looks = np.ones(10), list(range(3, 11))
    naive = sum(
        any(sign_flip_test(magnitudes[:m] * np.array(s[:m]))[1] <= 0.05 for m in looks)
        for s in itertools.product((-1.0, 1.0), repeat=magnitudes.size)) / 2 ** magnitudes.size
    assert naive > 0.05


@pytest.mark.parametrize(("n_final", "claimed_at"), [(8, 6), (10, 6), (12, 7), (20, 7)])
def test_every_seed_agreeing_is_claimed_as_early_as_the_exact_test_allows(
        n_final: int, claimed_at: int) -> None:
    """6 seeds are the fewest at which the exact test reaches 5% (2 / 2^6 = 0.031); with 12 or
    20 planned seeds the spending allows 0.031 only later, so the claim comes at 7."""
    looks = list(range(3, n_final + 1))
    first = None
    for k in range(1, len(looks) + 1):
        first, bounds, spent = sequential_sign_flip(np.ones(n_final), looks[:k], n_final, 0.05)
        if first is not None:
            break
    assert first is not None and looks[first] == claimed_at
    assert all(b == math.inf for b in bounds[:-1]) and bounds[-1] == pytest.approx(1.0)
    assert spent[-1] == pytest.approx(2 / 2 ** claimed_at)


def test_spending_never_passes_the_pocock_function() -> None:
    rng = np.random.default_rng(7)
    d = rng.normal(size=12)
    looks = list(range(3, 13))
    _, _, spent = sequential_sign_flip(d, looks, 12, 0.05)
    limits = [pocock_spending(m / 12, 0.05) for m in looks]
    assert all(s <= a + 1e-12 for s, a in zip(spent, limits, strict=True))
    assert spent == sorted(spent) and pocock_spending(1.0, 0.05) == pytest.approx(0.05)
    assert pocock_spending(0.5, 0.05) == pytest.approx(0.05 * math.log(1 + (math.e - 1) / 2))


def test_a_weak_mixed_effect_is_not_claimed_and_bad_looks_are_refused() -> None:
    d = np.array([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    assert sequential_sign_flip(d, [3, 4, 5, 6, 7, 8], 8, 0.05)[0] is None
    with pytest.raises(ValueError, match="looks must increase"):
        sequential_sign_flip(d, [4, 3], 8, 0.05)
    with pytest.raises(ValueError, match="within the 8 diffs"):
        sequential_sign_flip(d, [3, 9], 9, 0.05)
