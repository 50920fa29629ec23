"""A minimal stand-in for ``analysis.analyse_trials`` (issue 16), used only while that function
is not importable: the race (``study._race``) imports ``analysis.analyse_trials`` first.

It implements the definitions the two issues share, and nothing of the report:

- a trial *uses z* when its final validation KL >= ``kl_threshold`` (default 0.1 nats);
- **primary**: for each seed, the share of M > 1 trials that use z minus the share of M = 1
  trials that use z, within the same other axes (R, ramp, β_max, …), averaged over the groups
  that have both in that seed; an exact sign-flip test over seeds, two-sided (every one of the
  2^n sign assignments for n <= 16 seeds, else 20,000 fixed-seed draws). The verdict is the sign
  when p <= alpha, else ``no_difference_shown``;
- **best set**: the configuration with the best mean objective over the seeds every
  configuration has, and every configuration a one-sided sign-flip step-down max-T comparison
  with the best (Westfall–Young, studentised mean of the per-seed differences) cannot tell from
  it at ``alpha``. The family is all comparisons with the best.

Deterministic; ~5–20 ms for 240 trials.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# config keys other than seed; absent ones take these defaults (team convention)
CONFIG_DEFAULTS: dict[str, Any] = {"lr_schedule": "constant", "beta_min": 0.0, "free_bits": 0.0,
                                   "lr_n_cycles": None}
BASE_KEYS = ("n_cycles", "ratio", "ramp", "beta_max")
_MINIMISE = {"rec", "kl_loss", "iw_nll", "ppl", "nll_elbo", "loss"}
_EXACT_MAX_SEEDS = 16  # 2^16 sign assignments; beyond, fixed-seed Monte Carlo
_MC_DRAWS = 20_000


@dataclass(frozen=True)
class Analysis:
    verdict: str
    uses_z: dict[str, list[int]]
    best_set: list[dict[str, Any]]
    cells: list[dict[str, Any]] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)
    primary: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def config_keys(trials: pd.DataFrame) -> list[str]:
    """The configuration keys of a table: the base axes plus the optional ones it has."""
    return [*BASE_KEYS, *(k for k in CONFIG_DEFAULTS if k in trials.columns)]


def sign_matrix(n: int) -> np.ndarray:
    """All 2^n sign vectors (n <= 16), else fixed-seed random ones; the identity first."""
    if n <= _EXACT_MAX_SEEDS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        rng = np.random.default_rng(20190602)
        signs = rng.choice((1.0, -1.0), size=(_MC_DRAWS, n))
        signs[0] = 1.0
    return signs.reshape(-1, n)


def sign_flip_p(d: np.ndarray) -> float:
    """Two-sided exact sign-flip p of the mean of ``d`` (1.0 for no values)."""
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        return 1.0
    means = sign_matrix(d.size) @ d / d.size
    return float(np.mean(np.abs(means) >= abs(d.mean()) - 1e-12))


def min_seeds_to_reject(alpha: float) -> int:
    """Fewest seeds whose most extreme sign pattern reaches ``alpha`` (two-sided)."""
    return next(n for n in range(1, 64) if 2.0 ** (1 - n) <= alpha + 1e-15)


def _primary(df: pd.DataFrame, keys: list[str], alpha: float) -> dict[str, Any]:
    other = [k for k in keys if k != "n_cycles"]
    cyc = df["n_cycles"] > 1
    shares = (df.assign(_cyc=cyc).groupby(["seed", *other, "_cyc"], dropna=False)["_z"]
              .mean().unstack("_cyc"))
    if True not in shares.columns or False not in shares.columns:
        diffs = pd.Series(dtype=float)
    else:
        diffs = (shares[True] - shares[False]).dropna().groupby(level="seed").mean()
    d = diffs.to_numpy(dtype=float)
    p = sign_flip_p(d)
    return {"p": p, "n_seeds": int(d.size), "estimate": float(d.mean()) if d.size else math.nan,
            "min_seeds_to_reject": min_seeds_to_reject(alpha),
            "per_seed": {int(s): float(v) for s, v in diffs.items()},
            "method": "exact sign-flip over seeds of per-seed uses-z share differences"}


def _best_set(df: pd.DataFrame, keys: list[str], objective: str,
              alpha: float) -> tuple[list[tuple], list[dict[str, Any]]]:
    """(configs in the best set, test records), as tuples of ``keys``."""
    wide = df.groupby([*keys, "seed"], dropna=False)[objective].mean().unstack("seed")
    wide = wide.dropna(axis=1, how="any")  # the seeds every configuration has
    configs = [tuple(c) if isinstance(c, tuple) else (c,) for c in wide.index]
    if len(configs) <= 1 or wide.shape[1] < 2:
        return configs, []
    y = wide.to_numpy(dtype=float)
    if objective not in _MINIMISE:
        y = -y  # lower is better from here on
    best = int(np.argmin(y.mean(axis=1)))
    others = [i for i in range(len(configs)) if i != best]
    d = y[others] - y[best]  # > 0: worse than the best
    n = d.shape[1]
    g = sign_matrix(n)
    mean_g = g @ d.T / n                              # (flips, others)
    sumsq = (d ** 2).sum(axis=1)
    var_g = np.maximum((sumsq - n * mean_g ** 2) / (n - 1), 0.0)
    t_g = mean_g / np.sqrt(var_g / n + 1e-24)
    t_obs = t_g[0]
    order = np.argsort(-t_obs, kind="stable")
    # step-down: the j-th largest is compared with the max over it and every smaller one
    suffix_max = np.maximum.accumulate(t_g[:, order][:, ::-1], axis=1)[:, ::-1]
    p_adj_sorted = np.maximum.accumulate(
        (suffix_max >= t_obs[order][None, :] - 1e-9).mean(axis=0))
    p_adj = np.empty_like(p_adj_sorted)
    p_adj[order] = p_adj_sorted
    p_raw = (t_g >= t_obs[None, :] - 1e-9).mean(axis=0)
    keep = [configs[best]]
    tests = []
    for j, i in enumerate(others):
        if p_adj[j] > alpha:
            keep.append(configs[i])
        name = f"best set: {_label(keys, configs[i])} vs {_label(keys, configs[best])}"
        tests.append({"name": name,
                      "family": "best_set", "config": dict(zip(keys, configs[i], strict=True)),
                      "method": "sign-flip step-down max-T vs the best (one-sided)", "n": n,
                      "statistic": float(t_obs[j]), "p_raw": float(p_raw[j]),
                      "p_adj": float(p_adj[j])})
    return keep, tests


def _with_defaults(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Absent values of the optional keys as their defaults (lr_n_cycles: n_cycles)."""
    for k in keys:
        if k == "lr_n_cycles":
            df[k] = df[k].fillna(df["n_cycles"])
        elif k in CONFIG_DEFAULTS:
            df[k] = df[k].fillna(CONFIG_DEFAULTS[k] if CONFIG_DEFAULTS[k] is not None else "-")
    return df


def _label(keys: list[str], config: tuple) -> str:
    return " ".join(f"{k}={v}" for k, v in zip(keys, config, strict=True))


def analyse_trials(trials: pd.DataFrame, *, objective: str = "rec", kl_threshold: float = 0.1,
                   alpha: float = 0.05, elbo_margin: float | None = None,
                   latent_dim: int | None = None) -> Analysis:
    """Verdict, uses-z counts and best set of a per-trial table (see the module docstring).

    Rows whose ``status`` (default completed) is not ``completed`` or whose objective or KL is
    NaN are left out. ``elbo_margin`` and ``latent_dim`` are accepted for the interface; this
    stand-in runs no equivalence test and computes no intervals.
    """
    df = trials.copy()
    if "status" in df.columns:
        df = df[df["status"].fillna("completed") == "completed"]
    df = df.dropna(subset=["kl", objective])
    keys = config_keys(df)
    df = _with_defaults(df, keys)
    df["_z"] = (df["kl"] >= kl_threshold).astype(float)
    cyc = df["n_cycles"] > 1
    uses_z = {"cyclical": [int(df.loc[cyc, "_z"].sum()), int(cyc.sum())],
              "monotonic": [int(df.loc[~cyc, "_z"].sum()), int((~cyc).sum())]}
    primary = _primary(df, keys, alpha) if len(df) else {
        "p": 1.0, "n_seeds": 0, "estimate": math.nan,
        "min_seeds_to_reject": min_seeds_to_reject(alpha)}
    if primary["p"] <= alpha and primary["estimate"] != 0:
        verdict = "cyclical_better" if primary["estimate"] > 0 else "monotonic_better"
    else:
        verdict = "no_difference_shown"
    best, tests = _best_set(df, keys, objective, alpha) if len(df) else ([], [])
    tests.insert(0, {"name": "primary: uses-z share, M > 1 minus M = 1", "family": "primary",
                     "method": primary.get("method", "sign-flip"), "n": primary["n_seeds"],
                     "statistic": primary["estimate"], "p_raw": primary["p"],
                     "p_adj": primary["p"]})
    c, m = uses_z["cyclical"], uses_z["monotonic"]
    summary = [f"cyclical used z in {c[0]} of {c[1]} trials, monotonic in {m[0]} of {m[1]} "
               f"(sign-flip over {primary['n_seeds']} seeds: p = {primary['p']:.3g})"]
    return Analysis(verdict=verdict, uses_z=uses_z,
                    best_set=[dict(zip(keys, b, strict=True)) for b in best], tests=tests,
                    primary=primary, summary=summary)
