"""Does the quickstart's verdict hold on other seeds? The quickstart's two arms (read from
``examples/quickstart.yaml``: monotonic M 1 vs its cyclical M, its R, ramp, β_max, T, batch,
evaluation cadence and IW samples; the §4 toy problem) trained on many seeds, then
``analyse_trials`` on disjoint seed sets of the quickstart's size.

Each trial is the quickstart's, run in-process (no Ray) with 1 torch thread, ``--workers`` at a
time. Results are appended to ``--jsonl`` as they finish, so an interrupted run resumes where it
stopped. Prints (and writes with ``--out``) the per-arm uses-z rate over all seeds with its
exact interval, and the verdict on each disjoint seed set with its uses-z counts, sign-flip p
and the wall time its trials took.

Run from the repository root (nice it on a shared machine):
``nice -n 10 python bench/quickstart.py --seeds 0-23 --set-size 8
--jsonl bench/results/quickstart_seeds.jsonl --out bench/results/quickstart.md
--csv docs/quickstart/seeds.csv``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import command_line, environment_line, markdown_table, write_output  # noqa: E402

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"


def _quickstart() -> dict[str, Any]:
    """The quickstart's settings: its two arms and everything every trial shares."""
    import yaml

    spec = yaml.safe_load(QUICKSTART.read_text())
    sched, train = spec["schedule"], spec["train"]
    assert len(sched["ratio"]) == len(sched["ramp"]) == len(sched["beta_max"]) == 1, sched
    assert sorted(sched["n_cycles"])[0] == 1 and len(sched["n_cycles"]) == 2, sched
    return {"arms": {"monotonic": {"n_cycles": 1},
                     "cyclical": {"n_cycles": max(sched["n_cycles"])}},
            "ratio": sched["ratio"][0], "ramp": sched["ramp"][0],
            "beta_max": float(sched["beta_max"][0]), "steps": train["total_steps"],
            "batch_size": train["batch_size"], "eval_every": train["eval_every_steps"],
            "iw_samples": train["iw_samples"], "lr": train.get("lr", 1e-3)}


QS = _quickstart()
ARMS: dict[str, dict[str, Any]] = QS["arms"]
RATIO, RAMP, BETA_MAX = QS["ratio"], QS["ramp"], QS["beta_max"]


def run_trial(job: tuple[str, int, int]) -> dict[str, Any]:
    from workers import TrialConfig, train_trial

    arm, seed, total_steps = job
    config = TrialConfig(model="toy", data="toy", batch_size=QS["batch_size"],
                         total_steps=total_steps, eval_every_steps=QS["eval_every"],
                         iw_samples=QS["iw_samples"], lr=QS["lr"], seed=seed, device="cpu",
                         num_threads=1, ratio=RATIO, ramp=RAMP, beta_max=BETA_MAX,
                         trial_id=f"qs-{arm}-T{total_steps}-s{seed}", **ARMS[arm])
    start, cpu = time.perf_counter(), time.process_time()
    result = train_trial(config)
    return {"arm": arm, "n_cycles": ARMS[arm]["n_cycles"], "seed": seed, "T": total_steps, "wall_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu, "load_1min": os.getloadavg()[0],
            **{k: float(v) for k, v in result.final.items()}}


def _ours(record: dict[str, Any], steps: int) -> bool:
    """A record of this quickstart's arms at T = steps (earlier settings stay in the jsonl)."""
    return (record["T"] == steps
            and record.get("n_cycles") == ARMS[record["arm"]]["n_cycles"])


def _md(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no complete seed set yet)"
    return markdown_table(list(rows[0]), [list(r.values()) for r in rows])


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _done(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verdict_rows(records: list[dict[str, Any]], steps: int, set_size: int,
                 threshold: float) -> list[dict[str, Any]]:
    import pandas as pd

    from analysis import analyse_trials

    trials = pd.DataFrame([{"n_cycles": ARMS[r["arm"]]["n_cycles"], "ratio": RATIO,
                            "ramp": RAMP, "beta_max": BETA_MAX, "seed": r["seed"],
                            "rec": r["rec"], "kl": r["kl"], "elbo": r["elbo"],
                            "wall_s": r["wall_s"]} for r in records if _ours(r, steps)])
    complete = sorted(s for s, g in trials.groupby("seed") if len(g) == len(ARMS))
    rows = []
    for i in range(len(complete) // set_size):
        seeds = complete[i * set_size:(i + 1) * set_size]
        subset = trials[trials["seed"].isin(seeds)]
        a = analyse_trials(subset.drop(columns="wall_s"), kl_threshold=threshold)
        rows.append({"seeds": f"{seeds[0]}–{seeds[-1]}", "verdict": a.verdict,
                     "cyclical uses z": "{}/{}".format(*a.uses_z["cyclical"]),
                     "monotonic uses z": "{}/{}".format(*a.uses_z["monotonic"]),
                     "sign-flip p": f"{a.primary['p']:.3g}",
                     "trial wall s (sum)": f"{subset['wall_s'].sum():.0f}",
                     "trial wall s (mean)": f"{subset['wall_s'].mean():.0f}"})
    return rows


def rate_rows(records: list[dict[str, Any]], steps: int, threshold: float
              ) -> list[dict[str, Any]]:
    from statsmodels.stats.proportion import proportion_confint

    rows = []
    for arm in ARMS:
        rs = [r for r in records if _ours(r, steps) and r["arm"] == arm]
        if not rs:
            continue
        k = sum(r["kl"] >= threshold for r in rs)
        lo, hi = proportion_confint(k, len(rs), method="beta")
        rows.append({"arm": f"{arm} (M={ARMS[arm]['n_cycles']}, R={RATIO})", "T": steps,
                     "seeds using z": f"{k}/{len(rs)}", "exact 95% CI": f"[{lo:.2f}, {hi:.2f}]",
                     "mean KL": f"{sum(r['kl'] for r in rs) / len(rs):.3f}",
                     "wall s / trial": f"{sum(r['wall_s'] for r in rs) / len(rs):.0f}",
                     "load (1 min) at end": f"{max(r['load_1min'] for r in rs):.1f}"})
    return rows


def write_table(records: list[dict[str, Any]], steps: int, path: Path) -> None:
    import pandas as pd

    rows = [{"n_cycles": ARMS[r["arm"]]["n_cycles"], "ratio": RATIO, "ramp": RAMP,
             "beta_max": BETA_MAX, "seed": r["seed"], "total_steps": r["T"], "status": "completed",
             **{k: r.get(k) for k in ("rec", "kl", "elbo", "mi", "au", "iw_nll", "ppl")},
             "wall_s": round(r["wall_s"], 1), "load_1min": round(r["load_1min"], 2)}
            for r in records if _ours(r, steps)]
    frame = pd.DataFrame(rows).sort_values(["seed", "n_cycles"])
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.6g")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=QS["steps"],
                   help="T of every trial (default: the quickstart's)")
    p.add_argument("--seeds", default="0-23", help="seeds, e.g. 0-23 or 0-7,100-107")
    p.add_argument("--set-size", type=int, default=8, help="seeds per disjoint verdict set")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--arms", default="monotonic,cyclical",
                   help="which arms to train (default both; the tables need both per seed)")
    p.add_argument("--kl-threshold", type=float, default=0.1)
    p.add_argument("--jsonl", type=Path, default=Path("bench/results/quickstart_seeds.jsonl"))
    p.add_argument("--out", help="also write the markdown tables here")
    p.add_argument("--report-only", action="store_true", help="train nothing, tabulate")
    p.add_argument("--csv", type=Path, default=None,
                   help="also write one row per trial here (the klstudy report --results "
                        "format; docs/quickstart/seeds.csv)")
    args = p.parse_args(argv)
    records = _done(args.jsonl)
    have = {(r["arm"], r["seed"], r["T"]) for r in records if _ours(r, r["T"])}
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        p.error(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    jobs = [(arm, s, args.steps) for s in _seeds(args.seeds) for arm in arms
            if (arm, s, args.steps) not in have]
    started = time.perf_counter()
    if jobs and not args.report_only:
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool, \
                args.jsonl.open("a") as sink:
            for r in pool.imap(run_trial, jobs):
                records.append(r)
                sink.write(json.dumps(r) + "\n")
                sink.flush()
                print(f"{r['arm']} seed {r['seed']}: kl {r['kl']:.3f} ({r['wall_s']:.0f} s)",
                      file=sys.stderr, flush=True)
    wanted = set(_seeds(args.seeds))
    records = [r for r in records if r["seed"] in wanted]
    if args.csv is not None:
        write_table(records, args.steps, args.csv)
    lines = ["# Quickstart verdict on disjoint seed sets", "",
             f"Command: `{command_line()}`  ", environment_line() + "  ",
             f"This invocation: {time.perf_counter() - started:.0f} s wall for {len(jobs)} "
             "new trials.", "", "## Uses-z rate per arm (all seeds)", "",
             _md(rate_rows(records, args.steps, args.kl_threshold)), "",
             f"## Verdict on disjoint sets of {args.set_size} seeds (analyse_trials)", "",
             _md(verdict_rows(records, args.steps, args.set_size, args.kl_threshold))]
    print("\n".join(lines))
    write_output(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
