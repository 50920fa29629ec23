"""Heatmaps over M × R that do not paint noise.

The colour range never stretches below the typical seed CI (``analysis._noise.colour_limits``),
the best cell is starred and every cell whose mean is not distinguishable from the best one
(Welch's t-test over seeds, p ≥ 0.05) is outlined. Built without pyplot, like every figure.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless: the report is written on servers and in CI

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from analysis._noise import (  # noqa: E402
    ALPHA,
    BEST,
    DIFFERS,
    METRIC_NAMES,
    TIED,
    Mode,
    colour_limits,
    versus_best,
)
from analysis._stats import lr_schedules  # noqa: E402
from workers._schedules import RAMPS  # noqa: E402

GRID_COLUMNS: tuple[str, ...] = ("n_cycles", "ratio", "ramp", "beta_max")
NOISE_NOTE = (f"★ best mean; outlined: not distinguishable from it (Welch t-test over seeds, "
              f"p ≥ {ALPHA:g}); colour range ≥ the median 95% CI")
NO_NOISE_NOTE = ("★ best mean; one seed per cell: no seed-noise estimate, so colour differences "
                 "may be noise")


@dataclass(frozen=True)
class MetricStyle:
    label: str
    higher_is_better: bool
    direction: str  # what the bright end of the colour scale means, for colourbar and caption


# The bright (yellow) end of every scale is the "better" end, in every panel of a metric.
# KL is not better or worse by itself; bright = higher KL = more use of the latent code.
METRIC_STYLES: dict[str, MetricStyle] = {
    "elbo": MetricStyle("ELBO", True, "bright = higher ELBO (better)"),
    "rec": MetricStyle("Rec = −log p(x|z)", False, "bright = lower Rec (better)"),
    "kl": MetricStyle("KL(q(z|x) ‖ p(z))", True, "bright = higher KL (more latent use)"),
    "mi": MetricStyle("MI I_q(z; x)", True, "bright = higher MI (better)"),
    "au": MetricStyle("active units", True, "bright = more active units (better)"),
    "iw_nll": MetricStyle("IW-NLL", False, "bright = lower IW-NLL (better)"),
    "ppl": MetricStyle("PPL", False, "bright = lower PPL (better)"),
    "uses_z": MetricStyle("share of seeds using z", True, "bright = more seeds use z"),
}
_PRUNED_FACE, _PRUNED_EDGE = "#d9d9d9", "#8c8c8c"


def style_of(metric: str, mode: Mode | None = None) -> MetricStyle:
    """The metric's style; ``mode`` (the study objective's) overrides which end is bright."""
    style = METRIC_STYLES.get(metric, MetricStyle(metric, True, f"bright = higher {metric}"))
    if mode is None or (mode == "max") == style.higher_is_better:
        return style
    word = "higher" if mode == "max" else "lower"
    short = METRIC_NAMES.get(metric, metric)
    return MetricStyle(style.label, mode == "max", f"bright = {word} {short} (the objective)")


def ramp_order(ramps: Sequence[str]) -> list[str]:
    known = [r for r in RAMPS if r in set(ramps)]
    return known + sorted(set(ramps) - set(known))


def panel_grid(table: pd.DataFrame) -> tuple[list[tuple[str, str]], list[float]]:
    """The panels of a figure: rows (ramp, lr schedule) and columns β_max present in ``table``."""
    lr = lr_schedules(table)
    rows = []
    for ramp in ramp_order(list(table["ramp"].unique())):
        rows += [(ramp, s) for s in sorted(lr[table["ramp"] == ramp].unique())]
    return rows, sorted(table["beta_max"].unique())


def panel_rows(table: pd.DataFrame, row: tuple[str, str], beta_max: float) -> pd.DataFrame:
    """The configurations of one panel."""
    return table[(table["ramp"] == row[0]) & (lr_schedules(table) == row[1])
                 & np.isclose(table["beta_max"], beta_max)]


def panel_title(table: pd.DataFrame, row: tuple[str, str], beta_max: float) -> str:
    """``ramp linear, β_max = 1`` (plus ``, lr cyclical_cosine`` when the study varies it)."""
    lr = f", lr {row[1]}" if lr_schedules(table).nunique() > 1 else ""
    return f"ramp {row[0]}{lr}, β_max = {beta_max:g}"


def all_pruned(row: pd.Series) -> bool:
    n_seeds, n_pruned = int(row.get("n_seeds", 0) or 0), int(row.get("n_pruned", 0) or 0)
    return n_seeds > 0 and n_pruned >= n_seeds


def _decimals(values: np.ndarray) -> int:
    """Enough decimals to tell the cells of one figure apart: 1 to 3."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 2
    span = float(finite.max() - finite.min()) or float(np.abs(finite).max()) or 1.0
    return int(np.clip(1 - math.floor(math.log10(span)), 1, 3))


def _text_colour(rgba: tuple[float, ...]) -> str:
    luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    return "black" if luminance > 0.5 else "white"


def _cell_label(row: pd.Series, metric: str, decimals: int) -> str:
    text = row.get(f"{metric}_text")
    if isinstance(text, str):
        return text
    n = int(row.get(f"{metric}_n", 0) or 0)
    mean, ci = row[f"{metric}_mean"], row.get(f"{metric}_ci", math.nan)
    lo, hi = row.get(f"{metric}_lo", math.nan), row.get(f"{metric}_hi", math.nan)
    if n >= 3 and np.isfinite(lo) and np.isfinite(hi):  # bootstrap over seeds, inside bounds
        width = hi - lo
        d = max(decimals, min(3, -math.floor(math.log10(width)))) if width > 0 else decimals
        spread = f"[{lo:.{d}f}, {hi:.{d}f}]"
    elif n > 1 and np.isfinite(ci) and f"{metric}_lo" not in row.index:
        ci_decimals = max(decimals, min(3, -math.floor(math.log10(ci)))) if ci > 0 else decimals
        spread = f"±{ci:.{ci_decimals}f}"  # at least one significant digit of the CI
    else:
        spread = f"n={n}"
    star = "★ " if row.get("_verdict") == BEST else ""
    label = f"{star}{mean:.{decimals}f}\n{spread}"
    n_pruned = int(row.get("n_pruned", 0) or 0)
    return label + (f"\n{n_pruned} pruned" if n_pruned else "")


def _status_note(row: pd.Series) -> str:
    """Why a cell has no value: its trials' counts by status ("1 error\n2 running")."""
    n_seeds = int(row.get("n_seeds", 0) or 0)
    counts = {k: int(row.get(f"n_{k}", 0) or 0) for k in ("completed", "pruned", "error")}
    counts["running"] = n_seeds - sum(counts.values())
    return "\n".join(f"{n} {k}" for k, n in counts.items() if n > 0 and k != "completed")


def heatmap_figure(table: pd.DataFrame, metric: str, *, title: str | None = None,
                   mode: Mode | None = None, mark_noise: bool = True,
                   limits: tuple[float, float] | None = None,
                   outline: str | None = None, footer: str | None = None) -> Figure:
    """Mean ``metric`` per configuration over M (x) × R (y): one panel per ramp (rows; and lr
    schedule when it varies) × β_max (columns).

    Args:
        table: ``analysis.config_table`` output — one row per (n_cycles, ratio, ramp, beta_max)
            with ``<metric>_mean``, ``<metric>_ci``, ``<metric>_n``, ``n_seeds``, ``n_pruned``.
        metric: one of ``METRIC_STYLES`` (others get a plain higher-is-brighter scale).
        title: the figure title; default the metric's label.
        mode: which end is bright (the study objective's mode for its metric); default the
            metric's better end.
        mark_noise: star the best cell (the bright end) and outline the cells not
            distinguishable from it (Welch's t-test over seeds, p ≥ 0.05) — only when some
            cell differs, since an outline around every cell separates nothing.
        limits: a fixed colour range (e.g. 0–1 for a share) instead of the noise-aware one.
        outline: a boolean column: outline those cells (when it leaves some out) instead of
            the Welch marks.
        footer: the note under the figure (default: what the marks mean).

    Returns:
        The figure. Cells show "mean\\n±CI" (or "n=1") and how many seeds were pruned; cells
        whose trials were all pruned are grey, hatched and labelled "pruned"; cells with trials
        but no completed one (yet) are light grey with their trials' statuses; configurations
        without a trial stay blank. The colour scale is shared by all panels, spans at least
        one typical seed CI (2 × the median CI half-width, centred on the data), and its bright
        end is the better end.

    Raises:
        ValueError: when ``table`` is empty or lacks the metric's columns.
    """
    missing = {*GRID_COLUMNS, f"{metric}_mean"} - set(table.columns)
    if table.empty or missing:
        raise ValueError(f"heatmap of {metric!r}: no rows or missing columns {sorted(missing)}")
    style = style_of(metric, mode)
    pruned = table.apply(all_pruned, axis=1).to_numpy(bool)
    values = table[f"{metric}_mean"].to_numpy(dtype=float)
    shown = np.isfinite(values) & ~pruned
    cis = table.get(f"{metric}_ci", pd.Series(np.nan, index=table.index)).to_numpy(float)
    bounds = _BOUNDS.get(metric)
    norm = Normalize(*(limits or colour_limits(values[shown], cis[shown], bounds=bounds)))
    cmap = colormaps["viridis" if style.higher_is_better else "viridis_r"]
    cmap = cmap.with_extremes(bad="white")  # cells without a value
    verdict = versus_best(table[shown], metric, "max" if style.higher_is_better else "min")
    marks = verdict["verdict"].reindex(table.index) if mark_noise else pd.Series("", table.index)
    separates = bool((marks == DIFFERS).any())
    if outline is not None:
        chosen = table[outline].fillna(False).astype(bool)
        separates = bool(chosen.any() and not chosen[shown].all())
        marks = pd.Series(np.where(chosen, TIED, ""), index=table.index)
    elif not separates:  # nothing differs from the best: keep the star, drop the outlines
        marks = marks.where(marks == BEST, "")
    table = table.assign(_verdict=marks, _outline=marks.isin([BEST, TIED]) & separates)
    ms, rs = sorted(table["n_cycles"].unique()), sorted(table["ratio"].unique())
    rows, betas = panel_grid(table)
    decimals = _decimals(values[shown])
    fig = Figure(figsize=(len(betas) * (0.95 * len(ms) + 1.3) + 1.2,
                          len(rows) * (0.62 * len(rs) + 1.0) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows), len(betas), squeeze=False)
    for i, row in enumerate(rows):
        for j, beta_max in enumerate(betas):
            panel = panel_rows(table, row, beta_max)
            _heatmap_panel(axes[i, j], panel, metric, (ms, rs), norm, cmap, decimals)
            axes[i, j].set_title(panel_title(table, row, beta_max), fontsize=9)
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes, shrink=0.9, aspect=30)
    bar.set_label(f"{style.label}\n{style.direction}", fontsize=7)
    if not style.higher_is_better:
        bar.ax.invert_yaxis()  # bright (better) on top, as for every other metric
    fig.suptitle(title or style.label, fontsize=11)
    if footer is None and mark_noise:
        no_ci = not np.isfinite(cis[shown]).any()
        footer = (NO_NOISE_NOTE if no_ci else NOISE_NOTE if separates else
                  "★ best mean; no cell differs from it beyond seed noise (Welch t-test over "
                  f"seeds, p ≥ {ALPHA:g}), so none is outlined")
    if footer:
        fig.supxlabel(wrap_to(footer, fig.get_figwidth(), fontsize=7), fontsize=7, color="0.3")
    return fig


def wrap_to(text: str, width_in: float, *, fontsize: float) -> str:
    """``text`` wrapped to fit ``width_in`` inches at ``fontsize`` (≈ 0.6 em per character)."""
    chars = max(20, int(width_in * 72 / (0.6 * fontsize)) - 4)
    return "\n".join(textwrap.wrap(text, chars))


_BOUNDS: dict[str, tuple[float, float]] = {"kl": (0.0, math.inf), "mi": (0.0, math.inf),
                                           "au": (0.0, math.inf), "rec": (0.0, math.inf),
                                           "uses_z": (0.0, 1.0)}


def uses_z_figure(cells: Sequence[dict]) -> Figure:
    """The share of seeds whose trial uses z per configuration (``Analysis.cells``), on a fixed
    0–1 scale, each cell labelled k/n; the best set outlined when it leaves some out."""
    rows = []
    for cell in cells:
        z = cell["uses_z"]
        rows.append({**{k: cell[k] for k in (*GRID_COLUMNS, "lr_schedule")},
                     "uses_z_mean": z["share"] if z["n"] else math.nan,
                     "uses_z_ci": math.nan, "uses_z_n": z["n"],
                     "uses_z_text": f"{z['k']}/{z['n']}" if z["n"] else None,
                     "n_seeds": cell["n"], "n_completed": cell["n_completed"],
                     "n_pruned": cell["n_pruned"], "n_error": cell["n_error"],
                     "in_best_set": cell.get("in_best_set", False)})
    table = pd.DataFrame(rows)
    return heatmap_figure(table, "uses_z", title="share of seeds using z (final KL ≥ threshold)",
                          mark_noise=False, limits=(0.0, 1.0), outline="in_best_set",
                          footer="k/n: k of the n completed seeds use z; outlined: the best set "
                                 "by the objective (when it leaves some configurations out)")


def _outline(ax, x: float, y: float) -> None:
    """A cell's 'within noise of the best' mark: a white frame with a black edge inside it."""
    for width, colour in ((2.4, "white"), (0.9, "black")):
        ax.add_patch(Rectangle((x - 0.44, y - 0.42), 0.88, 0.84, fill=False, edgecolor=colour,
                               linewidth=width, zorder=4, label="within-noise"))


def _heatmap_panel(ax, panel: pd.DataFrame, metric: str, axes: tuple[list, list],
                   norm: Normalize, cmap, decimals: int) -> None:
    ms, rs = axes
    grid = np.full((len(rs), len(ms)), np.nan)
    for _, row in panel.iterrows():
        y, x = rs.index(row["ratio"]), ms.index(row["n_cycles"])
        mean = float(row[f"{metric}_mean"])
        if all_pruned(row):
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=_PRUNED_FACE,
                                   edgecolor=_PRUNED_EDGE, hatch="///", linewidth=0, zorder=2))
            ax.text(x, y, "pruned", ha="center", va="center", fontsize=7, zorder=3,
                    bbox={"facecolor": _PRUNED_FACE, "edgecolor": "none", "pad": 1})
        elif np.isfinite(mean):
            grid[y, x] = mean
            ax.text(x, y, _cell_label(row, metric, decimals), ha="center", va="center",
                    fontsize=7, linespacing=1.1, color=_text_colour(cmap(norm(mean))), zorder=5)
            if row.get("_outline", False):
                _outline(ax, x, y)
        elif note := _status_note(row):  # trials, but none completed (yet)
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor="#f0f0f0", linewidth=0,
                                   zorder=2))
            ax.text(x, y, note, ha="center", va="center", fontsize=7, color="0.35", zorder=3)
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower", aspect="auto",
              extent=(-0.5, len(ms) - 0.5, -0.5, len(rs) - 0.5))
    ax.set_xticks(range(len(ms)), [f"{m:g}" for m in ms], fontsize=8)
    ax.set_yticks(range(len(rs)), [f"{r:g}" for r in rs], fontsize=8)
    ax.set_xlabel("M (cycles)", fontsize=8)
    ax.set_ylabel("R (ramp ratio)", fontsize=8)
    ax.set_label("heatmap")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
