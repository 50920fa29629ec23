"""Every report figure, drawn for a collapsed, a bimodal and a PTB-like study: no text leaves
its figure, no two labels overprint each other, no interval leaves its bounds."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from analysis import analyse_trials, config_table, heatmap_figure, rate_distortion_figure
from analysis._heatmap import uses_z_figure

GRID = [(m, r, ramp) for m in (1, 2, 4, 8) for r in (0.25, 0.5, 1.0)
        for ramp in ("linear", "cosine")]


def _study(kind: str, n_seeds: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng({"collapsed": 0, "bimodal": 1, "ptb": 2}[kind])
    rows = []
    for seed in range(n_seeds):
        for m, r, ramp in GRID:
            if kind == "collapsed":  # the all-collapsed study: KL ~ 0, Rec = log 10
                kl, rec = abs(rng.normal(0, 0.002)), 2.303 + rng.normal(0, 0.002)
            elif kind == "bimodal":  # a seed uses z or it does not
                uses = m > 1 and rng.random() < 0.5
                kl = rng.uniform(0.3, 1.6) if uses else abs(rng.normal(0, 1e-3))
                rec = 2.303 - 0.9 * kl + rng.normal(0, 0.01)
            else:  # PTB-like: ELBO ~ −100 nats, KL a few nats, Rec ~ 95
                kl = abs(rng.normal(1.5 if m > 1 else 0.3, 0.4))
                rec = 98.0 - 0.8 * kl + rng.normal(0, 0.6)
            rows.append({"n_cycles": m, "ratio": r, "ramp": ramp, "beta_max": 1.0,
                         "lr_schedule": "constant", "seed": seed, "status": "completed",
                         "rec": rec, "kl": kl, "elbo": -(rec + kl),
                         "mi": max(0.0, kl - 0.05), "au": float(kl >= 0.1) * 2,
                         "trial_id": f"{kind}-{seed}-{m}-{r}-{ramp}"})
    return pd.DataFrame(rows)


def _figures(kind: str):
    finals = _study(kind)
    table = config_table(finals)
    yield "rate-distortion", rate_distortion_figure(table)
    for metric in ("elbo", "kl", "rec", "mi", "au"):
        yield f"heatmap-{metric}", heatmap_figure(table, metric, title=f"final {metric}")
    yield "uses_z", uses_z_figure(analyse_trials(finals, latent_dim=2).cells)


def _texts(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    drawn_ticks, all_ticks = set(), set()
    for ax in fig.axes:  # tick labels exist for ticks outside the view too; only some are drawn
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                all_ticks.update({id(tick.label1), id(tick.label2)})
            for tick in axis._update_ticks():
                drawn_ticks.update({id(tick.label1), id(tick.label2)})
    out = []
    for text in fig.findobj(Text):
        if id(text) in all_ticks and id(text) not in drawn_ticks:
            continue
        if text.get_visible() and text.get_text().strip() and text.get_alpha() != 0:
            out.append((text, text.get_window_extent(renderer)))
    return fig.bbox, out


@pytest.mark.parametrize("kind", ["collapsed", "bimodal", "ptb"])
def test_no_text_leaves_its_figure(kind):
    for name, fig in _figures(kind):
        box, texts = _texts(fig)
        for text, extent in texts:
            assert (extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1
                    and extent.y0 >= box.y0 - 1 and extent.y1 <= box.y1 + 1), (
                f"{kind} {name}: {text.get_text()!r} at {extent} leaves the figure {box}")


@pytest.mark.parametrize("kind", ["collapsed", "bimodal", "ptb"])
def test_rate_distortion_labels_do_not_overprint(kind):
    fig = dict(_figures(kind))["rate-distortion"]
    _, texts = _texts(fig)
    labels = [t for t, _ in texts if t.get_gid() == "point-label"]
    assert len(labels) >= 6  # the points are labelled (M, R), not left anonymous
    for ax in fig.axes:
        own = [(t, e) for t, e in texts if t.axes is ax and t.get_gid() == "point-label"]
        for (a, ea), (b, eb) in itertools.combinations(own, 2):
            assert not ea.overlaps(eb), f"{kind}: {a.get_text()!r} overprints {b.get_text()!r}"


def test_rate_distortion_axes_fit_collapsed_points():
    """All points at KL ≈ 0: the KL axis must not run to 13 nats, and no diagonal is labelled
    'ELBO −0'."""
    fig = dict(_figures("collapsed"))["rate-distortion"]
    _, texts = _texts(fig)
    ax = fig.axes[0]
    assert ax.get_xlim()[1] < 0.5 and ax.get_xlim()[0] >= -0.05
    assert not any(t.get_text().replace("−", "-").strip() in ("ELBO -0", "ELBO −0")
                   for t, _ in texts)
