"""Which M, R and ramp make the toy VAE use z? Shares of trials over a finished toy grid study.

Reads a study directory of the §4 toy problem (``examples/paper_toy.yaml`` run with
``klstudy run``) and counts, over its completed trials, those that "use z": final validation KL
of at least ``--kl-threshold`` nats (0.1, as in ``bench/toy_curve.py``). Prints (and writes with
``--out``) markdown tables with Wilson 95% intervals:

- per (M, R), pooled over ramps and seeds: trials using z, mean KL and mean Rec;
- per ramp and M, pooled over R and seeds;
- monotonic (M = 1) against cyclical (M > 1) with Fisher's exact test.

Run from the repository root: ``python bench/toy_grid.py klstudy-runs/paper-toy
--out docs/results/paper_toy/uses_z.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from _common import command_line, environment_line, markdown_table, write_output
from scipy import stats
from toy_curve import wilson

from analysis import final_rows, load_study


def _uses_z(rows: pd.DataFrame, threshold: float) -> int:
    return int((rows["kl"] >= threshold).sum())


def _share_row(rows: pd.DataFrame, threshold: float) -> list[object]:
    k, n = _uses_z(rows, threshold), len(rows)
    lo, hi = wilson(k, n)
    return [f"{k}/{n}", f"[{lo:.2f}, {hi:.2f}]", f"{rows['kl'].mean():.3f}",
            f"{rows['rec'].mean():.3f}"]


def tables(done: pd.DataFrame, threshold: float) -> list[str]:
    """The three markdown tables (M × R, ramp × M, monotonic vs cyclical) over ``done``."""
    head = [f"KL ≥ {threshold}", "Wilson 95% CI", "mean KL", "mean Rec"]
    by_cell = markdown_table(
        ["M", "R", *head],
        [[m, f"{r:g}", *_share_row(g, threshold)]
         for (m, r), g in done.groupby(["n_cycles", "ratio"], sort=True)])
    by_ramp = markdown_table(
        ["ramp", "M", *head],
        [[ramp, m, *_share_row(g, threshold)]
         for (ramp, m), g in done.groupby(["ramp", "n_cycles"], sort=True)])
    mono, cyc = done[done["n_cycles"] == 1], done[done["n_cycles"] > 1]
    k_mono, k_cyc = _uses_z(mono, threshold), _uses_z(cyc, threshold)
    p = stats.fisher_exact([[k_cyc, len(cyc) - k_cyc], [k_mono, len(mono) - k_mono]]).pvalue
    family = markdown_table(
        ["family", *head],
        [["monotonic (M = 1)", *_share_row(mono, threshold)],
         ["cyclical (M > 1)", *_share_row(cyc, threshold)]])
    return ["## Per M and R (pooled over ramps and seeds)", "", by_cell, "",
            "## Per ramp and M (pooled over R and seeds)", "", by_ramp, "",
            "## Monotonic vs cyclical", "", family, "",
            f"Fisher's exact test, cyclical vs monotonic share: p = {p:.2g}."]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study_dir", type=Path)
    p.add_argument("--kl-threshold", type=float, default=0.1,
                   help="final valid KL (nats) from which a trial counts as using z")
    p.add_argument("--out", help="also write the markdown to this file")
    args = p.parse_args(argv)
    if not (args.study_dir / "study.json").is_file():
        p.error(f"study_dir: {str(args.study_dir)!r} holds no study (study.json missing)")
    finals = final_rows(load_study(args.study_dir))
    done = finals[finals["status"] == "completed"]
    if done.empty:
        p.error(f"study_dir: {str(args.study_dir)!r} has no completed trial yet")
    text = "\n".join([
        "# Toy grid: which trials use z", "",
        f"Command: `{command_line()}`  ",
        f"{len(done)} completed of {len(finals)} trials; a trial uses z when its final "
        f"validation KL ≥ {args.kl_threshold} nats.  ",
        environment_line(), "", *tables(done, args.kl_threshold), ""])
    print(text)
    write_output(args.out, text)


if __name__ == "__main__":
    main()
