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

from analysis._heatmap import panel_grid, panel_rows, panel_title  # noqa: E402

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
    """Equal spans on both axes (so equal-ELBO lines run at 45°), KL and Rec kept ≥ ~0."""
    lo_x, hi_x = np.nanmin(x - xerr), np.nanmax(x + xerr)
    lo_y, hi_y = np.nanmin(y - yerr), np.nanmax(y + yerr)
    span = 1.2 * max(hi_x - lo_x, hi_y - lo_y, 1e-3)
    limits = []
    for lo, hi in ((lo_x, hi_x), (lo_y, hi_y)):
        start = (lo + hi) / 2 - span / 2
        start = max(start, min(lo, 0.0) - 0.04 * span)  # no empty negative half
        limits.append((float(start), float(start + span)))
    return limits[0], limits[1]


def _iso_elbo_lines(ax, xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
    """Dashed lines Rec + KL = c over the panel, each labelled with its ELBO = −c."""
    levels = MaxNLocator(_N_ISO_LINES).tick_values(xlim[0] + ylim[0], xlim[1] + ylim[1])
    for c in levels:
        x0, x1 = max(xlim[0], c - ylim[1]), min(xlim[1], c - ylim[0])
        if x1 - x0 < 0.05 * (xlim[1] - xlim[0]):
            continue
        ax.plot([x0, x1], [c - x0, c - x1], ls="--", lw=0.7, color="0.6", zorder=1)
        ax.text(x0, c - x0, f" ELBO {-c:.3g}".replace("-", "−"), fontsize=6.5, color="0.45",
                ha="left", va="top", zorder=1, clip_on=True)


def _panel(ax, rows: pd.DataFrame) -> None:
    for kind, (marker, colour, _) in KINDS.items():
        own = rows[rows["_kind"] == kind]
        if own.empty:
            continue
        ax.errorbar(own["kl_mean"], own["rec_mean"], xerr=own["kl_ci"].fillna(0),
                    yerr=own["rec_ci"].fillna(0), fmt=marker, color=colour, ms=6, mec="black",
                    mew=0.5, elinewidth=0.9, capsize=2, zorder=3, label=kind)
        for row in own.itertuples(index=False):
            ax.annotate(f"M{row.n_cycles} R{row.ratio:g}", (row.kl_mean, row.rec_mean),
                        xytext=(4, 3), textcoords="offset points", fontsize=6.5, zorder=4)
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
    xlim, ylim = _limits(*(rows[c].to_numpy(float) for c in ("kl_mean", "rec_mean")),
                         *(rows[c].fillna(0).to_numpy(float) for c in ("kl_ci", "rec_ci")))
    side = 4.2 if len(panels) * len(betas) == 1 else 3.4
    fig = Figure(figsize=(side * len(betas) + 0.4, side * len(panels) + 0.9), layout="constrained")
    axes = fig.subplots(len(panels), len(betas), squeeze=False, sharex=True, sharey=True)
    for i, panel in enumerate(panels):
        for j, beta_max in enumerate(betas):
            ax = axes[i, j]
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_aspect("equal", adjustable="box")
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
    fig.suptitle("Rate–distortion: final validation KL vs Rec (95% CI over seeds)", fontsize=10)
    return fig
