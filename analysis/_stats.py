"""Statistics over seeds: confidence intervals, per-config tables, cyclical-vs-monotonic tests.

Every function takes the one-row-per-trial table of :func:`analysis.final_rows` (or
:func:`analysis.best_rows`): config columns, ``seed``, ``status`` and metric columns. Only
completed trials enter the numbers; pruned and failed ones are counted, never averaged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

CONFIG_KEYS: tuple[str, ...] = ("n_cycles", "ratio", "ramp", "beta_max", "lr_schedule")
DEFAULT_LR_SCHEDULE = "constant"  # what a frame without an lr_schedule column ran
_PAIR_STATS: tuple[str, ...] = ("metric", "n_pairs", "mean_diff", "ci", "ci_low", "ci_high",
                                "p_value", "p_wilcoxon", "note")
PAIRED_COLUMNS: tuple[str, ...] = (*CONFIG_KEYS, *_PAIR_STATS)
POOLED_COLUMNS: tuple[str, ...] = ("n_cycles", "ratio", *_PAIR_STATS)
MIN_WILCOXON_PAIRS = 6
TOO_FEW_SEEDS = "too few seeds"


def mean_ci(values: Iterable[float], *, confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean, confidence half-width (Student's t, n − 1 dof) and n of the finite ``values``.

    The half-width is NaN for n < 2 (no spread can be estimated); all three are (NaN, NaN, 0)
    for no finite value.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(list(values), dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, 1
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, half, n


def lr_schedules(frame: pd.DataFrame) -> pd.Series:
    """The ``lr_schedule`` of each row as str, ``"constant"`` where absent or missing."""
    if "lr_schedule" not in frame.columns:
        return pd.Series(DEFAULT_LR_SCHEDULE, index=frame.index, dtype=object)
    s = frame["lr_schedule"].astype(object)
    return s.where(s.notna(), DEFAULT_LR_SCHEDULE).astype(str)


def with_lr_schedule(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with an ``lr_schedule`` column (``"constant"`` where absent or missing)."""
    return frame.assign(lr_schedule=lr_schedules(frame))


def _completed(finals: pd.DataFrame) -> pd.DataFrame:
    return finals[finals["status"] == "completed"]


def _half_widths(std: pd.Series, n: pd.Series, confidence: float = 0.95) -> pd.Series:
    """mean_ci's half-width, vectorised: t quantile · sd / √n, NaN below 2 values."""
    dof = n.astype(float) - 1
    quantile = stats.t.ppf((1 + confidence) / 2, dof.where(dof >= 1))
    return (pd.Series(quantile, index=std.index) * std / np.sqrt(n.astype(float))).where(n >= 2)


def config_table(finals: pd.DataFrame,
                 metrics: Sequence[str] = ("elbo", "rec", "kl", "mi", "au")) -> pd.DataFrame:
    """Per config (n_cycles, ratio, ramp, beta_max, lr_schedule): mean, 95% CI half-width and
    n per metric.

    Returns:
        One row per config, sorted by the config keys, with ``{metric}_mean``, ``{metric}_ci``
        (NaN below 2 seeds) and ``{metric}_n`` over completed trials, and the trial counts
        ``n_seeds`` (all trials of the config), ``n_completed``, ``n_pruned``, ``n_error``.
    """
    keys = list(CONFIG_KEYS)
    finals = with_lr_schedule(finals)
    flags = {f"n_{s}": finals["status"] == s for s in ("completed", "pruned", "error")}
    status = finals[keys].assign(**flags)
    table = status.groupby(keys, sort=True).agg(
        n_seeds=("n_completed", "size"), n_completed=("n_completed", "sum"),
        n_pruned=("n_pruned", "sum"), n_error=("n_error", "sum"))
    done = _completed(finals)[[*keys, "seed", *metrics]]
    finite = done[list(metrics)].where(np.isfinite(done[list(metrics)].astype(float)))
    grouped = finite.groupby([done[k] for k in keys], sort=True)
    mean, std, n = grouped.mean(), grouped.std(ddof=1), grouped.count()
    for metric in metrics:
        table[f"{metric}_mean"] = mean[metric]
        table[f"{metric}_ci"] = _half_widths(std[metric], n[metric]).reindex(mean.index)
        table[f"{metric}_n"] = n[metric].reindex(table.index).fillna(0).astype(int)
        lo, hi = _bounded_intervals(done, finite[metric], keys, metric)
        table[f"{metric}_lo"], table[f"{metric}_hi"] = (lo.reindex(table.index),
                                                        hi.reindex(table.index))
    columns = [*(f"{m}_{s}" for m in metrics for s in ("mean", "ci", "n", "lo", "hi")),
               "n_seeds", "n_completed", "n_pruned", "n_error"]
    return table.reset_index()[[*keys, *columns]].astype({c: int for c in columns[-4:]})


def _bounded_intervals(done: pd.DataFrame, values: pd.Series, keys: list[str],
                       metric: str) -> tuple[pd.Series, pd.Series]:
    """Per configuration: the percentile bootstrap 95% interval over seeds, inside the metric's
    bounds (``analysis._cells``); NaN below 3 seeds. This is what the figures and tables show;
    ``_ci`` (the t half-width) stays for the Welch comparisons."""
    from analysis._cells import bounds_of, metric_intervals

    frame = done[keys].assign(_seed=done["seed"], _v=values)
    wide = frame.groupby([*keys, "_seed"], sort=True)["_v"].mean().unstack("_seed")
    if wide.empty:
        empty = pd.Series(dtype=float)
        return empty, empty
    low, high = bounds_of(metric, None)
    _, lo, hi, _ = metric_intervals(wide.to_numpy(float), low=low, high=high)
    return pd.Series(lo, index=wide.index), pd.Series(hi, index=wide.index)


def _paired_row(diffs: np.ndarray) -> dict[str, object]:
    n = len(diffs)
    if n < 2:
        mean = float(diffs.mean()) if n else math.nan
        return {"n_pairs": n, "mean_diff": mean, "ci": math.nan, "ci_low": math.nan,
                "ci_high": math.nan, "p_value": math.nan, "p_wilcoxon": math.nan,
                "note": TOO_FEW_SEEDS}
    mean, half, _ = mean_ci(diffs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant differences: p is NaN
        p = float(stats.ttest_rel(diffs, np.zeros(n)).pvalue)
        p_w = math.nan
        if n >= MIN_WILCOXON_PAIRS and np.any(diffs != 0):
            p_w = float(stats.wilcoxon(diffs).pvalue)
    note = "" if math.isfinite(p) else "differences are constant"
    return {"n_pairs": n, "mean_diff": mean, "ci": half, "ci_low": mean - half,
            "ci_high": mean + half, "p_value": p, "p_wilcoxon": p_w, "note": note}


def paired_vs_monotonic(finals: pd.DataFrame,
                        metrics: Sequence[str] = ("rec", "kl", "elbo")) -> pd.DataFrame:
    """Each cyclical config against the monotonic one (n_cycles = 1) at the same R, ramp, β_max
    and lr schedule.

    Trials are paired by seed over the seeds completed in both configs. Per metric: the mean
    difference cyclical − monotonic, its 95% CI (t over the paired differences), the paired
    t-test p-value and, from 6 pairs on, the Wilcoxon signed-rank p-value. Below 2 pairs the
    statistics are NaN and ``note`` says "too few seeds". R = 0 is left out: β is constant
    there whatever M, so there is no cyclical schedule to compare.

    Returns:
        One row per (cyclical config, metric) with :data:`PAIRED_COLUMNS`; empty when the study
        has no monotonic or no cyclical config.
    """
    finals = with_lr_schedule(finals[finals["ratio"] > 0])
    return _paired_against(finals, "n_cycles", lambda col: col == 1, metrics)


def paired_vs_constant_lr(finals: pd.DataFrame,
                          metrics: Sequence[str] = ("rec", "kl", "elbo")) -> pd.DataFrame:
    """Each config with a non-constant learning-rate schedule against the same β schedule
    (M, R, ramp, β_max) with a constant one, paired by seed (the paper's Table 4 ablation).

    Returns:
        Like :func:`paired_vs_monotonic`: one row per (config, metric), differences
        ``lr_schedule`` − constant; empty without both kinds of learning-rate schedule.
    """
    finals = with_lr_schedule(finals)
    return _paired_against(finals, "lr_schedule", lambda col: col == DEFAULT_LR_SCHEDULE,
                           metrics)


def paired_vs_monotonic_pooled(finals: pd.DataFrame,
                               metrics: Sequence[str] = ("rec", "kl", "elbo")) -> pd.DataFrame:
    """Each (M > 1, R) against monotonic (M = 1) at the same R, pooled over the other axes.

    A pair is one seed of one (ramp, β_max, lr schedule) at M and R, against the same seed,
    ramp, β_max and lr schedule at M = 1 and R: the question "does larger M help at this R?"
    with every ramp's seeds behind it, where :func:`paired_vs_monotonic` answers it per ramp.

    Returns:
        One row per (n_cycles, ratio, metric) with ``n_pairs`` and the paired statistics of
        :data:`POOLED_COLUMNS` (no ramp, β_max or lr columns); empty like
        :func:`paired_vs_monotonic`.
    """
    finals = with_lr_schedule(finals[finals["ratio"] > 0])
    return _paired_against(finals, "n_cycles", lambda col: col == 1, metrics,
                           group_keys=("n_cycles", "ratio"))


def _paired_against(finals: pd.DataFrame, key: str, is_base, metrics: Sequence[str], *,
                    group_keys: Sequence[str] = CONFIG_KEYS) -> pd.DataFrame:
    """Configs whose ``key`` is not a base value against the base config that shares every
    other config key, paired by seed; differences treated − base, one row per ``group_keys``
    value (the full config by default; fewer keys pool the pairs of the configs they join)."""
    keys, shared = list(CONFIG_KEYS), [k for k in CONFIG_KEYS if k != key]
    groups = list(group_keys)
    configs = finals[keys].drop_duplicates()
    base = configs[is_base(configs[key])].drop(columns=key)
    treated = (configs[~is_base(configs[key])].merge(base, on=shared)[groups]
               .drop_duplicates().sort_values(groups))
    done = _completed(finals)[[*keys, "seed", *metrics]]
    in_base = is_base(done[key])
    pairs = done[~in_base].merge(done[in_base].drop(columns=key), on=[*shared, "seed"],
                                 suffixes=("", "_base"))
    by_group = dict(list(pairs.groupby(groups, sort=False)))
    rows = []
    for config in treated.itertuples(index=False):
        group = by_group.get(tuple(config), pairs.iloc[:0])
        for metric in metrics:
            diffs = (group[metric] - group[f"{metric}_base"]).dropna().to_numpy(float)
            rows.append({**config._asdict(), "metric": metric, **_paired_row(diffs)})
    return pd.DataFrame(rows, columns=[*groups, *_PAIR_STATS])
