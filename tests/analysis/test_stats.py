"""analysis._stats: confidence intervals, per-config tables, paired tests."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis._stats import (
    PAIRED_COLUMNS,
    TOO_FEW_SEEDS,
    config_table,
    mean_ci,
    paired_vs_monotonic,
)


def finals(rows: list[tuple]) -> pd.DataFrame:
    """(n_cycles, ratio, seed, status, elbo, rec, kl) rows; ramp linear, β_max 1."""
    columns = ["n_cycles", "ratio", "seed", "status", "elbo", "rec", "kl"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.assign(ramp="linear", beta_max=1.0, mi=0.5, au=1.0)


MONO_ELBO = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
DIFFS = [0.5, 0.7, 0.3, 0.5, 0.6, 0.4]  # mean 0.5, sd √0.02


def paired_study(n_seeds: int = 6) -> pd.DataFrame:
    rows = []
    for s in range(n_seeds):
        rows.append((1, 0.5, s, "completed", MONO_ELBO[s], 2.0, 0.5))
        rows.append((4, 0.5, s, "completed", MONO_ELBO[s] + DIFFS[s], 1.5, 1.0 + s))
    return finals(rows)


def test_mean_ci_matches_hand_computation():
    mean, half, n = mean_ci([1.0, 2.0, 3.0, 4.0])
    # sd = 1.29099, t(0.975, 3) = 3.18245 → 3.18245 · 1.29099 / 2
    assert (mean, n) == (2.5, 4)
    assert half == pytest.approx(2.054260, abs=1e-6)


def test_mean_ci_other_confidence_uses_its_quantile():
    _, half, _ = mean_ci([1.0, 2.0, 3.0, 4.0], confidence=0.9)
    assert half == pytest.approx(2.353363 * 1.290994 / 2, abs=1e-5)


def test_mean_ci_ignores_nan_values():
    assert mean_ci([1.0, math.nan, 3.0])[::2] == (2.0, 2)


@pytest.mark.parametrize("values, expected_n", [([7.0], 1), ([], 0), ([math.nan], 0)])
def test_mean_ci_has_no_half_width_below_two_values(values, expected_n):
    mean, half, n = mean_ci(values)
    assert math.isnan(half) and n == expected_n
    assert (mean == 7.0) if expected_n else math.isnan(mean)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95])
def test_mean_ci_rejects_a_confidence_outside_0_1(confidence):
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=confidence)


def test_config_table_averages_completed_seeds_and_counts_the_others():
    table = config_table(finals([
        (4, 0.5, 0, "completed", -2.0, 1.0, 1.0),
        (4, 0.5, 1, "completed", -3.0, 1.0, 2.0),
        (4, 0.5, 2, "pruned", -9.0, 9.0, 9.0),
        (4, 0.5, 3, "error", -9.0, 9.0, 9.0),
        (1, 0.5, 0, "completed", -4.0, 2.0, 2.0),
    ]))
    assert list(table["n_cycles"]) == [1, 4]
    row = table.iloc[1]
    assert (row["elbo_mean"], row["elbo_n"], row["kl_mean"]) == (-2.5, 2, 1.5)
    assert row["elbo_ci"] == pytest.approx(stats.t.ppf(0.975, 1) * math.sqrt(0.5) / math.sqrt(2))
    assert (row["n_seeds"], row["n_completed"], row["n_pruned"], row["n_error"]) == (4, 2, 1, 1)
    assert math.isnan(table.iloc[0]["elbo_ci"])


def test_paired_difference_ci_and_tests_match_hand_numbers():
    result = paired_vs_monotonic(paired_study())
    assert list(result.columns) == list(PAIRED_COLUMNS)
    elbo = result[result["metric"] == "elbo"].iloc[0]
    assert (elbo["n_cycles"], elbo["ratio"], elbo["n_pairs"]) == (4, 0.5, 6)
    assert elbo["mean_diff"] == pytest.approx(0.5)
    assert elbo["ci"] == pytest.approx(stats.t.ppf(0.975, 5) * math.sqrt(0.02 / 6))
    expected_p = stats.ttest_rel(np.add(MONO_ELBO, DIFFS), MONO_ELBO).pvalue
    assert elbo["p_value"] == pytest.approx(expected_p)
    assert elbo["p_value"] == pytest.approx(3.4e-4, rel=0.05)  # t = 8.66 on 5 dof
    assert elbo["p_wilcoxon"] == pytest.approx(2 / 64)  # all 6 differences positive: exact test
    assert elbo["note"] == ""


def test_paired_wilcoxon_needs_six_pairs():
    result = paired_vs_monotonic(paired_study(n_seeds=5))
    assert result["p_wilcoxon"].isna().all() and result["p_value"].notna().all()


def test_paired_uses_only_seeds_completed_in_both():
    frame = paired_study()
    frame.loc[(frame["n_cycles"] == 4) & (frame["seed"] == 2), "status"] = "pruned"
    frame.loc[(frame["n_cycles"] == 1) & (frame["seed"] == 3), "status"] = "error"
    elbo = paired_vs_monotonic(frame).query("metric == 'elbo'").iloc[0]
    assert elbo["n_pairs"] == 4
    assert elbo["mean_diff"] == pytest.approx(np.mean([0.5, 0.7, 0.6, 0.4]))


def test_paired_notes_too_few_seeds_below_two_pairs():
    result = paired_vs_monotonic(paired_study(n_seeds=1))
    assert (result["note"] == TOO_FEW_SEEDS).all() and (result["n_pairs"] == 1).all()
    assert result[["ci", "p_value", "p_wilcoxon"]].isna().all().all()


def test_paired_needs_a_baseline_at_the_same_ratio():
    frame = paired_study()
    frame.loc[frame["n_cycles"] == 1, "ratio"] = 0.25
    assert paired_vs_monotonic(frame).empty


def test_paired_leaves_out_constant_beta_configs():
    frame = paired_study()
    constant = frame.assign(ratio=0.0)
    result = paired_vs_monotonic(pd.concat([frame, constant], ignore_index=True))
    assert set(result["ratio"]) == {0.5}


def test_paired_vs_constant_lr_pairs_each_beta_schedule_with_its_constant_eta_twin():
    from analysis._stats import paired_vs_constant_lr

    base = paired_study(3)
    frame = pd.concat([base.assign(lr_schedule="constant"),
                       base.assign(lr_schedule="cyclical_cosine",
                                   elbo=base["elbo"] + 0.25)], ignore_index=True)
    paired = paired_vs_constant_lr(frame, metrics=("elbo",))
    assert sorted(paired["n_cycles"]) == [1, 4]
    assert set(paired["lr_schedule"]) == {"cyclical_cosine"}
    assert paired["mean_diff"].tolist() == pytest.approx([0.25, 0.25])
    assert (paired["n_pairs"] == 3).all()
    assert paired_vs_constant_lr(base, metrics=("elbo",)).empty  # one η schedule only


def test_pooled_pairs_every_ramp_with_its_own_monotonic_twin():
    from analysis._stats import POOLED_COLUMNS, paired_vs_monotonic_pooled

    base = paired_study(3)  # M 4 − M 1 elbo differences 0.5, 0.7, 0.3 per seed
    cosine = base.assign(ramp="cosine", elbo=np.where(base["n_cycles"] == 1, 10.0,
                                                      10.0 + 2.0))  # differences 2, 2, 2
    other_r = base.assign(ratio=1.0, elbo=np.where(base["n_cycles"] == 1, 0.0, -1.0))
    frame = pd.concat([base, cosine, other_r], ignore_index=True)
    pooled = paired_vs_monotonic_pooled(frame, metrics=("elbo",))
    assert list(pooled.columns) == list(POOLED_COLUMNS)
    assert list(zip(pooled["n_cycles"], pooled["ratio"], strict=True)) == [(4, 0.5), (4, 1.0)]
    at_half = pooled.iloc[0]
    assert at_half["n_pairs"] == 6  # 3 seeds × 2 ramps
    diffs = np.array([0.5, 0.7, 0.3, 2.0, 2.0, 2.0])
    assert at_half["mean_diff"] == pytest.approx(diffs.mean())
    assert at_half["ci"] == pytest.approx(mean_ci(diffs)[1])
    assert at_half["p_value"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    assert pooled.iloc[1]["mean_diff"] == pytest.approx(-1.0)  # R 1 pooled on its own
    # the per-ramp table still has one row per ramp
    assert len(paired_vs_monotonic(frame, metrics=("elbo",))) == 3


def test_pooled_skips_a_pair_whose_twin_did_not_complete():
    from analysis._stats import paired_vs_monotonic_pooled

    frame = paired_study(4)
    frame.loc[(frame["n_cycles"] == 1) & (frame["seed"] == 0), "status"] = "pruned"
    pooled = paired_vs_monotonic_pooled(frame, metrics=("elbo",))
    assert pooled.iloc[0]["n_pairs"] == 3
    assert pooled.iloc[0]["mean_diff"] == pytest.approx(np.mean(DIFFS[1:4]))
