"""Seed-level resampling: the exact sign-flip test, the sign-flip max-T comparison with the
best, and percentile bootstrap intervals over seeds.

Why sign flips: a seed fixes initialisation and data order for every configuration, so the
seed is the unit of replication and a study has few of them (3–12). Per-seed differences of
a KL-vanishing outcome are bimodal (a seed uses z or it does not), so a t-test's normal
approximation does not hold; under the null hypothesis "no effect" each seed's difference is
as likely to have either sign, and enumerating all 2^n sign vectors gives the exact
distribution of the mean with no model at all. Its smallest two-sided p is 2 / 2^n, so fewer
than ``min_seeds_to_reject(alpha)`` seeds cannot reject whatever the data.

Everything here is deterministic: exact enumeration up to :data:`EXACT_MAX_SEEDS` seeds, and
beyond that (and for the bootstrap) draws from a generator seeded with :data:`RNG_SEED`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

EXACT_MAX_SEEDS = 14  # 2^14 = 16,384 sign vectors: exact and still ~1 ms
N_RANDOM_SIGNS = 2 ** 14  # sign vectors drawn (identity included) above EXACT_MAX_SEEDS seeds
N_BOOTSTRAP = 2000  # bootstrap resamples of the seeds
RNG_SEED = 20190603  # fixed: the same table always gives the same intervals and p-values
_TIE = 1e-9  # relative tolerance: |T*| ≥ |T| up to rounding counts as "as extreme"


def min_seeds_to_reject(alpha: float) -> int:
    """The fewest seeds for which the exact two-sided sign-flip test can give p ≤ ``alpha``
    (its smallest p is 2 / 2^n): 6 at alpha 0.05, 8 at 0.01."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha=}")
    return max(1, math.ceil(math.log2(2.0 / alpha)))


@lru_cache(maxsize=64)
def sign_matrix(n: int) -> np.ndarray:
    """±1 sign vectors over ``n`` seeds, shape (k, n), the identity first: all 2^n of them up
    to :data:`EXACT_MAX_SEEDS` seeds, else :data:`N_RANDOM_SIGNS` fixed-seed draws."""
    if n <= EXACT_MAX_SEEDS:
        codes = np.arange(2 ** n, dtype=np.int64)[:, None]
        bits = (codes >> np.arange(n, dtype=np.int64)) & 1
        signs = 1.0 - 2.0 * bits
    else:
        rng = np.random.default_rng(RNG_SEED + n)
        signs = rng.choice([-1.0, 1.0], size=(N_RANDOM_SIGNS, n))
        signs[0] = 1.0
    signs.setflags(write=False)
    return signs


def sign_flip_test(diffs: np.ndarray) -> tuple[float, float]:
    """Two-sided sign-flip test of "the mean of ``diffs`` is 0".

    Args:
        diffs: one value per seed (NaN-free).

    Returns:
        (mean, p): p is the share of sign vectors whose |mean| is at least the observed one
        (exact for up to :data:`EXACT_MAX_SEEDS` values); NaN for no value, and 1 when every
        difference is 0.
    """
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return math.nan, math.nan
    observed = float(d.mean())
    null = np.abs(sign_matrix(d.size) @ d) / d.size
    scale = _TIE * max(1.0, float(np.abs(d).max()))
    return observed, float(np.mean(null >= abs(observed) - scale))


def max_t_vs_best(diffs: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sign-flip max-T comparison of several configurations with the best one.

    Args:
        diffs: (configs, seeds): best − configuration per seed, oriented so that positive
            means the best is better; entries where ``mask`` is False are ignored.
        mask: which entries hold a paired value.

    Returns:
        (t, p_adj): each configuration's paired t statistic and its familywise-adjusted
        one-sided p — the share of joint sign flips of the seeds (the same flip for every
        configuration, which keeps their dependence) whose largest t is at least this one.
        NaN for configurations with fewer than 2 paired seeds.
    """
    d = np.where(mask, diffs, 0.0)
    n = mask.sum(axis=1).astype(float)
    signs = sign_matrix(d.shape[1])
    sums = signs @ d.T  # (k, configs)
    squares = (d * d).sum(axis=1)
    t = _t_from_sums(sums, squares, n)
    testable = n >= 2
    observed = t[0]
    null_max = np.max(np.where(testable, t, -np.inf), axis=1) if testable.any() else None
    p = np.full(d.shape[0], np.nan)
    if null_max is not None:
        tol = _TIE * np.maximum(1.0, np.abs(observed))
        p = np.mean(null_max[:, None] >= (observed - tol)[None, :], axis=0)
        p = np.where(testable, p, np.nan)
    return np.where(testable, observed, np.nan), p


def _t_from_sums(sums: np.ndarray, squares: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Paired t of each column from its signed sums; the sum of squares is flip-invariant."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = sums / n
        var = (squares - n * mean * mean) / (n - 1)
        se = np.sqrt(np.maximum(var, 0.0) / n)
        floor = 1e-12 * np.maximum(1.0, np.sqrt(squares / np.maximum(n, 1)))
        t = mean / np.maximum(se, floor)
    return np.where(n >= 2, t, np.nan)


@lru_cache(maxsize=64)
def _bootstrap_weights(n: int) -> np.ndarray:
    """(n, N_BOOTSTRAP): how often each seed is drawn in each resample, divided by n, so that
    ``values @ weights`` gives every resample's mean in one matrix product."""
    rng = np.random.default_rng(RNG_SEED + 1000 + n)
    index = rng.integers(0, n, size=(N_BOOTSTRAP, n))
    counts = np.zeros((N_BOOTSTRAP, n))
    np.add.at(counts, (np.repeat(np.arange(N_BOOTSTRAP), n), index.reshape(-1)), 1.0)
    weights = np.ascontiguousarray(counts.T / n)
    weights.setflags(write=False)
    return weights


def bootstrap_mean_ci(values: np.ndarray, *, confidence: float = 0.95,
                      low: float = -math.inf, high: float = math.inf
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap intervals of the mean of per-seed ``values`` (one row per quantity,
    one column per seed; NaN-free), clipped to [low, high]; one (low, high) per row.

    The percentile interval of a mean lies within the range of the values, so a bounded
    quantity keeps its bounds; the clip only guards against rounding.
    """
    v = np.atleast_2d(np.asarray(values, dtype=float))
    means = v @ _bootstrap_weights(v.shape[1])
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail], axis=1)
    return np.clip(lo, low, high), np.clip(hi, low, high)


def pocock_spending(fraction: float, alpha: float) -> float:
    """Lan–DeMets Pocock-type alpha spending: the share of ``alpha`` a group-sequential test
    may have spent by information ``fraction`` (seeds so far / seeds at the last look),
    alpha * ln(1 + (e - 1) * fraction). It spends early, so a clear effect can be claimed
    as soon as the exact test can reach it (6 seeds at alpha 0.05 from 10 planned seeds)."""
    t = min(max(float(fraction), 0.0), 1.0)
    return alpha * math.log1p((math.e - 1.0) * t)


def sequential_sign_flip(diffs: np.ndarray, looks: list[int], n_final: int,
                         alpha: float) -> tuple[int | None, list[float], list[float]]:
    """Exact group-sequential two-sided sign-flip test of "the mean of ``diffs`` is 0",
    looked at after ``looks`` seeds (increasing; the last at most ``len(diffs)``), planned to
    end at ``n_final`` seeds, alpha spent by :func:`pocock_spending`.

    Under the null each seed's difference is as likely to have either sign, whatever its
    magnitude; given the magnitudes of the seeds seen so far, the joint distribution of the
    running means at every look is that of the 2^n sign vectors (their prefixes for the
    earlier looks). The boundary at each look is the smallest |mean| that the sign vectors
    which have not crossed before reach with probability at most the alpha that look may
    spend (what the earlier looks could not spend, the discrete test being discrete, carries
    over). So the chance of crossing at any look is at most ``alpha``, exactly for up to
    :data:`EXACT_MAX_SEEDS` seeds.

    Args:
        diffs: one value per seed, in the order the seeds were run (NaN-free).
        looks: the seed counts of the looks so far.
        n_final: the seed count of the last planned look (the information fraction's
            denominator).
        alpha: the level over all looks.

    Returns:
        (the index in ``looks`` of the first look the observed means crossed, or None;
        each look's boundary on |mean| (inf where that look could spend nothing);
        the alpha spent by each look, cumulative).
    """
    d = np.asarray(diffs, dtype=float)
    steps = zip(looks, looks[1:], strict=False)
    if not looks or looks[-1] > d.size or any(b <= a for a, b in steps):
        raise ValueError(f"looks must increase and end within the {d.size} diffs, got {looks}")
    n = looks[-1]
    signs = sign_matrix(n)
    k = signs.shape[0]
    crossed = np.zeros(k, dtype=bool)
    first: int | None = None
    bounds: list[float] = []
    spent: list[float] = []
    scale = _TIE * max(1.0, float(np.abs(d[:n]).max()) if n else 1.0)
    for j, m in enumerate(looks):
        stat = np.abs(signs[:, :m] @ d[:m]) / m
        budget = math.floor((pocock_spending(m / n_final, alpha) + 1e-12) * k)  # vectors
        room = budget - int(crossed.sum())
        alive = stat[~crossed]
        bound = math.inf
        if room > 0 and alive.size:
            values = np.sort(alive)[::-1]
            # the smallest threshold whose tail (ties included) fits in the room left
            counts = np.searchsorted(-values, -(values - scale), side="right")
            fits = np.nonzero(counts <= room)[0]
            if fits.size:
                bound = float(values[fits[-1]])
        hit = ~crossed & (stat >= bound - scale)
        crossed |= hit
        bounds.append(bound)
        spent.append(float(crossed.mean()))
        if first is None and hit[0]:
            first = j
    return first, bounds, spent
