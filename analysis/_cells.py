"""Per-configuration cells: each metric's mean and a bounded interval over seeds, and the share
of seeds whose trial uses z with its exact interval.

A configuration is the tuple of config keys other than the seed; it has at most one trial per
seed, so its seeds are independent replicates. Intervals (95%):

- metrics: percentile bootstrap of the mean over seeds (fixed seed, ``analysis._signflip``),
  which stays within the range of the values and so within the metric's bounds (KL, MI,
  AU ≥ 0; AU ≤ the latent dimension where known); under 3 values, the values themselves and
  no interval;
- the uses-z share: Clopper–Pearson exact interval (statsmodels ``proportion_confint``,
  method "beta"), always inside [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from statsmodels.stats.proportion import proportion_confint

from analysis._signflip import N_BOOTSTRAP, bootstrap_mean_ci

MIN_VALUES_FOR_CI = 3
BOOTSTRAP_METHOD = f"percentile bootstrap over seeds ({N_BOOTSTRAP} resamples, fixed seed)"
SHARE_METHOD = "Clopper–Pearson exact over seeds"
# Bounds of each metric (lower, upper); au's upper bound is the latent dimension when known.
BOUNDS: dict[str, tuple[float, float]] = {
    "rec": (0.0, math.inf), "kl": (0.0, math.inf), "elbo": (-math.inf, 0.0),
    "mi": (0.0, math.inf), "au": (0.0, math.inf), "iw_nll": (0.0, math.inf),
    "ppl": (1.0, math.inf)}


def bounds_of(metric: str, latent_dim: int | None) -> tuple[float, float]:
    low, high = BOUNDS.get(metric, (-math.inf, math.inf))
    if metric == "au" and latent_dim is not None:
        high = float(latent_dim)
    return low, high


def metric_intervals(matrix: np.ndarray, *, low: float, high: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, interval and n of each row of ``matrix`` (configs × seeds, NaN = no value).

    Rows are grouped by their number of values so each group is one vectorised bootstrap.
    Intervals are NaN below :data:`MIN_VALUES_FOR_CI` values.
    """
    values = np.clip(matrix, low, high)  # an estimator's rounding below a bound is no signal
    finite = np.isfinite(values)
    n = finite.sum(axis=1)
    with np.errstate(invalid="ignore"):
        mean = np.where(n > 0, np.nansum(np.where(finite, values, 0.0), axis=1) / np.maximum(n, 1),
                        np.nan)
    ci_low, ci_high = np.full(len(n), np.nan), np.full(len(n), np.nan)
    for count in np.unique(n[n >= MIN_VALUES_FOR_CI]):
        rows = np.flatnonzero(n == count)
        packed = values[rows][finite[rows]].reshape(len(rows), count)
        flat = packed.min(axis=1) == packed.max(axis=1)  # constant: the interval is the value
        ci_low[rows[flat]] = ci_high[rows[flat]] = packed[flat, 0]
        if (~flat).any():
            lo, hi = bootstrap_mean_ci(packed[~flat], low=low, high=high)
            ci_low[rows[~flat]], ci_high[rows[~flat]] = lo, hi
    return mean, ci_low, ci_high, n


def share_intervals(k: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clopper–Pearson 95% intervals of k of n; NaN where n = 0."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    safe = np.maximum(n, 1)
    lo, hi = proportion_confint(k, safe, alpha=0.05, method="beta")
    lo = np.where(n > 0, np.clip(lo, 0.0, 1.0), np.nan)
    hi = np.where(n > 0, np.clip(hi, 0.0, 1.0), np.nan)
    return lo, hi


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def cell_records(configs: pd.DataFrame, matrices: dict[str, np.ndarray], uses_z: np.ndarray,
                 counts: pd.DataFrame, *, latent_dim: int | None) -> list[dict]:
    """One dict per configuration: its keys, trial counts, ``metrics`` and ``uses_z``.

    Args:
        configs: the configurations (one row each, config keys as columns).
        matrices: metric → (configs × seeds) final values of completed trials (NaN = none).
        uses_z: (configs × seeds) 1.0 / 0.0 / NaN (no completed trial).
        counts: per configuration ``n``, ``n_completed``, ``n_pruned``, ``n_error``.
    """
    records = [{**{k: _plain(v) for k, v in row.items()}, "metrics": {}}
               for row in configs.to_dict("records")]
    for metric, matrix in matrices.items():
        if not np.isfinite(matrix).any():
            continue
        low, high = bounds_of(metric, latent_dim)
        mean, lo, hi, n = metric_intervals(matrix, low=low, high=high)
        for i, record in enumerate(records):
            if n[i] == 0:
                continue
            entry = {"mean": _num(mean[i]), "ci_low": _num(lo[i]), "ci_high": _num(hi[i]),
                     "n": int(n[i]),
                     "method": BOOTSTRAP_METHOD if n[i] >= MIN_VALUES_FOR_CI else "values"}
            if n[i] < MIN_VALUES_FOR_CI:
                row = np.clip(matrix[i], low, high)
                entry["values"] = [float(v) for v in row[np.isfinite(row)]]
            record["metrics"][metric] = entry
    k = np.nansum(uses_z, axis=1)
    n = np.isfinite(uses_z).sum(axis=1)
    lo, hi = share_intervals(k, n)
    count_values = {key: counts[key].to_numpy() for key in counts.columns}
    for i, record in enumerate(records):
        record.update({key: int(values[i]) for key, values in count_values.items()})
        record["uses_z"] = {"k": int(k[i]), "n": int(n[i]),
                            "share": _num(k[i] / n[i]) if n[i] else None,
                            "ci_low": _num(lo[i]), "ci_high": _num(hi[i]),
                            "method": SHARE_METHOD}
    return records


def _plain(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value
