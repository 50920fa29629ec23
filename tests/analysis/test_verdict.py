"""analyse_trials on constructed tables whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from analysis import VERDICTS, ReportError, analyse_trials, read_results
from analysis._signflip import max_t_vs_best, min_seeds_to_reject, sign_flip_test


def _trial(m: int, seed: int, kl: float, *, ratio: float = 0.5, rec: float | None = None,
           **extra: object) -> dict:
    rec = 2.3 - 0.8 * kl if rec is None else rec
    return {"n_cycles": m, "ratio": ratio, "ramp": "linear", "beta_max": 1.0, "seed": seed,
            "rec": rec, "kl": kl, "elbo": -(rec + kl), **extra}


def _two_arms(n_seeds: int, *, cyc_uses: bool = True, mono_uses: bool = False,
              noise: float = 1e-3) -> pd.DataFrame:
    """One cyclical (M 4) and one monotonic configuration (M 1), R 0.5, one trial per seed."""
    rng = np.random.default_rng(n_seeds)
    rows = []
    for s in range(n_seeds):
        for m, uses in ((1, mono_uses), (4, cyc_uses)):
            kl = rng.uniform(0.4, 0.9) if uses else abs(rng.normal(0, noise))
            rows.append(_trial(m, s, kl, mi=kl - 0.05 if uses else (-0.05 if s % 2 else 0.03),
                               au=float(uses)))
    return pd.DataFrame(rows)


def test_clear_effect_with_8_seeds_is_cyclical_better():
    a = analyse_trials(_two_arms(8))
    assert a.verdict == "cyclical_better"
    assert a.uses_z == {"cyclical": [8, 8], "monotonic": [0, 8]}
    assert a.primary["n_seeds"] == 8 and a.primary["estimate"] == 1.0
    assert a.primary["p"] == pytest.approx(2 / 2 ** 8)
    assert a.summary[0].startswith("Cyclical (M > 1) used z in 8 of 8 seeds, monotonic (M = 1) "
                                   "in 0 of 8")


def test_three_seeds_cannot_reject_and_say_how_many_are_needed():
    a = analyse_trials(_two_arms(3))
    assert a.verdict == "no_difference_shown"
    assert a.primary["p"] == pytest.approx(0.25)
    assert a.primary["min_seeds_to_reject"] == 6
    first = a.summary[0]
    assert first.startswith("Cyclical (M > 1) used z in 3 of 3 seeds, monotonic (M = 1) in 0 "
                            "of 3")
    assert "run at least 6" in first


def test_reversed_effect_is_monotonic_better():
    a = analyse_trials(_two_arms(7, cyc_uses=False, mono_uses=True))
    assert a.verdict == "monotonic_better"
    assert a.primary["estimate"] == -1.0


def test_null_makes_no_claim_and_the_secondary_family_stays_gated():
    """Both arms use z in the same seeds: every per-seed difference is 0."""
    rows = []
    for s in range(10):
        uses = s % 2 == 0
        for m in (1, 2, 4):
            rows.append(_trial(m, s, 0.6 + 0.01 * m if uses else 0.0005 * m))
    a = analyse_trials(pd.DataFrame(rows))
    assert a.verdict == "no_difference_shown"
    assert a.primary["p"] == 1.0
    secondary = [t for t in a.tests if t["family"] == "secondary"]
    assert secondary and not any(t["rejected"] for t in secondary)
    assert all(t["p_adj"] >= a.primary["p"] for t in secondary)
    assert "not claimed" in a.summary[2]


def test_secondary_is_holm_adjusted_when_the_primary_rejects():
    a = analyse_trials(_two_arms(8))
    secondary = [t for t in a.tests if t["family"] == "secondary"]
    raw = np.array([t["p_raw"] for t in secondary])
    holm = multipletests(raw, method="holm")[1]
    expected = np.maximum(holm, a.primary["p"])
    assert [t["p_adj"] for t in secondary] == pytest.approx(list(expected))
    by_claim = {t.get("claim"): t for t in secondary}
    assert by_claim["Rec lower"]["rejected"] and by_claim["Rec lower"]["statistic"] < 0
    assert by_claim["KL higher"]["rejected"]
    assert by_claim["ELBO equivalent"]["method"].startswith("TOST")


def test_secondary_rec_effect_is_not_claimed_behind_an_unrejected_primary():
    """3 seeds, Rec clearly lower: the raw p is small but the gate keeps it unclaimed."""
    a = analyse_trials(_two_arms(3))
    rec = next(t for t in a.tests if t.get("claim") == "Rec lower")
    assert rec["p_adj"] >= a.primary["p"] > 0.05
    assert not rec["rejected"]


def test_elbo_equivalence_uses_the_margin_option():
    rows = []
    rng = np.random.default_rng(3)
    for s in range(8):
        for m in (1, 4):
            kl = 0.5 if m == 4 else 0.001
            rec = 2.3 - kl + rng.normal(0, 0.002)
            rows.append(_trial(m, s, kl, rec=rec))
    table = pd.DataFrame(rows)
    wide = analyse_trials(table, elbo_margin=0.05)
    narrow = analyse_trials(table, elbo_margin=0.0001)
    eq_wide, eq_narrow = (next(t for t in a.tests if t.get("claim") == "ELBO equivalent")
                          for a in (wide, narrow))
    assert eq_wide["rejected"] and eq_wide["margin"] == 0.05
    assert not eq_narrow["rejected"]


def test_every_test_records_what_was_done():
    a = analyse_trials(_two_arms(8))
    assert {t["family"] for t in a.tests} == {"primary", "secondary", "best_set"}
    for t in a.tests:
        assert set(t) >= {"name", "family", "method", "n", "statistic", "p_raw", "p_adj"}
        assert t["n"] >= 1 and 0.0 <= t["p_raw"] <= 1.0


def test_best_set_keeps_only_what_the_seeds_cannot_separate():
    rng = np.random.default_rng(0)
    rows = []
    for s in range(8):
        for m in (1, 2, 4):
            for r in (0.25, 0.5):
                rec = 1.0 if (m, r) == (4, 0.5) else 2.0
                rows.append(_trial(m, s, 0.5, ratio=r, rec=rec + rng.normal(0, 0.01)))
    a = analyse_trials(pd.DataFrame(rows))
    assert [(b["n_cycles"], b["ratio"]) for b in a.best_set] == [(4, 0.5)]
    # Two configurations equal up to noise: both stay.
    tied = pd.DataFrame(rows).assign(rec=lambda d: np.where(
        (d["n_cycles"] == 2) & (d["ratio"] == 0.5), d["rec"] - 1.0, d["rec"]))
    b = analyse_trials(tied)
    assert {(x["n_cycles"], x["ratio"]) for x in b.best_set} == {(4, 0.5), (2, 0.5)}
    assert sum(c["in_best_set"] for c in b.cells) == 2


def test_intervals_stay_inside_their_bounds():
    table = _two_arms(6, noise=0.05)
    assert (table["mi"] < 0).any()  # the raw MI estimate goes below 0 on collapsed trials
    a = analyse_trials(table, latent_dim=1)
    for cell in a.cells:
        share = cell["uses_z"]
        assert 0.0 <= share["ci_low"] <= share["share"] <= share["ci_high"] <= 1.0
        for metric in ("kl", "mi", "au"):
            entry = cell["metrics"][metric]
            assert 0.0 <= entry["ci_low"] <= entry["mean"] <= entry["ci_high"]
        assert cell["metrics"]["au"]["ci_high"] <= 1.0


def test_fewer_than_three_values_give_the_values_and_no_interval():
    a = analyse_trials(_two_arms(2))
    kl = a.cells[0]["metrics"]["kl"]
    assert kl["ci_low"] is None and kl["ci_high"] is None
    assert len(kl["values"]) == 2 and kl["method"] == "values"


def test_deterministic_and_json_ready():
    table = _two_arms(8)
    first, second = analyse_trials(table).to_json(), analyse_trials(table).to_json()
    assert first == second
    text = json.dumps(first, allow_nan=False)
    assert json.loads(text)["verdict"] in VERDICTS
    assert set(first) >= {"verdict", "uses_z", "best_set", "cells", "tests", "primary"}


def test_pruned_trials_are_counted_not_used():
    table = _two_arms(8)
    table["status"] = "completed"
    table.loc[(table["n_cycles"] == 4) & (table["seed"] < 2), "status"] = "pruned"
    a = analyse_trials(table)
    assert a.uses_z["cyclical"] == [6, 6]
    cyc = next(c for c in a.cells if c["n_cycles"] == 4)
    assert cyc["n"] == 8 and cyc["n_pruned"] == 2 and cyc["n_completed"] == 6


@pytest.mark.parametrize(("alpha", "n"), [(0.05, 6), (0.01, 8), (0.1, 5)])
def test_min_seeds_to_reject(alpha, n):
    assert min_seeds_to_reject(alpha) == n
    assert sign_flip_test(np.ones(n))[1] <= alpha < sign_flip_test(np.ones(n - 1))[1]


def test_sign_flip_matches_scipy_exact_permutation_test():
    d = np.array([0.3, -0.1, 0.5, 0.2, 0.25, -0.05, 0.4])
    ours = sign_flip_test(d)[1]
    ref = stats.permutation_test((d,), np.mean, permutation_type="samples",
                                 n_resamples=np.inf, alternative="two-sided").pvalue
    assert ours == pytest.approx(ref)


def test_max_t_adjusted_p_is_at_least_the_single_comparison_p():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.1, 0.2, size=(5, 8))
    mask = np.ones_like(diffs, dtype=bool)
    t, p_adj = max_t_vs_best(diffs, mask)
    for i in range(5):
        _, p_one = max_t_vs_best(diffs[i:i + 1], mask[i:i + 1])
        assert p_adj[i] >= p_one[0] - 1e-12


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.drop(columns="kl"), "missing column(s) kl"),
    (lambda d: d.assign(ratio=[0.5] * 5 + [1.5] + [0.5] * 10), "ratio, row 5: must be in [0, 1]"),
    (lambda d: d.assign(ramp=["linear"] * 3 + ["zigzag"] + ["linear"] * 12), "ramp, row 3"),
    (lambda d: d.assign(kl=["0.1"] * 15 + ["lots"]), "kl, row 15: not a number"),
    (lambda d: d.assign(seed=0), "a second trial with the same configuration and seed"),
])
def test_malformed_tables_name_the_column_and_row(change, message):
    with pytest.raises(ReportError, match=None) as err:
        analyse_trials(change(_two_arms(8)))
    assert message in str(err.value)


def test_csv_errors_give_the_file_line(tmp_path):
    table = _two_arms(8)
    table.loc[4, "ratio"] = 2.0
    path = tmp_path / "trials.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ReportError) as err:
        read_results(path)
    assert "trials.csv: ratio, line 6: must be in [0, 1], got 2.0" in str(err.value)
    with pytest.raises(ReportError, match="must be .csv or .parquet"):
        read_results(tmp_path.joinpath("x.txt").write_text("a") and tmp_path / "x.txt")


@pytest.mark.parametrize("change", [
    lambda d: d[d["n_cycles"] == 4],  # no monotonic arm
    lambda d: d.assign(status="pruned"),  # nothing completed
    lambda d: d.assign(ratio=0.0),  # constant β only: no cyclical schedule
])
def test_nothing_to_compare_says_so(change):
    a = analyse_trials(change(_two_arms(6)))
    assert a.verdict == "no_difference_shown" and a.primary["n_seeds"] == 0
    assert "cannot show a difference" in a.summary[0] and "; )" not in a.summary[0]
    json.dumps(a.to_json(), allow_nan=False)
