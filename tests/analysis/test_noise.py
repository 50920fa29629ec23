"""analysis._noise: the objective of study.json, Welch tests against the best, colour limits."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_stats import finals

from analysis._load import ReportError
from analysis._noise import (
    BEST,
    DIFFERS,
    TIED,
    UNTESTED,
    Objective,
    colour_limits,
    objective_of,
    seed_sd,
    versus_best,
)
from analysis._stats import config_table


@pytest.mark.parametrize(("meta", "expected"), [
    ({}, Objective("elbo", "max")),
    ({"spec": {"name": "old"}}, Objective("elbo", "max")),
    ({"spec": {"objective": {"metric": "iw_nll", "mode": "min"}}}, Objective("iw_nll", "min")),
    ({"spec": {"objective": {"metric": "kl"}}}, Objective("kl", "max")),
    ({"spec": {"objective": {"metric": "rec", "mode": None}}}, Objective("rec", "min")),
    ({"spec": {"objective": {"metric": "elbo", "mode": "min"}}}, Objective("elbo", "min")),
])
def test_objective_of_reads_study_json_with_the_elbo_default(meta, expected):
    assert objective_of(meta) == expected


@pytest.mark.parametrize(("objective", "match"), [
    ({"metric": "bleu"}, r"spec.objective.metric must be one of elbo, .*, got 'bleu'"),
    ({"metric": "elbo", "mode": "up"}, "spec.objective.mode must be max or min, got 'up'"),
    ("elbo", "spec.objective must be a mapping, got 'elbo'"),
])
def test_objective_of_rejects_unknown_values(objective, match):
    with pytest.raises(ReportError, match=match):
        objective_of({"spec": {"objective": objective}})


def test_objective_label():
    assert Objective("iw_nll", "min").label == "validation IW-NLL (min)"


def test_seed_sd_inverts_the_t_half_width():
    values = [1.0, 2.0, 4.0]
    table = config_table(finals([(1, 0.5, s, "completed", v, 1.0, 1.0)
                                 for s, v in enumerate(values)]))
    sd = seed_sd(table["elbo_ci"], table["elbo_n"]).iloc[0]
    assert sd == pytest.approx(np.std(values, ddof=1))


SEEDS = {(1, 0.5): [-3.0, -2.9, -3.1], (2, 0.5): [-2.1, -1.95, -2.05, -1.95],
         (4, 0.5): [-2.0, -1.98, -2.02], (8, 0.5): [-1.5]}


def seeds_table(values=SEEDS) -> pd.DataFrame:
    rows = [(m, r, s, "completed", v, 1.0, 1.0)
            for (m, r), vs in values.items() for s, v in enumerate(vs)]
    return config_table(finals(rows))


def test_versus_best_is_welch_on_the_seed_values():
    table = seeds_table({k: v for k, v in SEEDS.items() if k != (8, 0.5)})
    result = versus_best(table, "elbo", "max")
    by_m = dict(zip(table["n_cycles"], zip(result["verdict"], result["p_vs_best"], strict=True),
                    strict=True))
    assert by_m[4] == (BEST, pytest.approx(math.nan, nan_ok=True))
    for m, verdict in ((1, DIFFERS), (2, TIED)):
        expected = stats.ttest_ind(SEEDS[(m, 0.5)], SEEDS[(4, 0.5)], equal_var=False).pvalue
        assert by_m[m] == (verdict, pytest.approx(expected))


def test_versus_best_min_mode_picks_the_lowest_mean():
    result = versus_best(seeds_table(), "elbo", "min")
    assert result["verdict"].iloc[0] == BEST  # M = 1 has the lowest ELBO


def test_single_seed_cells_are_untested_and_can_still_be_best():
    result = versus_best(seeds_table(), "elbo", "max")
    assert list(result["verdict"]) == [UNTESTED, UNTESTED, UNTESTED, BEST]  # M=8: one seed
    assert result["p_vs_best"].isna().all()


def test_zero_spread_cells_are_equal_or_different():
    table = seeds_table({(1, 0.5): [2.0, 2.0], (2, 0.5): [2.0, 2.0], (4, 0.5): [1.0, 1.0]})
    assert list(versus_best(table, "elbo", "max")["verdict"]) == [BEST, TIED, DIFFERS]


def test_versus_best_without_values_is_empty_verdicts():
    table = seeds_table().assign(elbo_mean=np.nan)
    assert (versus_best(table, "elbo", "max")["verdict"] == "").all()


def test_colour_limits_widen_to_the_largest_ci_around_the_data():
    lo, hi = colour_limits(np.array([0.00002, 0.00012]), np.array([0.0005, 0.0007]))
    assert hi - lo == pytest.approx(2 * 0.0007)  # the largest half-width, 0.0007
    assert (lo + hi) / 2 == pytest.approx(0.00007)


def test_colour_limits_stay_inside_the_bounds():
    lo, hi = colour_limits(np.array([0.00002, 0.00012]), np.array([0.0005, 0.0007]),
                           bounds=(0.0, np.inf))
    assert lo == 0.0 and hi == pytest.approx(2 * 0.0007)
    assert colour_limits(np.array([0.9, 1.0]), np.array([0.3]), bounds=(0.0, 1.0)) == (
        pytest.approx(0.4), 1.0)


def test_colour_limits_keep_a_data_range_wider_than_the_noise():
    assert colour_limits(np.array([-3.0, -2.0, -2.5]), np.array([0.1, 0.1, np.nan])) == (-3, -2)


@pytest.mark.parametrize(("values", "cis", "expected"), [
    ([1.0, 1.0], [np.nan, np.nan], (0.5, 1.5)),  # no spread, no CI
    ([np.nan], [0.1], (0.0, 1.0)),  # nothing to show
    ([1.0, 2.0], [0.0, 0.0, 0.4], (1.0, 2.0)),  # a range wider than every CI is kept
    ([1.0, 2.0], [0.0, 0.0, 1.4], (0.1, 2.9)),  # one noisy cell is enough to widen it
])
def test_colour_limits_edge_cases(values, cis, expected):
    assert colour_limits(np.array(values), np.array(cis)) == pytest.approx(expected)
