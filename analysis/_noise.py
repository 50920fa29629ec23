"""Seed noise: the study objective, which configurations differ from the best, colour ranges.

A difference between two configurations means something only beyond the spread over seeds.
:func:`versus_best` tests every configuration against the best one by the objective (Welch's
t-test on the seed values, from each cell's mean, CI and n), and :func:`colour_limits` keeps a
heatmap's colour range from stretching below the typical seed CI, so that noise is painted as
one colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from analysis._load import ReportError

Mode = Literal["max", "min"]
OBJECTIVE_METRICS: tuple[str, ...] = ("elbo", "rec", "kl", "mi", "au", "iw_nll", "ppl")
# the direction that is "better" when a spec names a metric but no mode (study._spec agrees)
DEFAULT_MODES: dict[str, Mode] = {"elbo": "max", "rec": "min", "kl": "max", "mi": "max",
                                  "au": "max", "iw_nll": "min", "ppl": "min"}
METRIC_NAMES: dict[str, str] = {"elbo": "ELBO", "rec": "Rec", "kl": "KL", "mi": "MI", "au": "AU",
                                "ppl": "PPL", "nll_elbo": "NLL", "iw_nll": "IW-NLL",
                                "iw_ppl": "IW-PPL"}
ALPHA = 0.05  # a configuration "differs from the best" when Welch's p < ALPHA
BEST, TIED, DIFFERS, UNTESTED = "best", "within noise", "differs", "untested"


@dataclass(frozen=True)
class Objective:
    """The study's objective: a validation metric and whether higher or lower is better."""

    metric: str = "elbo"
    mode: Mode = "max"

    @property
    def name(self) -> str:
        return METRIC_NAMES.get(self.metric, self.metric)

    @property
    def label(self) -> str:
        """``validation ELBO (max)``."""
        return f"validation {self.name} ({self.mode})"


def objective_of(meta: dict[str, Any]) -> Objective:
    """The objective in ``study.json`` (``spec.objective``); validation ELBO, max when absent.

    Raises:
        ReportError: the objective names an unknown metric or mode.
    """
    raw = (meta.get("spec") or {}).get("objective") or {}
    if not isinstance(raw, dict):
        raise ReportError(f"study.json: spec.objective must be a mapping, got {raw!r}")
    metric = raw.get("metric") or "elbo"
    if metric not in OBJECTIVE_METRICS:
        raise ReportError(f"study.json: spec.objective.metric must be one of "
                          f"{', '.join(OBJECTIVE_METRICS)}, got {metric!r}")
    mode = raw.get("mode") or DEFAULT_MODES[metric]
    if mode not in ("max", "min"):
        raise ReportError(f"study.json: spec.objective.mode must be max or min, got {mode!r}")
    return Objective(metric, mode)


def seed_sd(ci: pd.Series, n: pd.Series, confidence: float = 0.95) -> pd.Series:
    """The seed standard deviation behind a t-based CI half-width: ci · √n / t(n − 1)."""
    dof = n.astype(float) - 1
    quantile = stats.t.ppf((1 + confidence) / 2, dof.where(dof >= 1))
    return (ci * np.sqrt(n.astype(float)) / quantile).where(n >= 2)


def _welch_p(mean: float, sd: float, n: float, best_mean: float, best_sd: float,
             best_n: float) -> float:
    if not (n >= 2 and best_n >= 2 and math.isfinite(sd) and math.isfinite(best_sd)):
        return math.nan
    if sd == 0 and best_sd == 0:  # no spread at all: equal means are the same, others differ
        return 1.0 if mean == best_mean else 0.0
    return float(stats.ttest_ind_from_stats(mean, sd, n, best_mean, best_sd, best_n,
                                            equal_var=False).pvalue)


def versus_best(table: pd.DataFrame, metric: str, mode: Mode, *,
                alpha: float = ALPHA) -> pd.DataFrame:
    """Every configuration of a ``config_table`` against the best one for ``metric``.

    The best is the configuration with the highest (``mode="max"``) or lowest finite mean over
    its completed seeds. Every other configuration is compared with it by Welch's t-test on the
    seed values (recovered from ``<metric>_mean``, ``_ci`` and ``_n``).

    Returns:
        A frame on ``table``'s index: ``verdict`` (``"best"``; ``"within noise"``: p ≥ alpha;
        ``"differs"``: p < alpha; ``"untested"``: either side has fewer than 2 seeds; ``""``:
        no finite value) and ``p_vs_best`` (NaN where untested).
    """
    mean = table[f"{metric}_mean"].astype(float)
    n = table.get(f"{metric}_n", pd.Series(0, index=table.index)).fillna(0).astype(float)
    ci = table.get(f"{metric}_ci", pd.Series(math.nan, index=table.index)).astype(float)
    sd = seed_sd(ci, n)
    out = pd.DataFrame({"verdict": "", "p_vs_best": math.nan}, index=table.index)
    finite = mean[np.isfinite(mean)]
    if finite.empty:
        return out
    best = finite.idxmax() if mode == "max" else finite.idxmin()
    for i in finite.index:
        if i == best:
            out.loc[i, "verdict"] = BEST
            continue
        p = _welch_p(mean[i], sd[i], n[i], mean[best], sd[best], n[best])
        out.loc[i, "p_vs_best"] = p
        out.loc[i, "verdict"] = UNTESTED if math.isnan(p) else TIED if p >= alpha else DIFFERS
    return out


def typical_ci(cis: np.ndarray) -> float:
    """The median finite CI half-width (NaN when there is none; 0 when seeds agree exactly)."""
    cis = np.asarray(cis, dtype=float)
    cis = cis[np.isfinite(cis)]
    return float(np.median(cis)) if cis.size else math.nan


def colour_limits(values: np.ndarray, cis: np.ndarray, *,
                  bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """The colour range of a heatmap: the data range, widened to the seed noise.

    The range is at least ``2 ×`` the largest CI half-width of any cell (and of the median one)
    and is centred on the data, so no two cells that differ by less than some cell's seed noise
    get the two ends of the scale — an all-collapsed study (KL 0.000 ± 0.003 next to
    0.000 ± 0.000) is painted in nearly one colour. A bounded metric's range is shifted to stay
    inside ``bounds`` (KL never gets a colour below 0). With neither a spread nor a CI the
    range is ±0.5 around the single value.
    """
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    finite_cis = np.asarray(cis, dtype=float)
    finite_cis = finite_cis[np.isfinite(finite_cis)]
    noise = float(finite_cis.max()) if finite_cis.size else math.nan
    width = max(hi - lo, 2 * noise if math.isfinite(noise) else 0.0)
    if width < 1e-12:
        low, high = lo - 0.5, hi + 0.5
    else:
        centre = (lo + hi) / 2
        low, high = centre - width / 2, centre + width / 2
    if bounds is not None:
        shift = max(bounds[0] - low, 0.0) - max(high - bounds[1], 0.0)
        low, high = max(low + shift, bounds[0]), min(high + shift, bounds[1])
    return low, high
