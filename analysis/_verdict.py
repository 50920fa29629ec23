"""The study's verdict: does cyclical annealing (M > 1) keep the latent code in use better than
monotonic (M = 1), tested at the seed level, then the secondary questions and the best set.

The question and its test are fixed in advance (``docs/report.md`` explains each choice):

1. **Uses z**: a completed trial uses z when its final validation KL ≥ ``kl_threshold``.
2. **Primary estimand**, one value per seed: the share of M > 1 trials using z minus the share
   of M = 1 trials using z, within each stratum of the other axes (R, ramp, β_max, lr schedule,
   β_min, free bits) that has both, averaged over the strata. R = 0 (constant β whatever M)
   has no cyclical schedule and is left out. The seed is the unit of replication: it fixes
   initialisation and data order for every configuration.
3. **Primary test**: the exact two-sided sign-flip test of the per-seed differences
   (``analysis._signflip``), outside any multiplicity family. ``verdict`` is the estimate's sign
   when p ≤ alpha, else ``no_difference_shown``.
4. **Secondary family** (Rec lower, KL higher — sign-flip on the per-seed differences; ELBO
   equivalent within ±``elbo_margin`` — TOST, statsmodels ``ttost_paired``; each M > 1 against
   monotonic on the uses-z share — sign-flip), Holm-corrected (statsmodels ``multipletests``)
   and gated behind the primary: each adjusted p is max(p_holm, p_primary), so nothing in the
   family is claimed unless the primary rejects.
5. **Best set**: the configurations the sign-flip max-T comparison with the best (by the
   objective, over seeds) cannot tell from the best at familywise alpha.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from analysis._cells import cell_records
from analysis._signflip import (
    bootstrap_mean_ci,
    max_t_vs_best,
    min_seeds_to_reject,
    sign_flip_test,
)
from analysis._trial_table import CONFIG_KEYS, METRICS, group_codes, normalise_trials
from analysis._verdict_text import summary_text

CYCLICAL_BETTER, MONOTONIC_BETTER, NO_DIFFERENCE = ("cyclical_better", "monotonic_better",
                                                    "no_difference_shown")
VERDICTS: tuple[str, ...] = (CYCLICAL_BETTER, MONOTONIC_BETTER, NO_DIFFERENCE)
STRATUM_KEYS: tuple[str, ...] = ("ratio", "ramp", "beta_max", "lr_schedule", "beta_min",
                                 "free_bits")
HIGHER_IS_BETTER = frozenset({"elbo", "mi", "au", "kl"})  # kl: more use of z
SIGN_FLIP = "exact two-sided sign-flip over seeds"
MIN_SEEDS_FOR_INTERVAL = 6  # per-seed estimates: fewer seeds give the values, no interval
DEFAULT_MARGIN_SHARE = 0.02  # ELBO margin when none is given: 2% of |monotonic ELBO|


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyse_trials` found; ``to_json()`` is the content of summary.json."""

    verdict: str
    uses_z: dict[str, list[int]]
    best_set: list[dict[str, Any]]
    cells: list[dict[str, Any]]
    tests: list[dict[str, Any]]
    primary: dict[str, Any]
    summary: list[str]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return _json_safe({"verdict": self.verdict, "uses_z": self.uses_z,
                           "primary": self.primary, "best_set": self.best_set,
                           "summary": self.summary, "settings": self.settings,
                           "tests": self.tests, "cells": self.cells})


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _test(name: str, family: str, method: str, n: int, statistic: float, p_raw: float,
          **extra: Any) -> dict[str, Any]:
    return {"name": name, "family": family, "method": method, "n": int(n),
            "statistic": float(statistic), "p_raw": float(p_raw), "p_adj": float(p_raw),
            **extra}


# --- per-seed contrasts --------------------------------------------------------------------
@dataclass(frozen=True)
class _Frame:
    """The completed, scheduled (R > 0) trials as integer codes, for fast per-seed means."""

    seed_code: np.ndarray
    stratum: np.ndarray
    n_seeds: int
    n_strata: int
    seeds: np.ndarray
    n_cycles: np.ndarray


def _codes(done: pd.DataFrame) -> _Frame:
    seed_code, seeds = pd.factorize(done["seed"], sort=True)
    stratum = group_codes(done, STRATUM_KEYS)[1]
    return _Frame(seed_code, stratum, len(seeds), int(stratum.max()) + 1 if len(stratum) else 0,
                  np.asarray(seeds), done["n_cycles"].to_numpy())


def _arm_means(frame: _Frame, values: np.ndarray, arm: np.ndarray) -> np.ndarray:
    """(seeds, strata) mean of ``values`` over the rows of ``arm``; NaN where none."""
    size = frame.n_seeds * frame.n_strata
    index = (frame.seed_code * frame.n_strata + frame.stratum)[arm]
    ok = np.isfinite(values[arm])
    total = np.bincount(index[ok], weights=values[arm][ok], minlength=size)
    count = np.bincount(index[ok], minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).reshape(frame.n_seeds, frame.n_strata)


def _per_seed(frame: _Frame, values: np.ndarray, treated: np.ndarray, base: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per seed: treated and base arm means over the strata holding both, and the seeds."""
    t, b = _arm_means(frame, values, treated), _arm_means(frame, values, base)
    both = np.isfinite(t) & np.isfinite(b)
    n = both.sum(axis=1)
    keep = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        t_mean = np.where(both, t, 0.0).sum(axis=1) / n
        b_mean = np.where(both, b, 0.0).sum(axis=1) / n
    return t_mean[keep], b_mean[keep], frame.seeds[keep]


# --- the analysis --------------------------------------------------------------------------
def analyse_trials(trials: pd.DataFrame, *, objective: str = "rec", kl_threshold: float = 0.1,
                   alpha: float = 0.05, elbo_margin: float | None = None,
                   latent_dim: int | None = None,
                   objective_mode: str | None = None) -> Analysis:
    """Seed-level verdict, secondary tests, best set and bounded cells of one study.

    Args:
        trials: one row per trial (columns of ``analysis._trial_table``: n_cycles, ratio,
            ramp, beta_max, seed, rec, kl, elbo; optional status, mi, au, iw_nll, ppl,
            lr_schedule, beta_min, free_bits, lr_n_cycles). Only completed trials enter the
            numbers; the others are counted.
        objective: the metric the best set is chosen by (higher is better for elbo, mi, au
            and kl, lower for the others).
        kl_threshold: a trial uses z when its final validation KL ≥ this (nats).
        alpha: level of the primary test, the secondary family and the best set.
        elbo_margin: equivalence margin for ELBO (nats per example); default 2% of the
            monotonic arm's mean |ELBO|.
        latent_dim: the latent dimension, the upper bound of AU's intervals.
        objective_mode: "max" or "min" for the objective (default: its house direction).

    Raises:
        ReportError: the table is malformed (names the column and row).
        ValueError: an argument is out of range.
    """
    if objective not in METRICS:
        raise ValueError(f"objective must be one of {', '.join(METRICS)}, got {objective!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha=}")
    if not kl_threshold > 0:
        raise ValueError(f"kl_threshold must be > 0 nats, got {kl_threshold=}")
    if elbo_margin is not None and not elbo_margin > 0:
        raise ValueError(f"elbo_margin must be > 0 nats, got {elbo_margin=}")
    if objective_mode not in (None, "max", "min"):
        raise ValueError(f"objective_mode must be 'max' or 'min', got {objective_mode!r}")
    mode = objective_mode or _mode(objective)
    table = normalise_trials(trials)
    done = table[table["status"] == "completed"]
    scheduled = done[done["ratio"] > 0].reset_index(drop=True)
    frame = _codes(scheduled)
    z = (scheduled["kl"].to_numpy() >= kl_threshold).astype(float)
    cyc, mono = frame.n_cycles > 1, frame.n_cycles == 1
    uses_z = {"cyclical": [int(z[cyc].sum()), int(cyc.sum())],
              "monotonic": [int(z[mono].sum()), int(mono.sum())]}
    t_share, b_share, seeds = _per_seed(frame, z, cyc, mono)
    diffs = t_share - b_share
    estimate, p = sign_flip_test(diffs)
    n_seeds, need = len(diffs), min_seeds_to_reject(alpha)
    rejected = bool(n_seeds and p <= alpha and estimate != 0)
    verdict = (NO_DIFFERENCE if not rejected else
               CYCLICAL_BETTER if estimate > 0 else MONOTONIC_BETTER)
    primary = {"p": p, "n_seeds": n_seeds, "min_seeds_to_reject": need, "estimate": estimate,
               "alpha": alpha, "method": SIGN_FLIP, "seeds": [int(s) for s in seeds],
               "per_seed": {"cyclical_share": t_share.tolist(),
                            "monotonic_share": b_share.tolist(), "difference": diffs.tolist()},
               **_interval(diffs, -1.0, 1.0)}
    tests = [_test("uses_z: cyclical − monotonic share", "primary", SIGN_FLIP, n_seeds,
                   estimate, p, rejected=rejected)]
    margin = elbo_margin if elbo_margin is not None else _default_margin(scheduled, mono)
    secondary = _secondary(frame, scheduled, z, margin)
    _adjust(secondary, alpha, gate=p if n_seeds else 1.0)
    best_tests, best_set, in_best = _best_set(done, objective, mode, alpha)
    cells, configs = _cells(table, kl_threshold, latent_dim, in_best)
    tests += secondary + best_tests
    settings = {"objective": objective, "objective_mode": mode,
                "kl_threshold": kl_threshold, "alpha": alpha, "elbo_margin": margin,
                "elbo_margin_default": elbo_margin is None, "latent_dim": latent_dim,
                "n_trials": len(table), "n_completed": len(done),
                "n_configurations": len(configs)}
    families = _family_shares(frame, z, cyc, mono)
    summary = summary_text(verdict=verdict, uses_z=uses_z, primary=primary, tests=tests,
                           best_set=best_set, settings=settings, families=families,
                           table=table)
    return Analysis(verdict, uses_z, best_set, cells, tests, {**primary, "families": families},
                    summary, settings)


def _interval(values: np.ndarray, low: float, high: float) -> dict[str, Any]:
    """Bootstrap interval of a per-seed mean; none below 6 seeds, where resampling so few
    seeds (all-or-none outcomes: often identical) gives a degenerate, overconfident range."""
    if len(values) < MIN_SEEDS_FOR_INTERVAL:
        return {"ci_low": math.nan, "ci_high": math.nan}
    lo, hi = bootstrap_mean_ci(values, low=low, high=high)
    return {"ci_low": float(lo[0]), "ci_high": float(hi[0])}


def _mode(metric: str) -> str:
    return "max" if metric in HIGHER_IS_BETTER else "min"


def _default_margin(scheduled: pd.DataFrame, mono: np.ndarray) -> float:
    elbo = scheduled["elbo"].to_numpy()[mono]
    level = float(np.nanmean(np.abs(elbo))) if np.isfinite(elbo).any() else math.nan
    return DEFAULT_MARGIN_SHARE * level if math.isfinite(level) and level > 0 else 0.1


def _family_shares(frame: _Frame, z: np.ndarray, cyc: np.ndarray, mono: np.ndarray
                   ) -> dict[str, Any]:
    """Per family: the share of its trials using z in each seed, then mean and interval over
    seeds (never pooled over trials that share a seed)."""
    out = {}
    for name, arm in (("cyclical", cyc), ("monotonic", mono)):
        if not arm.any():
            continue
        total = np.bincount(frame.seed_code[arm], weights=z[arm], minlength=frame.n_seeds)
        count = np.bincount(frame.seed_code[arm], minlength=frame.n_seeds)
        shares = total[count > 0] / count[count > 0]
        out[name] = {"mean_share": float(shares.mean()), "n_seeds": len(shares),
                     "seeds_with_z": int((shares > 0).sum()),
                     "per_seed": shares.tolist(), **_interval(shares, 0.0, 1.0)}
    return out


def _secondary(frame: _Frame, scheduled: pd.DataFrame, z: np.ndarray, margin: float
               ) -> list[dict[str, Any]]:
    cyc, mono = frame.n_cycles > 1, frame.n_cycles == 1
    tests = []
    for metric, claim in (("rec", "Rec lower"), ("kl", "KL higher")):
        t, b, _ = _per_seed(frame, scheduled[metric].to_numpy(float), cyc, mono)
        d = t - b
        est, p = sign_flip_test(d)
        if len(d):
            tests.append(_test(f"{metric}: cyclical − monotonic ({claim})", "secondary",
                               SIGN_FLIP, len(d), est, p, claim=claim))
    t, b, _ = _per_seed(frame, scheduled["elbo"].to_numpy(float), cyc, mono)
    if len(t) >= 2 and np.ptp(t - b) > 0:
        p_tost, lower, upper = ttost_paired(t, b, -margin, margin)
        stat = min(abs(float(lower[0])), abs(float(upper[0])))
        tests.append(_test(f"elbo: cyclical ≈ monotonic within ±{margin:.3g} nats", "secondary",
                           "TOST, paired t over seeds (statsmodels ttost_paired)", len(t),
                           stat, float(p_tost), claim="ELBO equivalent", margin=margin,
                           estimate=float(np.mean(t - b))))
    for m in np.unique(frame.n_cycles[cyc]):
        t, b, _ = _per_seed(frame, z, frame.n_cycles == m, mono)
        est, p = sign_flip_test(t - b)
        if len(t):
            tests.append(_test(f"uses_z: M={int(m)} − monotonic share", "secondary", SIGN_FLIP,
                               len(t), est, p, claim=f"M={int(m)} uses z more"))
    return tests


def _adjust(tests: list[dict[str, Any]], alpha: float, *, gate: float) -> None:
    """Holm over the family, then gatekeeping: p_adj = max(p_holm, p of the primary)."""
    raw = np.array([t["p_raw"] for t in tests], dtype=float)
    ok = np.isfinite(raw)
    adjusted = np.full(len(raw), np.nan)
    if ok.any():
        # statsmodels' Holm branch calls gc.collect(), which costs ~0.4 s in a process with a
        # large heap (a race calls this thousands of times); freezing the heap first makes
        # that collection scan only the objects made since.
        gc.freeze()
        try:
            adjusted[ok] = multipletests(raw[ok], alpha=alpha, method="holm")[1]
        finally:
            gc.unfreeze()
    for test, p_adj in zip(tests, adjusted, strict=True):
        test["p_adj"] = max(float(p_adj), float(gate)) if math.isfinite(p_adj) else math.nan
        test["correction"] = "Holm over the secondary family, gated by the primary test"
        test["rejected"] = bool(math.isfinite(test["p_adj"]) and test["p_adj"] <= alpha)


# --- best set ------------------------------------------------------------------------------
def _config_frame(done: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    return group_codes(done, CONFIG_KEYS)


def _matrix(codes: np.ndarray, seed_codes: np.ndarray, values: np.ndarray, n_configs: int,
            n_seeds: int) -> np.ndarray:
    out = np.full((n_configs, n_seeds), np.nan)
    out[codes, seed_codes] = values
    return out


def _best_set(done: pd.DataFrame, objective: str, mode: str, alpha: float
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[tuple, bool]]:
    scored = done[np.isfinite(done[objective].to_numpy(float))]
    if scored.empty:
        return [], [], {}
    configs, codes = _config_frame(scored)
    seed_codes, _ = pd.factorize(scored["seed"], sort=True)
    sign = 1.0 if mode == "max" else -1.0
    y = sign * _matrix(codes, seed_codes, scored[objective].to_numpy(float), len(configs),
                       int(seed_codes.max()) + 1)
    n = np.isfinite(y).sum(axis=1)
    means = np.nanmean(y, axis=1)
    pool = np.flatnonzero(n == n.max()) if n.max() >= 2 else np.arange(len(y))
    best = int(pool[np.argmax(means[pool])])
    diffs = y[best][None, :] - y
    mask = np.isfinite(diffs)
    t, p = max_t_vs_best(np.where(mask, diffs, 0.0), mask)
    method = "sign-flip max-T comparison with the best over seeds (one-sided, familywise)"
    keys = [dict(zip(configs.columns, map(_plain, row), strict=True))
            for row in configs.itertuples(index=False)]
    tests, members, in_best = [], [], {}
    for i, key in enumerate(keys):
        untested = i != best and not math.isfinite(p[i])
        member = i == best or untested or p[i] > alpha
        in_best[tuple(key.values())] = member
        if member:
            members.append({**key, "best": i == best, "untested": untested})
        if i != best:
            tests.append({**_test(f"{objective}: best − {_label(key)}", "best_set", method,
                                  int(mask[i].sum()), t[i], p[i]),
                          "p_adj": float(p[i]), "rejected": bool(p[i] <= alpha)})
    return tests, members, in_best


def _label(key: dict[str, Any]) -> str:
    return f"M={key['n_cycles']} R={key['ratio']:g} {key['ramp']} β_max={key['beta_max']:g}"


def _plain(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _cells(table: pd.DataFrame, kl_threshold: float, latent_dim: int | None,
           in_best: dict[tuple, bool]) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    configs, codes = _config_frame(table)
    seed_codes, seeds = pd.factorize(table["seed"], sort=True)
    done = (table["status"] == "completed").to_numpy()
    shape = (len(configs), len(seeds))
    matrices = {}
    for metric in METRICS:
        values = np.where(done, table[metric].to_numpy(float), np.nan)
        matrices[metric] = _matrix(codes, seed_codes, values, *shape)
    kl = table["kl"].to_numpy(float)
    uses = np.where(done & np.isfinite(kl), (kl >= kl_threshold).astype(float), np.nan)
    status = pd.DataFrame({"n": 1, "n_completed": done,
                           "n_pruned": (table["status"] == "pruned").to_numpy(),
                           "n_error": (table["status"] == "error").to_numpy()})
    counts = status.groupby(codes).sum().reindex(range(len(configs)), fill_value=0)
    records = cell_records(configs, matrices, _matrix(codes, seed_codes, uses, *shape), counts,
                           latent_dim=latent_dim)
    for record in records:
        record["in_best_set"] = in_best.get(tuple(record[k] for k in CONFIG_KEYS), False)
    return records, configs
