"""Does monotonic β collapse, does cyclical avoid it? The answer of one example study.

    python examples/custom_vae/answer.py STUDY_DIR --table TABLE.csv   # write the table, answer
    python examples/custom_vae/answer.py --table TABLE.csv             # answer from the table

The table holds one row per trial: its final test metrics (the split Table 1 of the paper
reports) and its final valid KL. A seed "uses z" when its final test KL is at least 0.1 nats
(klstudy's default threshold, DESIGN §5); shares get exact (Clopper–Pearson) 95% intervals.
Cyclical (M > 1) − monotonic (M = 1) differences are paired by seed (the seed fixes the
initialisation and data order of both), with a t interval over the seeds.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

USES_Z_NATS = 0.1
METRICS = ("rec", "kl", "elbo", "mi", "au", "iw_nll")


def final_table(study_dir: Path) -> pd.DataFrame:
    """One row per trial: configuration, final test metrics, final valid KL."""
    evaluations = pd.read_parquet(study_dir / "evaluations")
    final = evaluations[evaluations["final"]]
    test = final[final["split"] == "test"].set_index("trial_id")
    valid = final[final["split"] == "valid"].set_index("trial_id")
    table = test[["n_cycles", "ratio", "beta_max", "seed", "total_steps", *METRICS]].copy()
    table["valid_kl"] = valid["kl"]
    return table.reset_index().sort_values(["n_cycles", "seed"])


def _share(k: int, n: int) -> str:
    lo, hi = proportion_confint(k, n, alpha=0.05, method="beta")
    return f"{k} of {n} seeds (95% CI {lo:.2f}–{hi:.2f})"


def _paired(diffs: pd.Series) -> str:
    n, mean = len(diffs), float(diffs.mean())
    values = ", ".join(f"{v:+.2f}" for v in diffs)
    if n < 3:
        return f"{mean:+.2f} (values {values}; under 3 seeds: no interval)"
    half = float(stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    return f"{mean:+.2f} ± {half:.2f} (paired t, p = {p:.2g}; per seed {values})"


def answer(table: pd.DataFrame) -> str:
    lines = []
    for m, arm in table.groupby("n_cycles"):
        name = "monotonic" if m == 1 else f"cyclical M {m}"
        k = int((arm["kl"] >= USES_Z_NATS).sum())
        lines.append(f"{name}: uses z in {_share(k, len(arm))}; final test KL "
                     f"{arm['kl'].min():.2f}–{arm['kl'].max():.2f}, Rec "
                     f"{arm['rec'].min():.2f}–{arm['rec'].max():.2f}, ELBO "
                     f"{arm['elbo'].min():.2f}–{arm['elbo'].max():.2f}")
    mono = table[table["n_cycles"] == 1].set_index("seed")
    for m, arm in table[table["n_cycles"] > 1].groupby("n_cycles"):
        arm = arm.set_index("seed")
        seeds = sorted(set(arm.index) & set(mono.index))
        for metric in ("rec", "kl", "elbo"):
            diffs = arm.loc[seeds, metric] - mono.loc[seeds, metric]
            lines.append(f"M {m} − M 1, test {metric}: {_paired(diffs)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path, nargs="?", help="a finished study directory")
    parser.add_argument("--table", type=Path, required=True, help="the per-trial CSV")
    args = parser.parse_args()
    if args.study_dir is not None:
        final_table(args.study_dir).to_csv(args.table, index=False, float_format="%.6g")
    print(answer(pd.read_csv(args.table)))


if __name__ == "__main__":
    main()
