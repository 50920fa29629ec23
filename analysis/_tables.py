"""The report's tables as DataFrames of display strings: configurations and paired tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis._noise import BEST, DIFFERS, METRIC_NAMES, TIED, UNTESTED, Objective, versus_best
from analysis._stats import CONFIG_KEYS

VERSUS_BEST = {BEST: "★ best", TIED: "within noise", DIFFERS: "differs",
               UNTESTED: "untested (1 seed)", "": "—"}


def _mean_ci(row: pd.Series, metric: str) -> str:
    mean, ci = row.get(f"{metric}_mean"), row.get(f"{metric}_ci")
    n = int(row.get(f"{metric}_n", 0) or 0)
    if mean is None or not np.isfinite(mean) or n == 0:
        return "—"
    lo, hi = row.get(f"{metric}_lo", math.nan), row.get(f"{metric}_hi", math.nan)
    if n >= 3 and np.isfinite(lo) and np.isfinite(hi):  # bootstrap over seeds, inside bounds
        return f"{mean:.4g} [{lo:.4g}, {hi:.4g}]"
    if f"{metric}_lo" in row.index:
        return f"{mean:.4g} (n={n})"
    return f"{mean:.4g} ± {ci:.2g}" if n > 1 and np.isfinite(ci) else f"{mean:.4g} (n=1)"


def _versus_best_text(verdict: str, p: float) -> str:
    text = VERSUS_BEST.get(verdict, verdict)
    return f"{text} (p={p:.2g})" if verdict in (TIED, DIFFERS) and math.isfinite(p) else text


def config_view(table: pd.DataFrame, objective: Objective,
                metrics: Sequence[str] = ("elbo", "rec", "kl", "mi", "au")) -> pd.DataFrame:
    """One row per configuration: trial counts, mean ± CI per metric and, for the objective,
    whether it is the best, within seed noise of it or differs (Welch's t-test p)."""
    view = pd.DataFrame({"M": table["n_cycles"], "R": table["ratio"], "ramp": table["ramp"],
                         "β_max": table["beta_max"], "trials": table.get("n_seeds"),
                         "completed": table.get("n_completed"), "pruned": table.get("n_pruned"),
                         "errors": table.get("n_error")})
    if "lr_schedule" in table.columns and table["lr_schedule"].nunique() > 1:
        view.insert(4, "lr", table["lr_schedule"])
    for metric in metrics:
        if f"{metric}_mean" in table.columns:
            view[METRIC_NAMES.get(metric, metric)] = table.apply(_mean_ci, axis=1, metric=metric)
    if f"{objective.metric}_mean" in table.columns:
        versus = versus_best(table, objective.metric, objective.mode)
        view[f"vs best {objective.name} ({objective.mode})"] = [
            _versus_best_text(v, p) for v, p in zip(versus["verdict"], versus["p_vs_best"],
                                                    strict=True)]
    return view.sort_values([c for c in ("ramp", "lr", "β_max", "M", "R") if c in view.columns])


def _paired_cell(row: pd.Series) -> str:
    mean, ci, p = row["mean_diff"], row["ci"], row["p_value"]
    if not np.isfinite(mean):
        return "—"
    text = f"{mean:+.3g}" + (f" ± {ci:.2g}" if np.isfinite(ci) else "")
    return text + (f" (p={p:.2g})" if np.isfinite(p) else "")


def paired_view(paired: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per cyclical configuration; per metric "diff ± CI (p)"."""
    keys = [k for k in CONFIG_KEYS if k in paired.columns]
    if paired.empty:
        return paired
    cells = paired.assign(cell=paired.apply(_paired_cell, axis=1))
    wide = cells.pivot_table(index=keys, columns="metric", values="cell", aggfunc="first")
    pairs = paired.groupby(keys)["n_pairs"].max()
    notes = paired.groupby(keys)["note"].agg(lambda s: "; ".join(sorted({n for n in s if n})))
    view = pd.DataFrame({"pairs": pairs, **{f"{METRIC_NAMES.get(m, m)} cyc − mono": wide[m]
                                            for m in metrics if m in wide.columns},
                         "note": notes}).reset_index()
    view = view.rename(columns={"n_cycles": "M", "ratio": "R", "beta_max": "β_max",
                                "lr_schedule": "lr"})
    if "lr" in view.columns and view["lr"].nunique() <= 1:
        view = view.drop(columns="lr")
    return view
