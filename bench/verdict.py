"""How fast is ``analyse_trials``? A race calls it thousands of times (goal: ≤ 50 ms for 240
trials of 12 seeds). Baseline in the same run: the old report statistics on the same table
(``config_table`` + ``paired_vs_monotonic``).

Run from the repository root: ``python bench/verdict.py [--out bench/results/verdict.md]``.
Prints a table of the best and median of ``--repeats`` calls per table size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import command_line, environment_line, markdown_table, write_output  # noqa: E402

from analysis import analyse_trials, config_table, paired_vs_monotonic  # noqa: E402


def table(n_seeds: int, ms: tuple[int, ...], rs: tuple[float, ...]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(n_seeds):
        for m in ms:
            for r in rs:
                uses = m > 1 and rng.random() < 0.7
                kl = rng.uniform(0.3, 1.0) if uses else abs(rng.normal(0, 1e-3))
                rec = 2.3 - 0.9 * kl + rng.normal(0, 0.01)
                rows.append({"n_cycles": m, "ratio": r, "ramp": "linear", "beta_max": 1.0,
                             "lr_schedule": "constant", "seed": seed, "status": "completed",
                             "rec": rec, "kl": kl, "elbo": -(rec + kl), "mi": kl, "au": 1.0})
    return pd.DataFrame(rows)


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return min(times), statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rs = (0.25, 0.5, 0.75, 1.0)
    sizes = [(12, (1, 2, 4, 8, 16), rs), (5, (1, 2, 4, 8), rs), (24, (1, 2, 4, 8, 16), rs)]
    rows = []
    for n_seeds, ms, rs in sizes:
        t = table(n_seeds, ms, rs)
        best, median = timed(lambda t=t: analyse_trials(t), args.repeats)
        base_best, base_median = timed(
            lambda t=t: (config_table(t), paired_vs_monotonic(t)), args.repeats)
        rows.append([len(t), n_seeds, len(ms) * len(rs), f"{best:.1f}", f"{median:.1f}",
                     f"{base_best:.1f}", f"{best / base_best:.2f}"])
    text = "\n".join([
        "# analyse_trials speed", "", f"Command: `{command_line()}`  ", environment_line()
        + f"  \n1-min load average at the end: {os.getloadavg()[0]:.1f} (shared machine: the "
        "best of the repeats is the least disturbed).", "",
        markdown_table(["trials", "seeds", "configurations", "analyse_trials best ms",
                        "median ms", "baseline best ms (config_table + paired)",
                        "ratio (best)"], rows)])
    print(text)
    write_output(args.out, text)


if __name__ == "__main__":
    main()
