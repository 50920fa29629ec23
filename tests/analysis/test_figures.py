"""Figures as pure functions of DataFrames in the shapes of analysis._load / analysis._stats."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from analysis._figures import (
    CurveSpec,
    curves_figure,
    cycle_boundaries,
    latent_figure,
    pick_curve_configs,
    pruning_figure,
)
from analysis._heatmap import heatmap_figure
from workers._records import EVAL_COLUMNS, LATENT_COLUMNS, TRIAL_COLUMNS


def config_table(ms=(1, 2, 4), rs=(0.25, 0.5, 1.0), ramps=("linear",), betas=(1.0,),
                 pruned: dict | None = None, drop: tuple = ()) -> pd.DataFrame:
    """A config_table-shaped frame: 3 seeds per cell, ELBO rising with M, Rec falling with M."""
    pruned = pruned or {}
    rows = []
    for m, r, ramp, b in itertools.product(ms, rs, ramps, betas):
        if (m, r) in drop:
            continue
        n_pruned = pruned.get((m, r), 0)
        n = 3 - n_pruned
        row = {"n_cycles": m, "ratio": r, "ramp": ramp, "beta_max": b, "n_seeds": 3,
               "n_pruned": n_pruned, "n_error": 0}
        for metric, value in (("elbo", -2.6 + 0.05 * m - 0.1 * r), ("rec", 2.0 - 0.1 * m),
                              ("kl", 0.3 + 0.1 * m)):
            row |= {f"{metric}_mean": value if n else np.nan, f"{metric}_ci": 0.02 if n > 1
                    else np.nan, f"{metric}_n": n}
        rows.append(row)
    return pd.DataFrame(rows)


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "heatmap"]


def texts(fig) -> list[str]:
    return [t.get_text() for ax in panels(fig) for t in ax.texts]


@pytest.mark.parametrize(("ramps", "betas"), [(("linear",), (1.0,)),
                                              (("linear", "cosine"), (1.0,)),
                                              (("linear", "sigmoid", "cosine"), (0.5, 1.0))])
def test_heatmap_has_one_panel_per_ramp_and_beta_max(ramps, betas):
    fig = heatmap_figure(config_table(ramps=ramps, betas=betas), "elbo")
    assert len(panels(fig)) == len(ramps) * len(betas)


def test_heatmap_panel_titles_name_ramp_and_beta_max():
    fig = heatmap_figure(config_table(ramps=("linear", "cosine"), betas=(0.5, 1.0)), "elbo")
    titles = {ax.get_title() for ax in panels(fig)}
    assert titles == {f"ramp {r}, β_max = {b:g}" for r in ("linear", "cosine") for b in (0.5, 1)}


def test_heatmap_marks_all_pruned_cells_hatched_and_labelled():
    fig = heatmap_figure(config_table(pruned={(4, 0.25): 3, (2, 1.0): 3}), "elbo")
    hatched = [p for ax in panels(fig) for p in ax.patches
               if isinstance(p, Rectangle) and p.get_hatch()]
    assert len(hatched) == 2
    assert texts(fig).count("pruned") == 2


def test_heatmap_annotates_partially_pruned_cells_with_the_count():
    fig = heatmap_figure(config_table(pruned={(2, 0.5): 1}), "elbo")
    assert sum("1 pruned" in t for t in texts(fig)) == 1


@pytest.mark.parametrize(("n_pruned", "spread"), [(0, "±0.02"), (2, "n=1")])
def test_heatmap_cell_shows_mean_and_ci_or_n(n_pruned, spread):
    table = config_table(ms=(1,), rs=(0.5,), pruned={(1, 0.5): n_pruned})
    (label,) = texts(heatmap_figure(table, "elbo"))
    mean, shown_spread = label.removeprefix("★ ").splitlines()[:2]
    assert float(mean) == pytest.approx(table["elbo_mean"].iloc[0], abs=0.05)
    assert shown_spread == spread


def test_heatmap_labels_cells_without_a_completed_trial_with_their_statuses():
    table = config_table(ms=(1, 2), rs=(0.5,), pruned={(2, 0.5): 1})
    table.loc[table["n_cycles"] == 2, ["elbo_mean", "elbo_n", "n_error"]] = [np.nan, 0, 1]
    fig = heatmap_figure(table, "elbo")  # M=2: 1 pruned, 1 error, 1 running, none completed
    assert "1 pruned\n1 error\n1 running" in texts(fig)


def test_heatmap_leaves_missing_configurations_blank():
    fig = heatmap_figure(config_table(drop=((1, 1.0),)), "elbo")
    image = next(c for c in panels(fig)[0].get_children() if isinstance(c, AxesImage))
    data = image.get_array()
    assert data.mask[2, 0]  # R = 1.0 is the top row (origin lower), M = 1 the first column
    assert data.mask.sum() == 1


@pytest.mark.parametrize(("metric", "best"), [("elbo", "max"), ("rec", "min"), ("kl", "max")])
def test_heatmap_draws_the_better_end_bright(metric, best):
    fig = heatmap_figure(config_table(), metric)
    image = next(c for c in panels(fig)[0].get_children() if isinstance(c, AxesImage))
    values = image.get_array().compressed()
    target = values.max() if best == "max" else values.min()
    bright = colormaps["viridis"](1.0)
    assert np.allclose(image.cmap(image.norm(target)), bright)


def test_heatmap_colour_scale_is_shared_by_all_panels():
    table = config_table(ramps=("linear", "cosine"), betas=(0.5, 1.0))
    table.loc[table["ramp"] == "cosine", "elbo_mean"] -= 1.0  # one ramp clearly worse
    fig = heatmap_figure(table, "elbo")
    images = [c for ax in panels(fig) for c in ax.get_children() if isinstance(c, AxesImage)]
    limits = {(im.norm.vmin, im.norm.vmax) for im in images}
    assert limits == {(table["elbo_mean"].min(), table["elbo_mean"].max())}


def test_heatmap_rejects_a_metric_without_columns():
    with pytest.raises(ValueError, match="'mi'"):
        heatmap_figure(config_table(), "mi")


def test_heatmap_renders_to_png():
    buffer = io.BytesIO()
    heatmap_figure(config_table(pruned={(4, 0.25): 3}), "elbo").savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("total", "m", "expected"), [(2000, 4, [500, 1000, 1500]),
                                                      (10, 3, [4, 8]), (100, 1, []),
                                                      (7, 7, [1, 2, 3, 4, 5, 6])])
def test_cycle_boundaries_are_multiples_of_the_rounded_up_period(total, m, expected):
    assert cycle_boundaries(total, m) == expected


def evaluations(configs, *, total=400, n_seeds=2, every=50) -> pd.DataFrame:
    rows = []
    for (m, r), seed in itertools.product(configs, range(n_seeds)):
        for step in range(every, total + 1, every):
            row = dict.fromkeys(EVAL_COLUMNS, np.nan) | {
                "trial_id": f"M{m}-R{r}-s{seed}", "model": "toy", "data": "toy", "n_cycles": m,
                "ratio": r, "ramp": "linear", "beta_max": 1.0, "seed": seed,
                "total_steps": total, "step": step, "split": "valid", "status": "completed",
                "final": step == total, "elbo": -3 + step / total + 0.1 * seed, "rec": 2.0,
                "kl": 0.5}
            rows.append(row)
    return pd.DataFrame(rows)


def test_curves_draw_one_mean_line_per_config_and_its_cycle_boundaries():
    specs = [CurveSpec("cyc", 4, 0.5, "linear", 1.0), CurveSpec("mono", 1, 0.25, "linear", 1.0)]
    fig = curves_figure(evaluations([(4, 0.5), (1, 0.25)]), specs)
    elbo_ax = fig.axes[0]
    mean_lines = [ln for ln in elbo_ax.lines if ln.get_linestyle() == "-"]
    boundaries = [ln.get_xdata()[0] for ln in elbo_ax.lines if ln.get_linestyle() == ":"]
    assert [ln.get_label() for ln in mean_lines] == ["cyc", "mono"]
    assert np.allclose(mean_lines[0].get_ydata(), -3 + np.arange(50, 351, 50) / 400 + 0.05)
    assert boundaries == [100, 200, 300]
    # the final evaluation (another evaluation set) is a marker of its own, not on the line
    finals = [ln for ln in elbo_ax.lines if ln.get_marker() == "D"]
    assert [list(ln.get_xdata()) for ln in finals] == [[400], [400]]
    assert np.allclose(finals[0].get_ydata(), [-2 + 0.05])


def test_curves_beta_panel_follows_the_schedule():
    fig = curves_figure(evaluations([(2, 0.5)]), [CurveSpec("c", 2, 0.5, "linear", 1.0)])
    beta = fig.axes[3].lines[0].get_ydata()
    assert beta.min() == 0.0 and beta.max() == 1.0


def test_pick_curve_configs_takes_the_best_of_each_kind_and_skips_all_pruned():
    table = config_table(ms=(1, 2, 4), rs=(0.0, 0.5), pruned={(4, 0.5): 3})
    picked = {s.label.split(":")[0]: (s.n_cycles, s.ratio) for s in pick_curve_configs(table)}
    assert picked == {"cyclical": (2, 0.5), "monotonic": (1, 0.5), "constant": (4, 0.0)}


def test_pick_curve_configs_follows_the_objective_mode():
    table = config_table(ms=(1, 2, 4), rs=(0.0, 0.5))
    picked = {s.label.split(":")[0]: (s.n_cycles, s.ratio)
              for s in pick_curve_configs(table, metric="kl", mode="min")}
    assert picked == {"cyclical": (2, 0.5), "monotonic": (1, 0.5), "constant": (1, 0.0)}


def latents(trial_ids, steps=(100, 200, 300, 400, 500, 600, 700, 800)) -> pd.DataFrame:
    rows = [{"study": "s", "trial_id": tid, "step": step, "index": i, "z0": np.cos(i) * step / 400,
             "z1": np.sin(i) * step / 400}
            for tid, step, i in itertools.product(trial_ids, steps, range(10))]
    return pd.DataFrame(rows, columns=list(LATENT_COLUMNS))


def test_latent_figure_has_a_row_per_trial_and_n_steps_columns():
    fig = latent_figure(latents(["a", "b"]), [("cyclical", "a"), ("monotonic", "b")], n_steps=4)
    scatter_axes = [ax for ax in fig.axes if ax.get_label() == "latent" and ax.collections]
    assert len(scatter_axes) == 8
    assert [ax.get_title() for ax in scatter_axes[:4]] == [
        "step 100", "step 300", "step 600", "step 800"]


def test_latent_points_are_coloured_by_sentence_index():
    fig = latent_figure(latents(["a"]), [("c", "a")], n_steps=1)
    (points,) = next(ax for ax in fig.axes if ax.get_label() == "latent").collections
    assert list(points.get_array()) == list(range(10))


def test_latent_figure_rejects_trials_without_latents():
    with pytest.raises(ValueError, match="no latent rows"):
        latent_figure(latents(["a"]), [("c", "zzz")])


def trials_frame() -> pd.DataFrame:
    rows = []
    for i, (status, last) in enumerate([("completed", 400), ("pruned", 150), ("error", 50),
                                        ("running", 200)]):
        rows.append(dict.fromkeys(TRIAL_COLUMNS) | {
            "trial_id": f"t{i}", "n_cycles": 2, "ratio": 0.5, "ramp": "linear", "beta_max": 1.0,
            "seed": i, "total_steps": 400, "status": status, "last_step": last,
            "pruned_at_step": 150 if status == "pruned" else np.nan})
    return pd.DataFrame(rows)


def test_pruning_timeline_marks_the_pruned_step():
    fig = pruning_figure(trials_frame())
    ax = fig.axes[0]
    marks = [ln for ln in ax.lines if ln.get_marker() == "x"]
    assert [(m.get_xdata()[0], m.get_ydata()[0]) for m in marks] == [(150, 1)]
    assert any(t.get_text() == "pruned at 150" for t in ax.texts)


def test_pruning_timeline_leaves_out_completed_trials_of_a_large_study():
    frame = trials_frame()
    fig = pruning_figure(frame, max_rows=3)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [f"M=2 R=0.5 linear β=1 s{i}" for i in (1, 2, 3)]
    assert fig.axes[0].get_title(loc="left") == "1 completed trials not shown"


def test_pruning_timeline_has_a_bar_per_trial_up_to_its_last_step():
    fig = pruning_figure(trials_frame())
    filled = [p for p in fig.axes[0].patches if p.get_facecolor()[3] > 0 and p.get_width() > 0]
    assert sorted(p.get_width() for p in filled) == [50, 150, 200, 400]
