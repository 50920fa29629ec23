"""The report's figures: learning curves, latent maps, the pruning timeline.

Heatmaps are in ``analysis._heatmap``, the rate–distortion plane in ``analysis._rd``.
Every function is a pure function of DataFrames (the shapes of ``analysis._load`` and
``analysis._stats``) and returns a :class:`matplotlib.figure.Figure`; nothing is shown or saved
here. Figures are built without pyplot, so no global figure registry grows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless: the report is written on servers and in CI

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import BoundaryNorm, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402

from analysis._heatmap import all_pruned  # noqa: E402
from analysis._noise import Mode  # noqa: E402
from analysis._stats import lr_schedules  # noqa: E402
from workers._schedules import beta_at  # noqa: E402


# --- learning curves ---------------------------------------------------------------------
@dataclass(frozen=True)
class CurveSpec:
    """One line of the learning-curve figure: a configuration, averaged over its seeds."""

    label: str
    n_cycles: int
    ratio: float
    ramp: str
    beta_max: float
    lr_schedule: str = "constant"


def _lr_of(row: pd.Series) -> str:
    value = row.get("lr_schedule", "constant")
    return "constant" if pd.isna(value) else str(value)


def _best_row(table: pd.DataFrame, mask: pd.Series, metric: str,
              mode: Mode) -> pd.Series | None:
    rows = table[mask & ~table.apply(all_pruned, axis=1) & table[f"{metric}_mean"].notna()]
    if rows.empty:
        return None
    means = rows[f"{metric}_mean"]
    return rows.loc[means.idxmax() if mode == "max" else means.idxmin()]


def pick_curve_configs(table: pd.DataFrame, *, metric: str = "elbo",
                       mode: Mode = "max") -> list[CurveSpec]:
    """Best cyclical (M > 1, R > 0), best monotonic (M = 1, R > 0) and best constant (R = 0)
    configuration by mean final ``metric`` (the highest for ``mode="max"``, else the lowest),
    each when present."""
    if table.empty:
        return []
    groups = (("cyclical", (table["n_cycles"] > 1) & (table["ratio"] > 0)),
              ("monotonic", (table["n_cycles"] == 1) & (table["ratio"] > 0)),
              ("constant", table["ratio"] == 0))
    specs = []
    for kind, mask in groups:
        row = _best_row(table, mask, metric, mode)
        if row is not None:
            label = (f"{kind}: M={int(row['n_cycles'])} R={row['ratio']:g} {row['ramp']} "
                     f"β_max={row['beta_max']:g}" if kind != "constant"
                     else f"constant: β={row['beta_max']:g} (R=0)")
            lr = _lr_of(row)
            label += f" lr {lr}" if lr != "constant" else ""
            specs.append(CurveSpec(label, int(row["n_cycles"]), float(row["ratio"]),
                                   str(row["ramp"]), float(row["beta_max"]), lr))
    return specs


def config_rows(frame: pd.DataFrame, spec: CurveSpec) -> pd.DataFrame:
    """The rows of ``frame`` (trials, evaluations) that belong to ``spec``'s configuration."""
    mask = ((frame["n_cycles"] == spec.n_cycles) & np.isclose(frame["ratio"], spec.ratio)
            & (frame["ramp"] == spec.ramp) & np.isclose(frame["beta_max"], spec.beta_max))
    return frame[mask & (lr_schedules(frame) == spec.lr_schedule)]


def cycle_boundaries(total_steps: int, n_cycles: int) -> list[int]:
    """Steps at which a new cycle starts: multiples of ⌈T/M⌉ inside (0, T)."""
    period = math.ceil(total_steps / n_cycles)
    return list(range(period, total_steps, period)) if n_cycles > 1 else []


def curves_figure(evaluations: pd.DataFrame, specs: Sequence[CurveSpec], *,
                  split: str = "valid") -> Figure:
    """ELBO, Rec, KL (``split``) and β against the optimizer step (paper Fig. 3/5).

    One line per spec, the mean over its seeds at each evaluation step, with a band from the
    lowest to the highest seed; the final evaluation (the whole split, where the intermediate
    ones use a fixed subset) is a separate hollow diamond with the seeds' range, since its
    level is not comparable with the line's. β is drawn from the schedule itself. Dotted
    vertical lines in a spec's colour mark its cycle boundaries (multiples of ⌈T/M⌉; none for
    R = 0, whose β is constant whatever M).
    """
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    panels = (("elbo", "ELBO"), ("rec", "Rec"), ("kl", "KL"), ("beta", "β"))
    rows = evaluations[evaluations["split"] == split]
    for k, spec in enumerate(specs):
        colour = f"C{k}"
        own = config_rows(rows, spec)
        if own.empty:
            continue
        final = (own["final"] == True) if "final" in own.columns else own["step"] < 0  # noqa: E712
        stats = own[~final].groupby("step")[["elbo", "rec", "kl"]].agg(["mean", "min", "max"])
        ends = own[final].groupby("step")[["elbo", "rec", "kl"]].agg(["mean", "min", "max"])
        for ax, (metric, _) in zip(axes[:3], panels[:3], strict=True):
            ax.plot(stats.index, stats[(metric, "mean")], color=colour, lw=1.5, label=spec.label)
            ax.fill_between(stats.index, stats[(metric, "min")], stats[(metric, "max")],
                            color=colour, alpha=0.2, lw=0)
            mean = ends[(metric, "mean")]  # another evaluation set: a marker, not the line
            ax.errorbar(ends.index, mean, yerr=[mean - ends[(metric, "min")],
                                                ends[(metric, "max")] - mean],
                        color=colour, marker="D", mfc="white", ms=6, ls="none", capsize=3)
        total_steps = int(own["total_steps"].mode().iloc[0])
        steps = np.unique(np.linspace(1, total_steps, min(total_steps, 2000)).astype(int))
        betas = [beta_at(int(t), total_steps=total_steps, n_cycles=spec.n_cycles,
                         ratio=spec.ratio, ramp=spec.ramp, beta_max=spec.beta_max) for t in steps]
        axes[3].plot(steps, betas, color=colour, lw=1.5)
        for step in cycle_boundaries(total_steps, spec.n_cycles) if spec.ratio > 0 else ():
            for ax in axes:
                ax.axvline(step, color=colour, ls=":", lw=1, alpha=0.8)
    for ax, (_, name) in zip(axes, panels, strict=True):
        ax.set_ylabel(name if name == "β" else f"{split} {name}")
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("optimizer step")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 3),
                   fontsize=8, frameon=False)
    return fig


# --- latent maps ---------------------------------------------------------------------------
def _pick_steps(steps: np.ndarray, n_steps: int) -> list[int]:
    if len(steps) <= n_steps:
        return [int(s) for s in steps]
    idx = np.unique(np.round(np.linspace(0, len(steps) - 1, n_steps)).astype(int))
    return [int(steps[i]) for i in idx]


def latent_figure(latents: pd.DataFrame, trials: Sequence[tuple[str, str]], *,
                  n_steps: int = 6) -> Figure:
    """Posterior means of 2-D latents through training (paper Fig. 4): small multiples.

    Args:
        latents: ``workers._records.LATENT_COLUMNS`` rows.
        trials: ``(row label, trial_id)`` pairs, one row of panels each.
        n_steps: panels per row, evenly spaced over the trial's recorded steps.

    Returns:
        The figure; points are coloured by sentence index, axes are shared by every panel and
        the dashed circle is the prior's 1σ.
    """
    chosen = [(label, latents[latents["trial_id"] == tid]) for label, tid in trials]
    chosen = [(label, own) for label, own in chosen if not own.empty]
    if not chosen:
        raise ValueError("latent figure: no latent rows for the chosen trials")
    n_cols = max(len(_pick_steps(np.unique(own["step"]), n_steps)) for _, own in chosen)
    reach = max(1.0, float(np.nanmax(np.abs(pd.concat([o for _, o in chosen])[["z0", "z1"]]))))
    lim = 1.1 * reach
    n_points = int(latents["index"].max()) + 1
    cmap = colormaps["tab10" if n_points <= 10 else "viridis"]
    norm = BoundaryNorm(np.arange(-0.5, n_points), cmap.N) if n_points <= 10 else \
        Normalize(0, n_points - 1)
    fig = Figure(figsize=(1.9 * n_cols + 1.2, 2.0 * len(chosen) + 0.4), layout="constrained")
    axes = fig.subplots(len(chosen), n_cols, squeeze=False, sharex=True, sharey=True)
    for r, (label, own) in enumerate(chosen):
        steps = _pick_steps(np.unique(own["step"]), n_steps)
        for c, ax in enumerate(axes[r]):
            ax.set_aspect("equal")
            ax.set_label("latent")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.tick_params(labelsize=7)
            if c >= len(steps):
                ax.set_axis_off()
                continue
            at = own[own["step"] == steps[c]]
            ax.add_patch(Circle((0, 0), 1.0, fill=False, ls="--", lw=0.6, color="0.6"))
            ax.scatter(at["z0"], at["z1"], c=at["index"], cmap=cmap, norm=norm, s=18,
                       edgecolors="black", linewidths=0.3)
            ax.set_title(f"step {steps[c]}", fontsize=8)
        axes[r, 0].set_ylabel(f"{label}\nz₁", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("z₀", fontsize=8)
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes, shrink=0.8, aspect=30)
    bar.set_label("sentence index", fontsize=8)
    if n_points <= 10:
        bar.set_ticks(range(n_points))
    return fig


# --- pruning timeline ------------------------------------------------------------------------
STATUS_COLOURS: dict[str, str] = {"completed": "#4c9a4c", "pruned": "#e08a1e", "error": "#c0392b",
                                  "running": "#3a78c2", "pending": "#bdbdbd"}


def trial_label(row: pd.Series) -> str:
    return (f"M={int(row['n_cycles'])} R={row['ratio']:g} {row['ramp']} "
            f"β={row['beta_max']:g} s{int(row['seed'])}")


def pruning_figure(trials: pd.DataFrame, *, max_rows: int = 40) -> Figure:
    """One horizontal bar per trial: its planned length (grey outline), how far it got (filled,
    coloured by status) and, for pruned trials, the step it was pruned at (×).

    With more than ``max_rows`` trials only those that did not complete are drawn; the title
    counts the completed ones left out.

    Raises:
        ValueError: no trial to draw.
    """
    shown = trials if len(trials) <= max_rows else trials[trials["status"] != "completed"]
    if shown.empty:
        raise ValueError("pruning figure: no trials to draw")
    order = shown.sort_values(["ramp", "beta_max", "n_cycles", "ratio", "seed", "trial_id"])
    fig = Figure(figsize=(9, 0.24 * len(order) + 1.3), layout="constrained")
    ax = fig.subplots()
    for y, (_, row) in enumerate(order.iterrows()):
        planned = float(row["total_steps"])
        reached = planned if row["status"] == "completed" else float(row["last_step"] or 0)
        reached = 0.0 if not np.isfinite(reached) else reached
        ax.barh(y, planned, height=0.7, facecolor="none", edgecolor="0.75", lw=0.8)
        ax.barh(y, reached, height=0.7, color=STATUS_COLOURS.get(row["status"], "0.5"))
        pruned_at = row.get("pruned_at_step")
        if row["status"] == "pruned" and pruned_at is not None and np.isfinite(pruned_at):
            ax.plot(pruned_at, y, marker="x", color="black", ms=6, mew=1.5)
            ax.annotate(f"pruned at {pruned_at:.0f}", (pruned_at, y), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(range(len(order)), [trial_label(r) for _, r in order.iterrows()], fontsize=7)
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("optimizer step")
    ax.grid(axis="x", alpha=0.3)
    present = [s for s in STATUS_COLOURS if s in set(order["status"])]
    handles = [Rectangle((0, 0), 1, 1, color=STATUS_COLOURS[s]) for s in present]
    fig.legend(handles, present, loc="outside upper center", ncols=max(len(present), 1),
               fontsize=8, frameon=False)
    if len(order) < len(trials):
        ax.set_title(f"{len(trials) - len(order)} completed trials not shown", fontsize=8,
                     loc="left", color="0.35")
    return fig
