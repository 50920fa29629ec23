"""Racing over seeds vs the full grid and vs pruners, replayed over finished grids (issue 19).

    python bench/racing.py --out bench/results/racing.md
    python bench/racing.py --export-grid /work/runs/racing-toy10 bench/data/racing_toy10.csv

Grids (one row per trial: configuration keys, seed, final valid rec, kl, elbo):
- ``paper-toy``: the 240-trial toy grid (48 configurations x 5 seeds), from
  docs/results/paper_toy/trials.csv when committed, else the study dir /work/runs/paper-toy;
- ``toy10``: bench/data/racing_toy10.csv, M {1, 2, 4, 8} x 10 seeds at T = 5,000
  (bench/specs/racing_toy10.yaml);
- ``toy20``: bench/data/racing_toy20.csv, the same at 20 seeds (bench/specs/racing_toy20.yaml;
  its seeds 0-9 are toy10's trials, run again);
- ``synthetic effect`` / ``synthetic null``: 48 configurations x 12 seeds, bimodal uses-z
  outcomes with a per-seed effect (``synthetic_grid``), one fresh grid per replica.

Real grids are replayed under random seed orders (the full grid's answer does not depend on the
order; the race's does). For each replica: the full grid's answer (``analyse_trials`` on every
trial, alpha 0.05), the race's (``study._race``), and two peers run through Optuna with the
configurations as trials and the seeds as steps: ``WilcoxonPruner`` (seeds as its instances)
and the default ``MedianPruner`` (running mean over seeds). A peer's best set is the analysis of
the configurations it did not prune; its verdict the analysis of every trial it ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, command_line, environment_line, markdown_table, write_output

from study._race import Race, RaceSettings, analyse_trials

KEYS = ["n_cycles", "ratio", "ramp", "beta_max"]
_NULL = "no_difference_shown"
STRICT = 0.005  # the race's drop_alpha in its second row: drops before max_seeds at 0.5%


# --- grids -----------------------------------------------------------------------------------
def load_grid(source: str | Path) -> pd.DataFrame:
    """A per-trial table (CSV / Parquet) or a study directory, as the race's input columns."""
    path = Path(source)
    if path.is_dir():
        import analysis

        df = analysis.final_rows(analysis.load_study(path))
    elif path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path)
    if "status" in df.columns:
        df = df[df["status"].fillna("completed") == "completed"]
    return df[[*KEYS, "seed", "rec", "kl", "elbo"]].reset_index(drop=True)


def synthetic_grid(rng: np.random.Generator, *, effect: bool, n_seeds: int = 12,
                   seed_sd: float = 1.0) -> pd.DataFrame:
    """48 toy-like configurations x ``n_seeds``: a trial uses z with probability
    sigmoid(logit(p_config) + seed_sd * u_seed) (u_seed ~ N(0, 1): some seeds are easy for every
    configuration); then KL ~ U(0.2, 0.8) and rec = 2.305 - 0.55 KL + noise, else KL ~ 1e-4 and
    rec = 2.305 + noise. ``effect``: p rises with M (linear ramps most), 0 at M = 1; null:
    p = 0.2 for every configuration, M = 1 included."""
    rows = []
    u = rng.normal(size=n_seeds)
    for m in (1, 2, 4, 8):
        for r in (0.25, 0.5, 0.75, 1.0):
            for ramp in ("linear", "sigmoid", "cosine"):
                p = _p_effect(m, r, ramp) if effect else 0.2
                for s in range(n_seeds):
                    logit = np.log(max(p, 1e-6) / max(1 - p, 1e-6)) + seed_sd * u[s]
                    uses = p > 0 and rng.random() < 1 / (1 + np.exp(-logit))
                    kl = rng.uniform(0.2, 0.8) if uses else abs(rng.normal(1e-4, 1e-4))
                    rec = 2.305 - 0.55 * kl + rng.normal(0, 0.02 if uses else 0.003)
                    rows.append({"n_cycles": m, "ratio": r, "ramp": ramp, "beta_max": 1.0,
                                 "seed": s, "rec": rec, "kl": kl, "elbo": -(rec + kl)})
    return pd.DataFrame(rows)


def _p_effect(m: int, r: float, ramp: str) -> float:
    if m == 1:
        return 0.0
    base = {2: 0.03, 4: 0.35, 8: 0.8}[m] * (1.0 - 0.4 * (r - 0.25))
    return base * {"linear": 1.0, "cosine": 0.4, "sigmoid": 0.1}[ramp]


# --- the methods ---------------------------------------------------------------------------
def configs_of(grid: pd.DataFrame) -> list[dict[str, Any]]:
    return grid[KEYS].drop_duplicates().to_dict("records")


def as_set(best: Sequence[dict[str, Any]]) -> frozenset:
    return frozenset(tuple(b[k] for k in KEYS) for b in best)


def full_answer(grid: pd.DataFrame) -> tuple[str, frozenset, tuple]:
    a = analyse_trials(grid)
    best = as_set(a.best_set)
    # the best configuration itself: the entry flagged "best" (analysis.analyse_trials)
    top = next((b for b in a.best_set if b.get("best")), a.best_set[0] if a.best_set else None)
    return a.verdict, best, tuple(top[k] for k in KEYS) if top is not None else ()


def run_race(grid: pd.DataFrame, seeds: list[int], settings: RaceSettings) -> dict[str, Any]:
    race = Race(configs_of(grid), seeds, settings)
    state = race.replay(grid)
    assert state.done, "a replay over a finished grid always ends"
    best = frozenset(state.candidates)
    return {"trials": state.trials_used, "verdict": state.final_verdict(), "best": best,
            "rounds": state.round}


def run_pruner(grid: pd.DataFrame, seeds: list[int], kind: str) -> dict[str, Any]:
    """Configurations as Optuna trials, in grid order; step i = the i-th seed of ``seeds``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    pruner = (optuna.pruners.WilcoxonPruner(p_threshold=0.1) if kind == "wilcoxon"
              else optuna.pruners.MedianPruner())
    study = optuna.create_study(direction="minimize", pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    by = grid.set_index([*KEYS, "seed"])["rec"]
    ran, kept = [], []
    for c in configs_of(grid):
        trial = study.ask()
        key = tuple(c[k] for k in KEYS)
        values = []
        pruned = False
        for i, s in enumerate(seeds):
            v = float(by.loc[(*key, s)])
            values.append(v)
            ran.append((*key, s))
            trial.report(v if kind == "wilcoxon" else float(np.mean(values)), step=i)
            if trial.should_prune():
                pruned = True
                break
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, float(np.mean(values)))
            kept.append(key)
    idx = pd.MultiIndex.from_tuples(ran, names=[*KEYS, "seed"])
    used = grid.set_index([*KEYS, "seed"]).loc[idx].reset_index()
    verdict = analyse_trials(used).verdict
    kept_rows = used[[tuple(r) in set(kept) for r in used[KEYS].itertuples(index=False)]]
    best = as_set(analyse_trials(kept_rows).best_set) if len(kept_rows) else frozenset()
    return {"trials": len(ran), "verdict": verdict, "best": best}


def _full_again(grid: pd.DataFrame) -> dict[str, Any]:
    verdict, best, _ = full_answer(grid)
    return {"trials": len(grid), "verdict": verdict, "best": best}


def replicate(job: tuple[str, int, dict[str, Any]]) -> dict[str, Any]:
    """One replica: a grid (drawn or permuted), the full answer, the race and the peers."""
    name, index, opts = job
    rng = np.random.default_rng([index, sum(map(ord, name))])  # hash() varies per process
    if opts.get("synthetic"):
        grid = synthetic_grid(rng, effect=opts["effect"], n_seeds=opts.get("n_seeds", 12))
    else:
        grid = opts["grid"]
    seeds = sorted(grid["seed"].unique().tolist())
    order = seeds if index == 0 else list(rng.permutation(seeds))
    verdict, best, best_one = full_answer(grid)
    settings = RaceSettings(min_seeds=opts["min_seeds"], max_seeds=len(seeds),
                            seeds_per_round=opts.get("seeds_per_round", 1))
    out: dict[str, Any] = {"grid": name, "replica": index, "full_trials": len(grid),
                           "full_verdict": verdict}
    strict = dataclasses.replace(settings, drop_alpha=STRICT)
    methods = {"race": lambda: run_race(grid, order, settings),
               f"race, drop_alpha {STRICT}": lambda: run_race(grid, order, strict)}
    if opts.get("synthetic"):  # the same truth, fresh seeds: how reproducible is the answer?
        again = np.random.default_rng([index, sum(map(ord, name)), 1])
        methods["full grid, new seeds"] = lambda: _full_again(
            synthetic_grid(again, effect=opts["effect"], n_seeds=opts.get("n_seeds", 12)))
    if opts.get("peers", True):
        methods["wilcoxon"] = lambda: run_pruner(grid, order, "wilcoxon")
        methods["median"] = lambda: run_pruner(grid, order, "median")
    for method, fn in methods.items():
        t0 = time.perf_counter()
        r = fn()
        out[method] = {"trials": r["trials"], "same_verdict": r["verdict"] == verdict,
                       "false_claim": r["verdict"] != _NULL and verdict == _NULL,
                       "claim": r["verdict"] != _NULL,
                       "same_best": r["best"] == best, "best_kept": best_one in r["best"],
                       "subset": r["best"] <= best,
                       "size": len(r["best"]) / max(1, len(best)),
                       "s": time.perf_counter() - t0}
    return out


# --- report ----------------------------------------------------------------------------------
def summarise(results: list[dict[str, Any]], null_grids: set[str]) -> str:
    rows = []
    for grid in dict.fromkeys(r["grid"] for r in results):
        rs = [r for r in results if r["grid"] == grid]
        full = rs[0]["full_trials"]
        verdicts = pd.Series([r["full_verdict"] for r in rs]).value_counts().to_dict()
        rows.append([grid, "full grid", len(rs), f"{full} (1.00)",
                     ", ".join(f"{k} {v}" for k, v in verdicts.items()), "-", "-", "-", "-",
                     "-",
                     _share([r["full_verdict"] != _NULL for r in rs]) if grid in null_grids
                     else "-"])
        for method in ("race", f"race, drop_alpha {STRICT}", "wilcoxon", "median",
                       "full grid, new seeds"):
            ms = [r[method] for r in rs if method in r]
            if not ms:
                continue
            used = np.mean([m["trials"] for m in ms])
            rows.append([grid, method, len(ms), f"{used:.1f} ({used / full:.2f})",
                         _share([m["claim"] for m in ms]) + " claim",
                         _share([m["same_verdict"] for m in ms]),
                         _share([m["same_best"] for m in ms]),
                         _share([m["best_kept"] for m in ms]),
                         _share([m["subset"] for m in ms]),
                         f"{np.mean([m['size'] for m in ms]):.2f}",
                         _share([m["claim"] for m in ms]) if grid in null_grids else "-"])
    headers = ["grid", "method", "replicas", "trials used (share of full)",
               "verdicts", "same verdict as full", "same best set as full",
               "full grid's best kept", "best set within full's", "best set size / full's",
               "false claims (null grids)"]
    return markdown_table(headers, rows)


def _share(flags: Sequence[bool]) -> str:
    return f"{np.mean(flags):.3f}" if len(flags) else "-"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown here too")
    parser.add_argument("--replicas", type=int, default=200, help="synthetic replicas per grid")
    parser.add_argument("--orders", type=int, default=20, help="seed orders per real grid")
    parser.add_argument("--min-seeds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--export-grid", nargs=2, metavar=("STUDY_DIR", "CSV"),
                        help="write a finished study's per-trial table and exit")
    args = parser.parse_args(argv)
    if args.export_grid:
        import analysis

        df = analysis.final_rows(analysis.load_study(args.export_grid[0]))
        cols = [*KEYS, "seed", "status", "rec", "kl", "elbo", "au", "mi", "step"]
        Path(args.export_grid[1]).parent.mkdir(parents=True, exist_ok=True)
        df[cols].sort_values([*KEYS, "seed"]).to_csv(args.export_grid[1], index=False)
        print(f"wrote {len(df)} trials to {args.export_grid[1]}")
        return 0
    started = time.monotonic()
    base = {"min_seeds": args.min_seeds, "peers": not args.no_peers}
    jobs: list[tuple[str, int, dict[str, Any]]] = []
    toy = REPO_ROOT / "docs/results/paper_toy/trials.csv"
    for name, source in (("paper-toy (5 seeds)", toy if toy.is_file() else "/work/runs/paper-toy"),
                         ("toy10 (10 seeds)", REPO_ROOT / "bench/data/racing_toy10.csv"),
                         ("toy20 (20 seeds)", REPO_ROOT / "bench/data/racing_toy20.csv")):
        if Path(source).exists():
            grid = load_grid(source)
            jobs += [(name, i, {**base, "grid": grid}) for i in range(args.orders)]
    for name, effect, n_seeds, n in (
            ("synthetic effect", True, 12, args.replicas),
            ("synthetic null", False, 12, args.replicas),
            ("synthetic effect, 20 seeds", True, 20, args.replicas // 4),
            ("synthetic null, 20 seeds", False, 20, args.replicas // 2)):
        jobs += [(name, i, {**base, "synthetic": True, "effect": effect, "n_seeds": n_seeds})
                 for i in range(n)]
    with multiprocessing.Pool(args.processes) as pool:
        results = pool.map(replicate, jobs, chunksize=4)
    wall = time.monotonic() - started
    text = "\n".join([
        "# Racing over seeds vs the full grid and vs pruners (replays)", "",
        f"Command: `{command_line()}`  ",
        f"{environment_line()}; wall {wall:.0f} s.", "",
        summarise(results, {"synthetic null", "synthetic null, 20 seeds"}), "",
        "Race: min_seeds 3, 1 seed per round, max_seeds = the grid's seeds, alpha 0.05; the "
        "verdict a group-sequential exact sign-flip test (Pocock-type alpha spending over the "
        "looks), the monotonic references stopped once it is settled; drops before max_seeds "
        f"at alpha (first row) or drop_alpha {STRICT} (second). 'full grid, new seeds': "
        "a second synthetic grid with the same truth and fresh seeds, analysed in full, "
        "against the first: how often the full grid's own answer repeats. Peers: Optuna with the "
        "configurations as trials and the seeds as steps (WilcoxonPruner p_threshold 0.1 on the "
        "per-seed rec; MedianPruner defaults on the running mean). 'same best set': the set "
        "equals the full grid's exactly; 'best kept': the full grid's best configuration is in "
        "it.", ""])
    print(text)
    write_output(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
