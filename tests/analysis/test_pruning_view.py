"""analysis._pruning_view: steps run vs planned, pruned trials per M and R, family shares."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis._pruning_view import (
    family_line,
    pruned_table,
    settings_line,
    steps_line,
    steps_run,
)
from workers._records import TRIAL_COLUMNS


def trials(rows: list[tuple]) -> pd.DataFrame:
    """(M, R, seed, status, last_step, pruned_at) rows; T = 1000, ramp linear, β_max 1."""
    out = []
    for m, r, seed, status, last, at in rows:
        out.append(dict.fromkeys(TRIAL_COLUMNS) | {
            "trial_id": f"M{m}-R{r}-s{seed}", "n_cycles": m, "ratio": r, "ramp": "linear",
            "beta_max": 1.0, "seed": seed, "total_steps": 1000, "status": status,
            "last_step": last, "pruned_at_step": at})
    return pd.DataFrame(out)


GRID = trials([
    (1, 0.5, 0, "completed", 1000, np.nan), (1, 0.5, 1, "completed", 1000, np.nan),
    (4, 0.5, 0, "pruned", 300, 300), (4, 0.5, 1, "pruned", 600, 600),
    (4, 1.0, 0, "error", 100, np.nan), (4, 1.0, 1, "completed", 1000, np.nan),
])


def test_steps_run_counts_completed_trials_in_full_and_others_to_their_last_step():
    assert list(steps_run(GRID)) == [1000, 1000, 300, 600, 100, 1000]


def test_steps_line_gives_the_share_run_and_saved():
    assert steps_line(GRID) == ("Steps run: 4,000 of 6,000 planned (67%): pruning saved 18% of "
                                "the planned steps, failed trials left 15% unrun.")


def test_steps_line_of_a_partial_study_says_so():
    running = trials([(1, 0.5, 0, "running", 400, np.nan), (1, 0.5, 1, "pending", 0, np.nan)])
    line = steps_line(running, partial=True)
    assert line.startswith("Steps run: 400 of 2,000 planned (20%)")
    assert line.endswith("(unfinished trials count up to their last step so far).")


def test_pruned_table_is_m_by_r_with_counts_and_steps():
    table = pruned_table(GRID)
    assert list(table.columns) == ["M", "R=0.5", "R=1"]
    assert table.set_index("M").to_dict("index") == {
        1: {"R=0.5": "0 of 2 pruned", "R=1": "—"},
        4: {"R=0.5": "2 of 2 pruned, at 300 (0.3 T), 600 (0.6 T)", "R=1": "0 of 2 pruned"}}


def test_pruned_table_summarises_many_pruned_trials_by_median_share():
    many = trials([(2, 0.5, s, "pruned", at, at) for s, at in enumerate((250, 300, 500, 700))])
    assert pruned_table(many).loc[0, "R=0.5"] == "4 of 4 pruned, median at 0.4 T (250–700)"


def test_pruned_table_counts_unfinished_trials_apart():
    mixed = trials([(2, 0.5, 0, "pruned", 250, 250), (2, 0.5, 1, "running", 400, np.nan)])
    assert pruned_table(mixed).loc[0, "R=0.5"] == "1 of 1 pruned (1 unfinished), at 250 (0.25 T)"


def test_pruned_table_has_ramp_and_beta_rows_when_they_vary():
    two = pd.concat([GRID, GRID.assign(ramp="cosine", trial_id=GRID["trial_id"] + "c")])
    table = pruned_table(two)
    assert list(table.columns[:2]) == ["ramp", "M"]
    assert list(table["ramp"]) == ["linear", "linear", "cosine", "cosine"]


def test_family_line_has_fishers_exact_p():
    line = family_line(GRID)
    p = stats.fisher_exact([[0, 2], [2, 2]]).pvalue
    assert line.startswith(f"Pruned by family: M = 1 0 of 2 (0%), M > 1 2 of 4 (50%); "
                           f"Fisher exact p = {p:.2g}")


def test_family_line_needs_both_families_and_a_pruned_trial():
    assert family_line(GRID[GRID["n_cycles"] == 4]) is None
    assert family_line(GRID[GRID["status"] != "pruned"]) is None


@pytest.mark.parametrize(("pruning", "expected"), [
    ({"pruner": "median", "phase_aware": True, "min_share": 0.25, "n_startup_trials": 5},
     "Pruner: median, phase-aware (judged on evaluations at β = β_max), nothing pruned before "
     "25% of T, 5 startup trials."),
    ({"pruner": "hyperband", "phase_aware": False, "n_startup_trials": 5}, "Pruner: hyperband."),
    ({"pruner": "none"}, "Pruning off (pruner: none)."),
])
def test_settings_line_describes_the_pruner(pruning, expected):
    assert settings_line({"spec": {"pruning": pruning}}) == expected


def test_settings_line_without_pruning_spec_is_none():
    assert settings_line({}) is None
