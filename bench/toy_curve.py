"""Where does the paper's toy effect appear? Share of seeds whose VAE uses z, against T.

The §4 toy problem (ten length-10 one-hot sequences, 2-layer LSTM VAE, z ∈ R², batch 10) is
trained for several budgets T with the monotonic schedule (M = 1, R = 0.25) and the cyclical one
(M = 4, R = 0.5), ``--seeds`` seeds each, every other setting TrialConfig's default. A trial
"uses z" when its final validation KL is at least ``--kl-threshold`` nats (0.1: a tenth of the
log 10 = 2.3 nats the latent could carry; collapsed runs end at KL ≤ 0.04).

Prints (and writes with ``--out``) a markdown table — per T and arm, the share of seeds using z
with its Wilson 95% interval, mean KL and the mean trial CPU time — and with ``--png`` the curve.
``examples/paper_toy.yaml`` takes its T from this curve.

Run from the repository root: ``python bench/toy_curve.py --out docs/results/paper_toy/curve.md
--png docs/results/paper_toy/curve.png``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from typing import Any

from _common import command_line, environment_line, markdown_table, write_output

ARMS: dict[str, dict[str, Any]] = {
    "monotonic": {"n_cycles": 1, "ratio": 0.25},
    "cyclical": {"n_cycles": 4, "ratio": 0.5},
}


def run_trial(job: tuple[str, int, int]) -> dict[str, Any]:
    """Train one (arm, seed, T) trial; returns its final validation metrics and times."""
    from workers import TrialConfig, train_trial

    arm, seed, total_steps = job
    config = TrialConfig(
        model="toy", data="toy", batch_size=10, total_steps=total_steps,
        eval_every_steps=max(1, total_steps // 10), iw_samples=0,
        seed=seed, device="cpu", num_threads=1, trial_id=f"{arm}-T{total_steps}-s{seed}",
        **ARMS[arm],
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    result = train_trial(config)
    return {"arm": arm, "seed": seed, "T": total_steps, "wall_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu_start, **result.final}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial share k/n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(results: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    rows = []
    for t in sorted({r["T"] for r in results}):
        for arm in ARMS:
            rs = [r for r in results if r["T"] == t and r["arm"] == arm]
            if not rs:
                continue
            k = sum(r["kl"] >= threshold for r in rs)
            lo, hi = wilson(k, len(rs))
            rows.append({"T": t, "arm": arm, "k": k, "n": len(rs), "lo": lo, "hi": hi,
                         "kl": sum(r["kl"] for r in rs) / len(rs),
                         "rec": sum(r["rec"] for r in rs) / len(rs),
                         "cpu_s": sum(r["cpu_s"] for r in rs) / len(rs)})
    return rows


def plot(rows: list[dict[str, Any]], path: str, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for arm, colour in (("cyclical", "tab:blue"), ("monotonic", "tab:red")):
        rs = [r for r in rows if r["arm"] == arm]
        xs = [r["T"] for r in rs]
        ys = [r["k"] / r["n"] for r in rs]
        err = [[y - r["lo"] for y, r in zip(ys, rs, strict=True)],
               [r["hi"] - y for y, r in zip(ys, rs, strict=True)]]
        label = f"{arm} (M={ARMS[arm]['n_cycles']}, R={ARMS[arm]['ratio']})"
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colour, label=label)
    ax.set_xlabel("T (optimizer steps per trial)")
    ax.set_ylabel(f"share of seeds with KL ≥ {threshold}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Toy problem: when does the VAE use z? (Wilson 95% CI)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="2500,5000,7500,10000,15000",
                   help="comma-separated budgets T (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per arm and T (0 … N-1)")
    p.add_argument("--workers", type=int, default=2, help="trials run in parallel")
    p.add_argument("--kl-threshold", type=float, default=0.1,
                   help="final valid KL (nats) from which a trial counts as using z")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--png", help="also draw the curve into this PNG")
    args = p.parse_args(argv)
    try:
        args.steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        p.error(f"--steps: must be comma-separated integers, got {args.steps!r}")
    if any(t < 10 for t in args.steps):
        p.error(f"--steps: every T must be at least 10, got {args.steps}")
    for name in ("seeds", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    # Largest T first so the pool's tail is made of short trials.
    jobs = [(arm, seed, t) for t in sorted(args.steps, reverse=True)
            for seed in range(args.seeds) for arm in ARMS]
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    results = []
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for r in pool.imap_unordered(run_trial, jobs):
            results.append(r)
            print(f"[{len(results)}/{len(jobs)}] T={r['T']} {r['arm']} seed {r['seed']}: "
                  f"kl {r['kl']:.3f} rec {r['rec']:.3f} ({r['cpu_s']:.0f} CPU-s)",
                  file=sys.stderr, flush=True)
    wall = time.perf_counter() - started
    rows = summarise(results, args.kl_threshold)
    table = markdown_table(
        ["T", "arm", f"seeds with KL ≥ {args.kl_threshold}", "Wilson 95% CI", "mean KL",
         "mean Rec", "CPU-s / trial"],
        [[r["T"], r["arm"], f"{r['k']}/{r['n']}", f"[{r['lo']:.2f}, {r['hi']:.2f}]",
          f"{r['kl']:.3f}", f"{r['rec']:.3f}", f"{r['cpu_s']:.0f}"] for r in rows])
    per_seed = markdown_table(
        ["T", "arm", "seed", "KL", "Rec", "ELBO", "AU", "MI"],
        [[r["T"], r["arm"], r["seed"], f"{r['kl']:.3f}", f"{r['rec']:.3f}", f"{r['elbo']:.3f}",
          f"{r['au']:.0f}", f"{r['mi']:.3f}"]
         for r in sorted(results, key=lambda r: (r["T"], r["arm"], r["seed"]))])
    report = "\n".join([
        "# Toy problem: share of seeds that use z, against T",
        "",
        f"Command: `{command_line()}`  ",
        f"Seeds 0–{args.seeds - 1} per arm and T, {args.workers} trials in parallel with 1 torch "
        f"thread each; final validation metrics; a trial uses z when KL ≥ {args.kl_threshold}.  ",
        f"Wall time: {wall:.0f} s ({wall / 60:.1f} min) for {len(jobs)} trials; 1-min load "
        f"average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.  ",
        environment_line(),
        "",
        table,
        "",
        "## Per seed",
        "",
        per_seed,
    ])
    print(report)
    write_output(args.out, report)
    if args.png:
        plot(rows, args.png, args.kl_threshold)


if __name__ == "__main__":
    main()
