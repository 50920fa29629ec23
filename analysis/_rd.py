"""The rate–distortion plane (Alemi et al. 2018, "Fixing a broken ELBO").

Each configuration is a point at x = KL (the rate) and y = Rec (the distortion), from its final
validation values, with 95% seed CIs as error bars. Since −ELBO = Rec + KL, every line of slope
−1 is a line of equal ELBO: "similar ELBO, lower Rec, higher KL" — the paper's claim for cyclical
annealing — is a move down and to the right along one diagonal.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # headless: the report is written on servers and in CI

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis._heatmap import panel_grid, panel_rows, panel_title, wrap_to  # noqa: E402

# schedule family → (marker, colour, legend label)
KINDS: dict[str, tuple[str, str, str]] = {
    "monotonic": ("o", "#1f77b4", "monotonic (M = 1)"),
    "cyclical": ("^", "#d62728", "cyclical (M > 1)"),
    "constant": ("s", "#7f7f7f", "constant β (R = 0)"),
}
_N_ISO_LINES = 6


def schedule_kind(n_cycles: int, ratio: float) -> str:
    """``constant`` (R = 0: β is β_max throughout), ``monotonic`` (M = 1) or ``cyclical``."""
    if ratio == 0:
        return "constant"
    return "monotonic" if n_cycles == 1 else "cyclical"


def _limits(x: np.ndarray, y: np.ndarray, xerr: np.ndarray,
            yerr: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Each axis fitted to its own points and error bars (5% margin, at least a small span so
    a cluster of collapsed runs is not blown up into noise), never below 0: KL and Rec are
    ≥ 0. Lines of equal ELBO stay exact (Rec + KL = c) though no longer at 45°."""
    limits = []
    for values, err in ((x, xerr), (y, yerr)):
        lo, hi = float(np.nanmin(values - err)), float(np.nanmax(values + err))
        span = max(hi - lo, 0.02 * max(abs(hi), 1.0), 0.01)
        centre = (lo + hi) / 2
        start = max(centre - 0.55 * span, 0.0 if lo >= 0 else lo - 0.05 * span)
        start = max(start, -0.05 * span) if lo >= 0 else start
        limits.append((start, start + 1.1 * span))
    return limits[0], limits[1]


def _iso_elbo_lines(ax, xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
    """Dashed lines Rec + KL = c over the panel, each labelled with its ELBO = −c."""
    levels = MaxNLocator(_N_ISO_LINES).tick_values(xlim[0] + ylim[0], xlim[1] + ylim[1])
    step = float(levels[1] - levels[0]) if len(levels) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    for c in levels:
        if c <= 0:  # Rec + KL ≥ 0: the line c = 0 only touches the origin
            continue
        x0, x1 = max(xlim[0], c - ylim[1]), min(xlim[1], c - ylim[0])
        if x1 - x0 < 0.05 * (xlim[1] - xlim[0]):
            continue
        ax.plot([x0, x1], [c - x0, c - x1], ls="--", lw=0.7, color="0.6", zorder=1)
        if x0 > xlim[0] + 0.7 * (xlim[1] - xlim[0]):  # no room for the label inside the panel
            continue
        ax.text(x0, c - x0, f" ELBO {-c:.{decimals}f}".replace("-", "−"), fontsize=6.5,
                color="0.45",
                ha="left", va="top", zorder=1, clip_on=True)


def _bounded(rows: pd.DataFrame, metric: str) -> np.ndarray:
    """Asymmetric error bars: the bootstrap interval over seeds (inside the bounds; none below
    3 seeds) when the table has it, else the t CI cut at 0 (KL and Rec are never negative)."""
    mean = rows[f"{metric}_mean"].to_numpy(float)
    if f"{metric}_lo" in rows.columns:
        lo = rows[f"{metric}_lo"].to_numpy(float)
        hi = rows[f"{metric}_hi"].to_numpy(float)
        return np.nan_to_num(np.vstack([np.maximum(mean - lo, 0.0), np.maximum(hi - mean, 0.0)]))
    half = rows[f"{metric}_ci"].fillna(0).to_numpy(float)
    return np.vstack([np.minimum(half, np.maximum(mean, 0.0)), half])


_OFFSETS = ((4, 3), (4, -9), (-30, 3), (-30, -9))  # points: right-up, right-down, left-…


def _declutter(fig: Figure) -> int:
    """Move or hide point labels that would overprint another one or leave the figure;
    returns how many were hidden."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    hidden = 0
    box = fig.bbox
    for ax in fig.axes:
        placed = []
        for label in [t for t in ax.texts if t.get_gid() == "point-label"]:
            for offset in _OFFSETS:
                label.xyann = offset
                extent = label.get_window_extent(renderer)
                inside = (extent.x0 >= box.x0 and extent.x1 <= box.x1
                          and extent.y0 >= box.y0 and extent.y1 <= box.y1)
                if inside and not any(extent.overlaps(other) for other in placed):
                    placed.append(extent)
                    break
            else:
                label.set_visible(False)
                hidden += 1
    return hidden


def _panel(ax, rows: pd.DataFrame) -> None:
    for kind, (marker, colour, _) in KINDS.items():
        own = rows[rows["_kind"] == kind]
        if own.empty:
            continue
        ax.errorbar(own["kl_mean"], own["rec_mean"], xerr=_bounded(own, "kl"),
                    yerr=_bounded(own, "rec"), fmt=marker, color=colour, ms=6, mec="black",
                    mew=0.5, elinewidth=0.9, capsize=2, zorder=3, label=kind)
        for row in own.itertuples(index=False):
            ax.annotate(f"M{row.n_cycles} R{row.ratio:g}", (row.kl_mean, row.rec_mean),
                        xytext=(4, 3), textcoords="offset points", fontsize=6.5, zorder=4,
                        gid="point-label", annotation_clip=True)
    ax.set_xlabel("KL (rate), nats", fontsize=8)
    ax.set_ylabel("Rec (distortion), nats", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.2)
    ax.set_label("rate-distortion")


def rate_distortion_figure(table: pd.DataFrame) -> Figure:
    """Every configuration in the (KL, Rec) plane, one panel per ramp (rows; and lr schedule
    when it varies) × β_max (columns).

    Args:
        table: ``analysis.config_table`` output with ``kl_*`` and ``rec_*`` columns (final
            validation values; means over completed seeds, 95% CI half-widths).

    Returns:
        The figure: markers by schedule family (:data:`KINDS`), "M R" labels, error bars =
        95% CIs over seeds (none with one seed), dashed lines of equal ELBO (Rec + KL = const).
        All panels share their axes.

    Raises:
        ValueError: no configuration has both a finite KL and a finite Rec.
    """
    needed = {"kl_mean", "kl_ci", "rec_mean", "rec_ci"}
    if needed - set(table.columns):
        raise ValueError(f"rate-distortion figure: missing columns {sorted(needed - set(table))}")
    rows = table[np.isfinite(table["kl_mean"].astype(float))
                 & np.isfinite(table["rec_mean"].astype(float))]
    if rows.empty:
        raise ValueError("rate-distortion figure: no configuration with a final KL and Rec")
    rows = rows.assign(_kind=[schedule_kind(m, r) for m, r in zip(rows["n_cycles"],
                                                                   rows["ratio"], strict=True)])
    panels, betas = panel_grid(rows)
    xerr, yerr = _bounded(rows, "kl"), _bounded(rows, "rec")
    xlim, ylim = _limits(*(rows[c].to_numpy(float) for c in ("kl_mean", "rec_mean")),
                         xerr.max(axis=0), yerr.max(axis=0))
    side = 4.2 if len(panels) * len(betas) == 1 else 3.4
    fig = Figure(figsize=(side * len(betas) + 0.4, side * len(panels) + 0.9), layout="constrained")
    axes = fig.subplots(len(panels), len(betas), squeeze=False, sharex=True, sharey=True)
    for i, panel in enumerate(panels):
        for j, beta_max in enumerate(betas):
            ax = axes[i, j]
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            _iso_elbo_lines(ax, xlim, ylim)
            _panel(ax, panel_rows(rows, panel, beta_max))
            ax.set_title(panel_title(rows, panel, beta_max), fontsize=9)
    present = [k for k in KINDS if k in set(rows["_kind"])]
    handles = [Line2D([], [], marker=KINDS[k][0], color=KINDS[k][1], mec="black", mew=0.5,
                      ls="none", label=KINDS[k][2]) for k in present]
    handles.append(Line2D([], [], ls="--", lw=0.7, color="0.6",
                          label="equal ELBO (Rec + KL = const)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=math.ceil(len(handles) / 2),
               fontsize=7.5, frameon=False)
    fig.suptitle(wrap_to("Rate–distortion: final validation KL vs Rec (95% CI over seeds)",
                         fig.get_figwidth(), fontsize=10), fontsize=10)
    hidden = _declutter(fig)
    if hidden:  # said in the title: the legend sits at the bottom
        note = (f"{hidden} point label(s) not drawn where points overlap (the configuration "
                "table has every value)")
        fig.suptitle(fig._suptitle.get_text() + "\n" + wrap_to(note, fig.get_figwidth(),
                                                                fontsize=8), fontsize=9)
        _declutter(fig)
    return fig
