"""analysis._summary: the best configuration by the objective, seed noise, cyclical vs mono."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_stats import finals, paired_study

from analysis._noise import Objective
from analysis._summary import pm, summary_lines

NOISE = (-0.01, 0.0, 0.01)  # per seed: sd 0.01


def study(means: dict[tuple[int, float], tuple[float, float, float]], *, noise=NOISE):
    """(M, R) → (ELBO, Rec, KL) means; seed s adds noise[s] · (1 + M/4) to all three."""
    rows = [(m, r, s, "completed", elbo + e * (1 + m / 4), rec - e * (1 + m / 4),
             kl + e * (1 + m / 4))
            for (m, r), (elbo, rec, kl) in means.items() for s, e in enumerate(noise)]
    return finals(rows)


CLEAR = {(1, 0.5): (-3.0, 2.3, 0.0), (2, 0.5): (-2.005, 1.5, 0.6), (4, 0.5): (-2.0, 1.2, 0.9)}


def test_best_line_names_objective_mode_ci_and_seeds():
    line = summary_lines(study(CLEAR))[0]
    assert line.startswith("Best configuration by the objective, validation ELBO (max): "
                           "M=4, R=0.5 (linear, β_max=1): −2.000 ± 0.050 (over 3 seeds)")
    assert "1 other is within seed noise of it (Welch t-test over seeds, p ≥ 0.05), 1 differs" \
        in line


def test_summary_says_no_configuration_differs_when_all_are_within_noise():
    null = {(m, r): (-2.3 + 0.001 * m, 2.3, 0.0001 * m) for m in (1, 2, 4) for r in (0.25, 0.5)}
    line = summary_lines(study(null, noise=(-0.1, 0.0, 0.1)))[0]
    assert line.startswith("No configuration differs beyond seed noise in validation ELBO (max): "
                           "all 6 tested configurations are within seed noise")
    assert "Best" not in line and "M=4, R=0.25" in line  # names the highest mean, not a "best"


def test_summary_with_one_seed_says_noise_cannot_be_judged():
    line = summary_lines(study(CLEAR, noise=(0.0,)))[0]
    assert line.startswith("Only one seed per configuration, so seed noise cannot be judged")
    assert "M=4, R=0.5" in line and "1 seed" in line


def test_best_line_follows_the_objective_metric_and_mode():
    line = summary_lines(study(CLEAR), objective=Objective("kl", "min"))[0]
    assert line.startswith("Best configuration by the objective, validation KL (min): M=1, R=0.5")


def test_best_line_ignores_non_finite_values():
    frame = study(CLEAR | {(8, 0.5): (-1.0, 1.0, 0.0)})
    frame.loc[frame["n_cycles"] == 8, "elbo"] = [math.inf, math.nan, math.inf]
    assert "M=4, R=0.5" in summary_lines(frame)[0]


def test_best_line_when_nothing_completed():
    frame = study(CLEAR).assign(status="pruned")
    assert summary_lines(frame)[0] == ("No completed trial with a finite validation ELBO (max) "
                                       "yet: no best configuration.")


TRADE = {(1, 0.5): (-2.3, 2.3, 0.0), (2, 0.5): (-2.4, 1.4, 1.0), (4, 0.5): (-2.2, 2.0, 0.2)}


@pytest.mark.parametrize(("objective", "chosen"), [(None, 4), (Objective("kl", "max"), 2),
                                                   (Objective("rec", "min"), 2)])
def test_comparison_takes_the_best_cyclical_config_by_the_objective(objective, chosen):
    line = summary_lines(study(TRADE), objective=objective)[1]
    assert line.startswith(f"Cyclical vs monotonic (M={chosen} vs M=1, R=0.5, linear, "
                           "β_max=1; the best cyclical configuration by validation")


def test_comparison_shows_rec_kl_and_elbo_and_the_objective():
    line = summary_lines(study(TRADE), objective=Objective("mi", "max"))[1]
    diffs = line.split("(max)): ", 1)[1]
    order = [diffs.index(f"{name} ") for name in ("Rec", "KL", "ELBO", "MI")]
    assert order == sorted(order)
    assert "Rec −0.9000 ± 0.0062 (p=2.6e-06)" in line and "paired over 3 seeds" in line


def test_claim_holds_for_similar_elbo_lower_rec_higher_kl():
    similar = {(1, 0.5): (-2.3, 2.3, 0.0), (4, 0.5): (-2.3, 1.6, 0.7)}
    frame = study(similar)
    frame.loc[frame["n_cycles"] == 4, "elbo"] += [0.02, -0.03, 0.01]  # ELBO difference ≈ 0
    claim = summary_lines(frame)[2]
    assert claim == ("The paper's claim (similar ELBO, lower Rec, higher KL) holds here: "
                     "cyclical has Rec lower, KL higher, ELBO similar (CI includes 0) (95% CIs "
                     "of the paired differences).")


def test_claim_is_not_shown_when_kl_does_not_rise():
    claim = summary_lines(study({(1, 0.5): (-2.3, 2.3, 0.0), (4, 0.5): (-2.1, 2.1, 0.0)}))[2]
    assert "is not shown here" in claim and "Rec lower, KL no clear difference" in claim


def test_comparison_with_one_seed_says_too_few_seeds():
    lines = summary_lines(paired_study(n_seeds=1))
    assert "too few seeds for a claim (n=1)" in lines[1].lower()
    assert len(lines) == 3  # best, comparison, counts: no claim line


def test_summary_counts_pruned_and_failed_trials():
    frame = paired_study()
    frame.loc[[0, 1], "status"] = ["pruned", "error"]
    assert summary_lines(frame)[-1] == "12 trials: 10 completed, 1 pruned, 1 failed"


def test_summary_without_a_monotonic_baseline_says_so():
    frame = paired_study().query("n_cycles == 4")
    assert "No cyclical-vs-monotonic comparison" in summary_lines(frame)[1]


@pytest.mark.parametrize(("mean", "half", "signed", "text"),
                         [(-2.0, 0.025, False, "−2.000 ± 0.025"),
                          (0.5, 0.15, True, "+0.50 ± 0.15"), (1.23456, math.nan, False, "1.23")])
def test_pm_shows_two_significant_digits_of_the_ci(mean, half, signed, text):
    assert pm(mean, half, signed=signed) == text


# --- learning-rate schedule (paper Table 4) ---------------------------------------------------
def table4_study(eta_kl: float = 0.0):
    """{M 1, M 4} × {constant, cyclical_cosine} η × 3 seeds: cyclical β raises KL by 0.9 and
    lowers Rec by 0.8; cyclical η shifts KL by ``eta_kl``; seed noise sd 0.01."""
    rows = []
    for m in (1, 4):
        for lr in ("constant", "cyclical_cosine"):
            for s, e in enumerate(NOISE):
                e *= 1 + m / 4 + (0.5 if lr != "constant" else 0.0)
                kl = (0.9 if m == 4 else 0.0) + (eta_kl if lr != "constant" else 0.0) + e
                rec = (1.5 if m == 4 else 2.3) - e
                rows.append((m, 0.5, s, "completed", -(rec + kl), rec, kl, lr))
    frame = finals([r[:7] for r in rows])
    return frame.assign(lr_schedule=[r[7] for r in rows])


def test_a_study_without_an_lr_axis_has_no_table4_lines():
    assert not any("Table 4" in line for line in summary_lines(study(CLEAR)))


def test_table4_lines_separate_the_beta_effect_from_the_eta_effect():
    lines = summary_lines(table4_study())
    head = next(line for line in lines if "Table 4" in line)
    assert "R=0.5, linear, β_max=1" in head and "M=4 vs M=1, constant η" in head
    assert "KL +0.900 ± 0.019" in head and "Rec −0.800 ± 0.019" in head  # cyclical β alone
    eta = next(line for line in lines if line.startswith("cyclical_cosine η − constant η"))
    assert "with monotonic β (M=1): Rec" in eta and "KL +0.000 ± 0.012" in eta
    verdict = next(line for line in lines if line.startswith("Which schedule moves Rec, KL"))
    assert "cyclical β alone: Rec lower, KL higher" in verdict
    assert "cyclical_cosine η alone: Rec no clear difference, KL no clear difference" in verdict


def test_table4_verdict_follows_a_real_eta_effect():
    verdict = next(line for line in summary_lines(table4_study(eta_kl=0.5))
                   if line.startswith("Which schedule moves Rec, KL"))
    assert "cyclical_cosine η alone: Rec no clear difference, KL higher" in verdict


def test_table4_with_only_pruned_trials_says_too_few_seeds():
    frame = table4_study()
    frame.loc[frame["n_cycles"] == 4, "status"] = "pruned"
    lines = [line for line in summary_lines(frame) if "Table 4" in line]
    assert lines == ["Learning-rate schedule (paper Table 4): too few paired seeds for a "
                     "comparison."]


# --- pooled over ramps ------------------------------------------------------------------------
def ramps_study():
    """M {1, 2, 4} × R {0.5, 1} × ramps {linear, cosine} × 3 seeds. At R 1 cyclical raises KL
    by 0.3·M/2 and lowers Rec as much (ELBO equal); at R 0.5 nothing differs."""
    frames = []
    for ramp in ("linear", "cosine"):
        means = {}
        for m in (1, 2, 4):
            means[(m, 0.5)] = (-2.3, 2.3, 0.0)
            gain = 0.0 if m == 1 else 0.3 * m / 2
            means[(m, 1.0)] = (-2.3, 2.3 - gain, gain)
        frames.append(study(means).assign(ramp=ramp))
    return pd.concat(frames, ignore_index=True)


def test_pooled_lines_count_cells_and_name_the_best_m_at_each_r():
    lines = summary_lines(ramps_study())
    head = next(line for line in lines if line.startswith("Cyclical vs monotonic at each M"))
    assert "pooled over ramps (6 pairs per cell" in head and "same seed, ramp and R" in head
    assert "of 4 (M, R) cells, Rec lower in 2, KL higher in 2, ELBO lower in 0" in head
    best = next(line for line in lines if line.startswith("The M with the largest pooled KL"))
    assert "R=0.5: M=" in best and "R=1: M=4 (KL +0.6" in best


def test_one_ramp_means_nothing_to_pool():
    assert not any("pooled" in line for line in summary_lines(study(CLEAR)))
