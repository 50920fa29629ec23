"""How much compute each pruning policy saves on a cyclical-β grid, and what it costs in quality.

Method (three stages, all in one run):

1. **Full grid, for real.** Every configuration of the grid (default n_cycles [1, 2, 4, 8] ×
   ratio [0.25, 0.5, 0.75, 1.0] × ramp [linear, sigmoid, cosine], β_max 1, seed 0: 48 toy
   trials) trains to the end through ``workers.train_trial`` in a ``multiprocessing.Pool(2)``;
   every evaluation's step, validation ELBO and ``at_beta_max`` are recorded.
2. **Replay.** A trial is deterministic given its seed, so a pruned trial's curve is exactly
   the prefix of its full curve: each policy is replayed over the recorded curves with the real
   decision code. Arrival order: trials start 2 at a time in grid order (a freed slot takes the
   next trial), and evaluations are interleaved by simulated time = step (every step costs the
   same). klstudy's policies run ``study._pruning.OptunaPruningScheduler`` over an
   ``OptunaMirror`` built by the driver's own ``study._driver._mirror`` (spec defaults; Optuna
   storage in memory unless ``--storage sqlite``), fed with small fake Tune trials; a STOP is
   followed by ``on_trial_complete`` with the last result, as Tune does. Ray's
   ``AsyncHyperBandScheduler`` (ASHA) is replayed the same way on the raw validation ELBO.
3. **Confirm.** The best phase-aware klstudy policy that prunes at all (fewest top-3 losses,
   then fewest steps), and any other pruner named with ``--confirm``, runs for real with
   ``study.run_study`` (Ray Tune + Optuna + MLflow, phase-aware) on the same grid; its actual
   fraction, pruned trials and top-3 outcome are reported next to the replayed ones, and its
   recorded curves are checked against stage 1's.
4. **Seed noise.** The top trials are re-run with other seeds (``--noise-seeds``), to show how
   far apart two seeds of one configuration end, next to the gaps between the top-3.

Measures: fraction of trial-steps spent (Σ steps run ÷ Σ full steps), trials pruned, whether
the top-3 configurations by final validation ELBO of the full grid all completed (a
configuration with several seeds counts as lost if any of its seeds was pruned; ranking by the
mean over seeds), and the best final validation ELBO among completed trials.

Run from the repository root: ``python bench/pruning.py --out bench/results/pruning.md``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from _common import command_line, environment_line, markdown_table, write_output

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no traffic beyond 127.0.0.1

import optuna  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
KLSTUDY_PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "patient")
STOP, CONTINUE = "STOP", "CONTINUE"  # = ray.tune.schedulers.TrialScheduler's values


# --- stage 1: the full grid ---------------------------------------------------------------------
def make_spec(args: argparse.Namespace, pruner: str = "none", phase_aware: bool = True) -> dict:
    return {
        "name": "bench-pruning",
        "model": {"kind": "toy"},
        "data": {"kind": "toy"},
        "train": {"total_steps": args.total_steps, "eval_every_steps": args.eval_every,
                  "iw_samples": 0},
        "schedule": {"n_cycles": args.n_cycles, "ratio": args.ratios, "ramp": args.ramps,
                     "beta_max": [1.0]},
        "seeds": args.seeds,
        "pruning": {"pruner": pruner, "phase_aware": phase_aware},
        "resources": {"cpus_per_trial": 1},
    }


def _full_trial(config_dict: dict[str, Any]) -> tuple[str, float, list[dict[str, Any]]]:
    from workers import TrialConfig, train_trial

    config = TrialConfig.from_dict(config_dict)
    t0 = time.perf_counter()
    result = train_trial(config)
    curve = [{"step": ev.step, "valid/elbo": ev.valid["elbo"], "at_beta_max": ev.at_beta_max,
              "final": ev.final} for ev in result.evaluations]
    return config.trial_id, time.perf_counter() - t0, curve


def run_full_grid(configs: list[Any], procs: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs) as pool:
        rows = list(pool.imap_unordered(_full_trial, [c.to_dict() for c in configs], chunksize=1))
    return {"wall_s": time.perf_counter() - t0,
            "compute_s": {tid: s for tid, s, _ in rows},
            "curves": {tid: curve for tid, _, curve in rows}}


def seed_noise(args: argparse.Namespace, configs: list[Any], finals: dict[str, float],
               cache: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Final ELBO of the top-k trials re-run with other seeds: {trial id: {seed: final}}."""
    import dataclasses

    ranked = sorted(configs, key=lambda c: -finals[c.trial_id])[: args.noise_top]
    key = f"noise-{args.noise_top}-{args.noise_seeds}"
    if key not in cache:
        extra = [dataclasses.replace(c, seed=s, trial_id=f"{c.trial_id}-reseed{s}")
                 for c in ranked for s in args.noise_seeds]
        cache[key] = {tid: curve[-1]["valid/elbo"]
                      for tid, curve in run_full_grid(extra, args.procs)["curves"].items()}
    return {c.trial_id: {c.seed: finals[c.trial_id],
                         **{s: cache[key][f"{c.trial_id}-reseed{s}"] for s in args.noise_seeds}}
            for c in ranked}


# --- stage 2: replay ----------------------------------------------------------------------------
class KlstudyPolicy:
    """klstudy's scheduler over a fresh Optuna mirror, exactly as the driver builds it."""

    def __init__(self, spec_dict: dict, storage: str, tmp: Path) -> None:
        from study._driver import _mirror
        from study._pruning import OptunaPruningScheduler
        from study._spec import parse_spec
        from study._store import StudyDir

        spec = parse_spec(spec_dict)
        mirror = _mirror(spec, StudyDir(tmp))
        if storage == "memory":
            mirror.storage_url = None  # optuna.create_study(storage=None): in-memory
        self.scheduler = OptunaPruningScheduler(mirror, phase_aware=spec.pruning.phase_aware)

    def start(self, trial: Any) -> None:
        pass

    def result(self, trial: Any, result: dict) -> str:
        return self.scheduler.on_trial_result(None, trial, result)

    def complete(self, trial: Any, result: dict) -> None:
        self.scheduler.on_trial_complete(None, trial, result)


class AshaPolicy:
    """Ray Tune's ASHA on the raw validation ELBO."""

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: float) -> None:
        from ray.tune.schedulers import AsyncHyperBandScheduler

        self.scheduler = AsyncHyperBandScheduler(
            time_attr="step", metric="valid/elbo", mode="max", max_t=max_t,
            grace_period=grace_period, reduction_factor=reduction_factor,
        )

    def start(self, trial: Any) -> None:
        self.scheduler.on_trial_add(None, trial)

    def result(self, trial: Any, result: dict) -> str:
        return self.scheduler.on_trial_result(None, trial, result)

    def complete(self, trial: Any, result: dict) -> None:
        self.scheduler.on_trial_complete(None, trial, result)


@dataclass
class Outcome:
    steps_run: dict[str, int] = field(default_factory=dict)
    pruned: set[str] = field(default_factory=set)
    decision_s: float = 0.0


def replay(policy: Any, configs: list[Any], curves: dict[str, list[dict]], slots: int) -> Outcome:
    """Feed ``policy`` the recorded curves in a realistic arrival order (see module docstring)."""
    out = Outcome()
    pending = list(configs)
    events: list[tuple[int, int, int]] = []  # (simulated time, start order, eval index)
    running: dict[int, tuple[Any, int]] = {}  # start order → (fake trial, start time)
    order = 0

    def start(now: int) -> None:
        nonlocal order
        if not pending:
            return
        config = pending.pop(0)
        trial = SimpleNamespace(trial_id=f"fake_{order:05d}", config={"trial": config.to_dict()})
        policy.start(trial)
        running[order] = (trial, now)
        heapq.heappush(events, (now + curves[config.trial_id][0]["step"], order, 0))
        order += 1

    for _ in range(slots):
        start(0)
    while events:
        now, seq, idx = heapq.heappop(events)
        trial, started = running[seq]
        tid = trial.config["trial"]["trial_id"]
        result = {**curves[tid][idx], "klstudy_trial_id": tid}
        t0 = time.perf_counter()
        decision = policy.result(trial, result)
        done = result["final"] or decision == STOP
        if done:
            policy.complete(trial, result)
        out.decision_s += time.perf_counter() - t0
        if not done:
            heapq.heappush(events, (started + curves[tid][idx + 1]["step"], seq, idx + 1))
            continue
        out.steps_run[tid] = result["step"]
        if not result["final"]:
            out.pruned.add(tid)
        del running[seq]
        start(now)
    return out


# --- scoring ------------------------------------------------------------------------------------
def config_key(config: Any) -> tuple:
    return (config.n_cycles, config.ratio, config.ramp, config.beta_max)


def config_name(key: tuple) -> str:
    return f"M{key[0]} R{key[1]:g} {key[2]}" + (f" β{key[3]:g}" if key[3] != 1.0 else "")


def top_configs(configs: list[Any], finals: dict[str, float], k: int) -> list[tuple]:
    by_key: dict[tuple, list[float]] = defaultdict(list)
    for c in configs:
        by_key[config_key(c)].append(finals[c.trial_id])
    return sorted(by_key, key=lambda key: -statistics.mean(by_key[key]))[:k]


def score(configs: list[Any], finals: dict[str, float], steps_run: dict[str, int],
          pruned: set[str], top: list[tuple]) -> dict[str, Any]:
    full = {c.trial_id: c.total_steps for c in configs}
    lost = [key for key in top
            if any(c.trial_id in pruned for c in configs if config_key(c) == key)]
    completed = [tid for tid in full if tid not in pruned and tid in steps_run]
    best = max((finals[t] for t in completed), default=math.nan)
    ranking = sorted(finals.values(), reverse=True)
    return {
        "fraction": sum(steps_run.get(t, 0) for t in full) / sum(full.values()),
        "n_pruned": len(pruned),
        "lost": lost,
        "best": best,
        "best_rank": ranking.index(best) + 1 if not math.isnan(best) else None,
    }


# --- stage 3: the real run ----------------------------------------------------------------------
def confirm(args: argparse.Namespace, pruner: str, study_dir: Path) -> dict[str, Any]:
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from study._driver import run_study
    from study._spec import parse_spec

    spec_dict = make_spec(args, pruner=pruner, phase_aware=True)
    spec = parse_spec(spec_dict)
    t0 = time.perf_counter()
    summary = run_study(spec, yaml.safe_dump(spec_dict, sort_keys=False), study_dir=study_dir)
    wall = time.perf_counter() - t0
    rows = ds.dataset(str(study_dir / "evaluations"), format="parquet").to_table(
        columns=["trial_id", "split", "step", "elbo"], filter=ds.field("split") == "valid",
    ).to_pylist()
    statuses = {r["trial_id"]: r["status"] for r in pq.read_table(study_dir / "trials.parquet").to_pylist()}
    steps: dict[str, int] = defaultdict(int)
    elbo_at: dict[tuple[str, int], float] = {}
    for r in rows:
        steps[r["trial_id"]] = max(steps[r["trial_id"]], r["step"])
        elbo_at[(r["trial_id"], r["step"])] = r["elbo"]
    return {"wall_s": wall, "counts": summary.counts, "steps": dict(steps), "statuses": statuses,
            "elbo_at": elbo_at}


# --- report -------------------------------------------------------------------------------------
def _row(name: str, phase: str, s: dict[str, Any], best_possible: float) -> list[str]:
    lost = ", ".join(config_name(k) for k in s["lost"]) or "—"
    ok = "yes" if not s["lost"] else "**no**"
    goal = "✓" if s["fraction"] <= 0.40 and not s["lost"] else ""
    return [name, phase, f"{s['fraction']:.3f}", str(s["n_pruned"]), ok, lost,
            f"{s['best']:.4f} (#{s['best_rank']})", f"{best_possible - s['best']:.4f}", goal]


def build_report(args: argparse.Namespace, ctx: dict[str, Any]) -> str:
    full, finals, top = ctx["full"], ctx["finals"], ctx["top"]
    headers = ["policy", "phase-aware", "fraction of steps", "pruned", "top-3 kept", "top-3 lost",
               "best final ELBO (rank)", "gap to best (nats)", "goal"]
    best_possible = max(finals.values())
    rows = [_row(name, phase, s, best_possible) for name, phase, s in ctx["replayed"]]
    for real in ctx["real"]:
        rows.append(_row(f"**{real['pruner']}, real run_study**", "yes", real["score"],
                         best_possible))
    compute = list(full["compute_s"].values())
    lines = [
        "# Pruning policies on a cyclical-β grid: steps saved vs configurations lost",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {environment_line()}; 2 cores, no GPU, shared with other jobs.  ",
        f"Grid: {len(ctx['configs'])} toy trials = n_cycles {args.n_cycles} × ratio {args.ratios} × "
        f"ramp {args.ramps} × β_max [1.0] × seeds {args.seeds}; {args.total_steps} steps, eval every "
        f"{args.eval_every} ({args.total_steps // args.eval_every} evaluations), iw_samples 0.  ",
        f"Full grid (stage 1): {full['wall_s']:.0f} s wall in Pool({args.procs}) "
        f"({'reused from ' + args.curves if ctx['reused'] else 'run now'}); per trial median "
        f"{statistics.median(compute):.1f} s.  ",
        f"Bench wall time: {ctx['bench_wall']:.0f} s.",
        "",
        "Top-3 configurations of the full grid by final validation ELBO: "
        + "; ".join(f"{config_name(k)} ({ctx['top_values'][k]:.4f})" for k in top)
        + f". Best possible final ELBO {best_possible:.4f}; median "
        f"{statistics.median(finals.values()):.4f}; worst {min(finals.values()):.4f}; "
        f"{sum(v >= best_possible - 0.001 for v in finals.values())} of {len(finals)} trials end "
        f"within 0.001 nats of the best, {sum(v >= best_possible - 0.005 for v in finals.values())} "
        "within 0.005.",
        "",
        markdown_table(headers, rows),
        "",
        "Goal: ≤ 0.40 of the steps with no top-3 loss (✓ = met). klstudy policies use the spec "
        f"defaults (n_startup_trials 5, n_warmup_steps 0, percentile 25, patience 2, "
        f"min_resource 1 evaluation, reduction_factor 3); ASHA: time_attr step, max_t "
        f"{args.total_steps}, grace_period {args.asha_grace}, reduction_factor "
        f"{args.asha_reduction:g}, 1 bracket. Optuna storage in the replay: {args.storage}.",
        "",
    ]
    for real in ctx["real"]:
        lines += [_real_notes(real, ctx), ""]
    if ctx.get("noise"):
        lines += _noise_lines(ctx["noise"], args)
    lines += ["", "Method: see the module docstring of `bench/pruning.py` (full grid once, then "
              "replay with the real decision code; trials start 2 at a time in grid order, "
              "evaluations interleave by simulated time = step)."]
    return "\n".join(lines)


def _noise_lines(noise: dict[str, dict[int, float]], args: argparse.Namespace) -> list[str]:
    seeds = list(next(iter(noise.values())))
    rows = [[tid, *(f"{v[s]:.4f}" for s in seeds), f"{max(v.values()) - min(v.values()):.4f}"]
            for tid, v in noise.items()]
    spreads = [max(v.values()) - min(v.values()) for v in noise.values()]
    return [
        f"Seed noise: the top-{len(noise)} trials of the grid re-run with seeds "
        f"{args.noise_seeds} (same configuration, final validation ELBO); the median spread over "
        f"seeds, {statistics.median(spreads):.4f} nats, is to be compared with the gaps between "
        "the top-3 above:",
        "",
        markdown_table(["trial (seed-0 rank order)", *(f"seed {s}" for s in seeds), "spread"], rows),
        "",
    ]


def _real_notes(real: dict[str, Any], ctx: dict[str, Any]) -> str:
    diffs = [abs(v - c["valid/elbo"]) for tid, curve in ctx["full"]["curves"].items()
             for c in curve if (v := real["elbo_at"].get((tid, c["step"]))) is not None]
    replayed = next(s for n, p, s in ctx["replayed"] if n == real["pruner"] and p == "yes")
    only_real = sorted(set(real["pruned"]) - set(replayed["pruned_ids"]))
    only_replay = sorted(set(replayed["pruned_ids"]) - set(real["pruned"]))
    same = "identical" if not (only_real or only_replay) else (
        f"{len(only_real)} pruned only in the real run {only_real}, {len(only_replay)} only in "
        f"the replay {only_replay} (results reach the pruner in a different order when trial "
        "speeds differ)")
    return (
        f"Real run ({real['pruner']}, phase-aware): {real['wall_s']:.0f} s wall, counts "
        f"{real['counts']}; fraction {real['score']['fraction']:.3f} (replay "
        f"{replayed['fraction']:.3f}); pruned trials vs the replay's: {same}. "
        f"Curves vs stage 1: {len(diffs)} common evaluations, max |Δ valid ELBO| "
        f"{max(diffs, default=math.nan):.2e} (trials are deterministic, so replaying prefixes "
        "is exact)."
    )


# --- main ---------------------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cycles", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--ramps", nargs="+", default=["linear", "sigmoid", "cosine"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--total-steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=100, help="evaluation interval, steps")
    p.add_argument("--procs", type=int, default=2, help="concurrent trials (= the cores)")
    p.add_argument("--asha-grace", type=int, default=300, help="ASHA grace period, steps")
    p.add_argument("--asha-reduction", type=float, default=3.0)
    p.add_argument("--storage", choices=["memory", "sqlite"], default="memory",
                   help="Optuna storage of the replayed mirrors")
    p.add_argument("--noise-seeds", type=int, nargs="*", default=[1, 2],
                   help="re-run the top trials with these seeds to show seed noise (none: skip)")
    p.add_argument("--noise-top", type=int, default=5, help="how many top trials to re-run")
    p.add_argument("--curves", help="JSON cache of stage 1: read if it exists, else written")
    p.add_argument("--confirm", nargs="+", choices=["auto", "skip", *KLSTUDY_PRUNERS],
                   default=["auto"], help="stage 3, phase-aware real runs: auto = the best "
                   "phase-aware policy that prunes; or pruner names; skip = none")
    p.add_argument("--out", help="also write the markdown report to this file")
    return p.parse_args(argv)


def _stage1(args: argparse.Namespace, configs: list[Any]) -> tuple[dict[str, Any], bool]:
    path = Path(args.curves) if args.curves else None
    if path is not None and path.is_file():
        full = json.loads(path.read_text())
        if set(full["curves"]) == {c.trial_id for c in configs}:
            return full, True
        print(f"{path}: holds another grid; running it again")
    full = run_full_grid(configs, args.procs)
    if path is not None:
        path.write_text(json.dumps(full))
    return full, False


def _replay_all(args: argparse.Namespace, configs: list[Any], curves: dict, finals: dict,
                top: list[tuple], tmp: Path) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for i, (pruner, phase_aware) in enumerate(
        (p, pa) for p in KLSTUDY_PRUNERS for pa in (True, False)
    ):
        policy = KlstudyPolicy(make_spec(args, pruner, phase_aware), args.storage, tmp / f"r{i}")
        outcome = replay(policy, configs, curves, args.procs)
        s = score(configs, finals, outcome.steps_run, outcome.pruned, top)
        s.update(pruned_ids=sorted(outcome.pruned), decision_s=outcome.decision_s)
        out.append((pruner, "yes" if phase_aware else "no", s))
    asha = AshaPolicy(max_t=args.total_steps, grace_period=args.asha_grace,
                      reduction_factor=args.asha_reduction)
    outcome = replay(asha, configs, curves, args.procs)
    s = score(configs, finals, outcome.steps_run, outcome.pruned, top)
    s.update(pruned_ids=sorted(outcome.pruned), decision_s=outcome.decision_s)
    out.append(("ASHA (Ray)", "no", s))
    return out


def _pick(replayed: list[tuple[str, str, dict[str, Any]]]) -> str:
    """The best phase-aware policy that prunes at all: fewest top-3 losses, then fewest steps."""
    phase_aware = [(n, s) for n, p, s in replayed if p == "yes"]
    pruning = [(n, s) for n, s in phase_aware if s["n_pruned"]] or phase_aware
    return min(pruning, key=lambda ns: (len(ns[1]["lost"]), ns[1]["fraction"]))[0]


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    from study._spec import parse_spec

    bench_start = time.perf_counter()
    configs = parse_spec(make_spec(args)).grid_configs()
    full, reused = _stage1(args, configs)
    curves = full["curves"]
    finals = {tid: curve[-1]["valid/elbo"] for tid, curve in curves.items()}
    top = top_configs(configs, finals, 3)
    top_values = {k: statistics.mean(finals[c.trial_id] for c in configs if config_key(c) == k)
                  for k in top}
    ctx: dict[str, Any] = {"configs": configs, "full": full, "finals": finals, "top": top,
                           "top_values": top_values, "reused": reused}
    if args.noise_seeds:
        ctx["noise"] = seed_noise(args, configs, finals, full)
        if args.curves:
            Path(args.curves).write_text(json.dumps(full))  # keeps the re-runs for next time
    with tempfile.TemporaryDirectory(prefix="klstudy-bench-prune-") as tmp:
        ctx["replayed"] = _replay_all(args, configs, curves, finals, top, Path(tmp))
        ctx["real"] = []
        pruners = [_pick(ctx["replayed"]) if c == "auto" else c for c in args.confirm if c != "skip"]
        for i, pruner in enumerate(dict.fromkeys(pruners)):
            real = confirm(args, pruner, Path(tmp) / f"study-{i}")
            pruned = {t for t, st in real["statuses"].items() if st == "pruned"}
            real.update(pruner=pruner, pruned=sorted(pruned),
                        score=score(configs, finals, real["steps"], pruned, top))
            ctx["real"].append(real)
    ctx["bench_wall"] = time.perf_counter() - bench_start
    report = build_report(args, ctx)
    print(report)
    write_output(args.out, report)


if __name__ == "__main__":
    main()
