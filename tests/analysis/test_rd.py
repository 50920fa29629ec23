"""analysis._rd: the rate–distortion plane (x = KL, y = Rec), seed error bars, equal-ELBO lines."""

from __future__ import annotations

import io

import numpy as np
import pytest
from test_figures import config_table

from analysis._rd import KINDS, rate_distortion_figure, schedule_kind


def rd_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "rate-distortion"]


def points(ax) -> dict[str, np.ndarray]:
    """Marker positions per schedule family (the errorbar's data line)."""
    out = {}
    for container in ax.containers:
        line = container.lines[0]
        out[container.get_label()] = np.column_stack([line.get_xdata(), line.get_ydata()])
    return out


def iso_lines(ax) -> list:
    return [ln for ln in ax.lines if ln.get_linestyle() == "--"]


@pytest.mark.parametrize(("m", "r", "kind"), [(1, 0.5, "monotonic"), (4, 0.25, "cyclical"),
                                              (1, 0.0, "constant"), (8, 0.0, "constant")])
def test_schedule_kind(m, r, kind):
    assert schedule_kind(m, r) == kind


def test_every_configuration_is_a_point_at_kl_and_rec():
    table = config_table(ms=(1, 2, 4), rs=(0.0, 0.5))
    (ax,) = rd_axes(rate_distortion_figure(table))
    found = points(ax)
    assert set(found) == {"monotonic", "cyclical", "constant"}
    assert sum(len(p) for p in found.values()) == len(table)
    cyclical = table[(table["n_cycles"] > 1) & (table["ratio"] > 0)]
    assert np.allclose(sorted(map(tuple, found["cyclical"])),
                       sorted(zip(cyclical["kl_mean"], cyclical["rec_mean"], strict=True)))


def test_families_have_distinct_markers():
    (ax,) = rd_axes(rate_distortion_figure(config_table(ms=(1, 2), rs=(0.0, 0.5))))
    markers = {c.get_label(): c.lines[0].get_marker() for c in ax.containers}
    assert markers == {k: KINDS[k][0] for k in markers} and len(set(markers.values())) == 3


def test_error_bars_are_the_seed_cis():
    table = config_table(ms=(2,), rs=(0.5,)).assign(kl_ci=0.05, rec_ci=0.08)
    (ax,) = rd_axes(rate_distortion_figure(table))
    (container,) = ax.containers
    bars = [seg for coll in container.lines[2] for seg in coll.get_segments()]
    spans = sorted(float(np.ptp(seg[:, 0]) + np.ptp(seg[:, 1])) for seg in bars)
    assert spans == pytest.approx([0.1, 0.16])  # 2 × CI in x (KL) and in y (Rec)


def test_dashed_lines_are_lines_of_equal_elbo():
    (ax,) = rd_axes(rate_distortion_figure(config_table()))
    lines = iso_lines(ax)
    assert len(lines) >= 3
    for line in lines:
        x, y = line.get_xdata(), line.get_ydata()
        assert np.allclose(x + y, x[0] + y[0])  # Rec + KL = −ELBO constant
    labels = [t.get_text() for t in ax.texts if "ELBO" in t.get_text()]
    assert len(labels) == len(lines)


def test_points_are_labelled_with_m_and_r():
    (ax,) = rd_axes(rate_distortion_figure(config_table(ms=(1, 4), rs=(0.5,))))
    assert {t.get_text() for t in ax.texts if t.get_text().startswith("M")} == {"M1 R0.5",
                                                                                "M4 R0.5"}


def test_one_panel_per_ramp_and_beta_max_with_shared_axes():
    fig = rate_distortion_figure(config_table(ramps=("linear", "cosine"), betas=(0.5, 1.0)))
    axes = rd_axes(fig)
    assert len(axes) == 4
    assert len({ax.get_xlim() for ax in axes}) == 1 and len({ax.get_ylim() for ax in axes}) == 1


def test_configs_without_values_are_left_out_and_none_is_an_error():
    table = config_table(ms=(1, 2), rs=(0.5,), pruned={(2, 0.5): 3})
    (ax,) = rd_axes(rate_distortion_figure(table))
    assert set(points(ax)) == {"monotonic"}
    with pytest.raises(ValueError, match="no configuration with a final KL and Rec"):
        rate_distortion_figure(table.assign(kl_mean=np.nan))


def test_rate_distortion_renders_to_png():
    buffer = io.BytesIO()
    rate_distortion_figure(config_table()).savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
