"""Heatmaps that do not paint noise: colour range ≥ the seed CI, best starred, ties outlined."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps
from matplotlib.image import AxesImage
from test_figures import config_table, panels, texts

from analysis._heatmap import NOISE_NOTE, heatmap_figure
from analysis._noise import BEST, TIED, versus_best


def image_of(fig) -> AxesImage:
    return next(c for c in panels(fig)[0].get_children() if isinstance(c, AxesImage))


def outlined_cells(fig) -> set[tuple[float, float]]:
    """Centres (M index, R index) of the cells with the within-noise frame."""
    return {(round(p.get_x() + p.get_width() / 2, 3), round(p.get_y() + p.get_height() / 2, 3))
            for ax in panels(fig) for p in ax.patches if p.get_label() == "within-noise"}


def noise_table() -> pd.DataFrame:
    """Quickstart-like KL: 0.00002 vs 0.00012 nats, seed CI ±0.0005 — pure noise."""
    table = config_table(ms=(1, 2), rs=(0.5,))
    return table.assign(kl_mean=[0.00002, 0.00012], kl_ci=[0.0005, 0.0005])


def test_colour_range_is_at_least_one_typical_seed_ci_wide():
    norm = image_of(heatmap_figure(noise_table(), "kl")).norm
    assert norm.vmax - norm.vmin == pytest.approx(2 * 0.0005)
    assert norm.vmin == 0.0  # centred on the data, then shifted: KL is never painted below 0


def test_one_noisy_cell_among_exact_zeros_does_not_stretch_the_scale():
    """The issue's all-collapsed study: KL 0.000 ± 0.003 next to 0.000 ± 0.000 cells was
    painted bright green next to blue (the median CI, 0, let the data range win)."""
    table = config_table(ms=(1, 2, 4), rs=(0.5,)).assign(
        kl_mean=[0.0001, 0.0, 0.0], kl_ci=[0.003, 0.0, 0.0])
    image = image_of(heatmap_figure(table, "kl"))
    assert image.norm.vmin >= 0.0 and image.norm.vmax - image.norm.vmin >= 2 * 0.003 - 1e-12
    assert abs(image.norm(0.0001) - image.norm(0.0)) < 0.05


def test_no_outline_when_every_cell_is_within_noise_of_the_best():
    table = noise_table()
    fig = heatmap_figure(table, "kl")
    outlines = [p for ax in fig.axes for p in ax.patches if p.get_label() == "within-noise"]
    assert outlines == []
    assert "none is outlined" in fig.get_supxlabel().replace("\n", " ")


def test_cells_within_noise_get_nearly_one_colour():
    image = image_of(heatmap_figure(noise_table(), "kl"))
    low, high = image.cmap(image.norm(0.00002)), image.cmap(image.norm(0.00012))
    assert abs(image.norm(0.00012) - image.norm(0.00002)) == pytest.approx(0.1)
    assert np.abs(np.subtract(low, high)).max() < 0.2  # not purple vs yellow


def test_colour_range_is_the_data_range_when_cells_differ_beyond_noise():
    table = config_table()  # ELBO spread 0.25, CI 0.02
    norm = image_of(heatmap_figure(table, "elbo")).norm
    assert (norm.vmin, norm.vmax) == (table["elbo_mean"].min(), table["elbo_mean"].max())


def test_best_cell_is_starred_and_noise_ties_outlined():
    table = config_table(ms=(1, 2, 4), rs=(0.5,))  # ELBO −2.60, −2.55, −2.45; CI 0.02
    table.loc[table["n_cycles"] == 2, "elbo_mean"] = -2.46  # within noise of the best
    fig = heatmap_figure(table, "elbo")
    starred = [t for t in texts(fig) if t.startswith("★")]
    assert len(starred) == 1 and starred[0].startswith("★ -2.45")
    assert outlined_cells(fig) == {(1.0, 0.0), (2.0, 0.0)}  # M=2 and the best, M=4


def test_outlines_match_the_welch_verdicts():
    table = config_table(ms=(1, 2, 4, 8), rs=(0.25, 0.5, 1.0))
    table["elbo_ci"] = np.linspace(0.01, 0.4, len(table))
    verdict = versus_best(table, "elbo", "max")["verdict"]
    fig = heatmap_figure(table, "elbo")
    ms, rs = sorted(table["n_cycles"].unique()), sorted(table["ratio"].unique())
    expected = {(float(ms.index(m)), float(rs.index(r)))
                for m, r, v in zip(table["n_cycles"], table["ratio"], verdict, strict=True)
                if v in (BEST, TIED)}
    assert outlined_cells(fig) == expected
    assert 1 < len(expected) < len(table)


def test_noise_marks_can_be_turned_off():
    fig = heatmap_figure(config_table(), "elbo", mark_noise=False)
    assert not outlined_cells(fig) and not any(t.startswith("★") for t in texts(fig))


def test_figure_states_the_test_it_uses():
    fig = heatmap_figure(config_table(), "elbo")
    assert fig.get_supxlabel().replace("\n", " ") == NOISE_NOTE
    assert "Welch t-test" in NOISE_NOTE and "p ≥ 0.05" in NOISE_NOTE


@pytest.mark.parametrize(("metric", "mode"), [("elbo", "min"), ("rec", "max"), ("kl", "min")])
def test_objective_mode_sets_the_bright_end(metric, mode):
    fig = heatmap_figure(config_table(), metric, mode=mode)
    values = image_of(fig).get_array().compressed()
    target = values.max() if mode == "max" else values.min()
    image = image_of(fig)
    assert np.allclose(image.cmap(image.norm(target)), colormaps["viridis"](1.0))
    star = next(t for t in texts(fig) if t.startswith("★"))
    assert float(star.split()[1]) == pytest.approx(target, abs=0.01)


def test_figure_says_when_one_seed_gives_no_noise_estimate():
    from analysis._heatmap import NO_NOISE_NOTE

    table = config_table(pruned={(m, r): 2 for m in (1, 2, 4) for r in (0.25, 0.5, 1.0)})
    fig = heatmap_figure(table, "elbo")  # every cell: 1 completed seed, no CI
    assert fig.get_supxlabel().replace("\n", " ") == NO_NOISE_NOTE
