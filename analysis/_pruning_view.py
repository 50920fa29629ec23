"""What pruning did, in numbers: steps run vs planned, and per M and R how many trials were
pruned and when. Pure functions of the ``trials`` table (``workers._records.TRIAL_COLUMNS``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from analysis._heatmap import ramp_order

_TERMINAL = ("completed", "pruned", "error")
MAX_LISTED_STEPS = 3  # pruned trials of a cell listed by step; above, the median share of T


def steps_run(trials: pd.DataFrame) -> pd.Series:
    """Optimizer steps each trial ran: T for completed trials, else its last step (0 if none)."""
    total = trials["total_steps"].astype(float)
    last = pd.to_numeric(trials["last_step"], errors="coerce").fillna(0).clip(lower=0)
    return total.where(trials["status"] == "completed", np.minimum(last, total))


def steps_line(trials: pd.DataFrame, *, partial: bool = False) -> str:
    """``Steps run: 9,600 of 21,600 planned (44%): 56% not run (pruned 50%, failed 6%).``"""
    planned = float(trials["total_steps"].sum())
    if planned <= 0:
        return "No steps planned."
    run = steps_run(trials)
    left = trials["total_steps"] - run
    shares = {s: float(left[trials["status"] == s].sum()) / planned for s in ("pruned", "error")}
    text = (f"Steps run: {run.sum():,.0f} of {planned:,.0f} planned ({run.sum() / planned:.0%}): "
            f"pruning saved {shares['pruned']:.0%} of the planned steps")
    if shares["error"] > 0:
        text += f", failed trials left {shares['error']:.0%} unrun"
    if partial:
        text += " (unfinished trials count up to their last step so far)"
    return text + "."


def _pruned_at(rows: pd.DataFrame) -> pd.Series:
    at = pd.to_numeric(rows["pruned_at_step"], errors="coerce")
    return at.fillna(pd.to_numeric(rows["last_step"], errors="coerce"))


def _cell(rows: pd.DataFrame) -> str:
    """``2 of 3 pruned, at 400 (0.33 T), 700 (0.58 T)`` or with many, the median share of T."""
    done = rows[rows["status"].isin(_TERMINAL)]
    pruned = done[done["status"] == "pruned"]
    text = f"{len(pruned)} of {len(done)} pruned"
    if len(done) < len(rows):
        text += f" ({len(rows) - len(done)} unfinished)"
    if pruned.empty:
        return text
    at = _pruned_at(pruned)
    share = at / pruned["total_steps"].astype(float)
    if len(pruned) <= MAX_LISTED_STEPS:
        steps = ", ".join(f"{a:.0f} ({s:.2g} T)" for a, s in sorted(zip(at, share, strict=True)))
        return f"{text}, at {steps}"
    return f"{text}, median at {share.median():.2g} T ({at.min():.0f}–{at.max():.0f})"


def pruned_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows M (with ramp, lr schedule and β_max when the study varies them), columns R:
    pruned counts."""
    keys = [k for k in ("ramp", "lr_schedule", "beta_max")
            if k in trials.columns and trials[k].nunique() > 1]
    cells = {}
    for group, rows in trials.groupby([*keys, "n_cycles", "ratio"], sort=True):
        cells[group] = _cell(rows)
    index = pd.MultiIndex.from_tuples(list(cells), names=[*keys, "n_cycles", "ratio"])
    wide = pd.Series(list(cells.values()), index=index).unstack("ratio").fillna("—")
    wide.columns = [f"R={r:g}" for r in wide.columns]
    view = wide.reset_index().rename(columns={"n_cycles": "M", "beta_max": "β_max",
                                              "lr_schedule": "lr"})
    if "ramp" in view.columns:
        rank = {r: i for i, r in enumerate(ramp_order(list(view["ramp"].unique())))}
        view = view.sort_values(by="ramp", key=lambda s: s.map(rank), kind="stable")
    return view.reset_index(drop=True)


def family_line(trials: pd.DataFrame) -> str | None:
    """Pruned shares of M = 1 vs M > 1 among finished trials, with Fisher's exact p."""
    done = trials[trials["status"].isin(_TERMINAL)]
    mono, cyc = done[done["n_cycles"] == 1], done[done["n_cycles"] > 1]
    if mono.empty or cyc.empty or not (done["status"] == "pruned").any():
        return None
    k_mono, k_cyc = int((mono["status"] == "pruned").sum()), int((cyc["status"] == "pruned").sum())
    p = stats.fisher_exact([[k_mono, len(mono) - k_mono], [k_cyc, len(cyc) - k_cyc]]).pvalue
    return (f"Pruned by family: M = 1 {k_mono} of {len(mono)} ({k_mono / len(mono):.0%}), "
            f"M > 1 {k_cyc} of {len(cyc)} ({k_cyc / len(cyc):.0%}); Fisher exact p = {p:.2g} "
            "(a small p means one family was pruned more often: worse, or judged unfairly — "
            "compare with the heatmaps).")


def settings_line(meta: dict[str, Any]) -> str | None:
    """The pruner settings of ``study.json`` in words (None when the spec has none)."""
    pruning = (meta.get("spec") or {}).get("pruning")
    if not isinstance(pruning, dict) or not pruning.get("pruner"):
        return None
    pruner = str(pruning["pruner"])
    if pruner == "none":
        return "Pruning off (pruner: none)."
    parts = [f"Pruner: {pruner}"]
    if pruning.get("phase_aware"):
        parts.append("phase-aware (judged on evaluations at β = β_max)")
    share = pruning.get("min_share")
    if isinstance(share, (int, float)) and math.isfinite(share):
        parts.append(f"nothing pruned before {share:.0%} of T")
    if pruner in ("median", "percentile") and pruning.get("n_startup_trials") is not None:
        parts.append(f"{pruning['n_startup_trials']} startup trials")
    return ", ".join(parts) + "."
