"""Does pruning preserve the study's conclusion? Steps saved vs answers changed, on two grids.

Method (all in one run):

1. **Full grids, for real.** Two study specs train every trial to the end through
   ``workers.train_trial`` in a ``multiprocessing.Pool(2)``, recording every evaluation:
   - the **effect grid** (``bench/specs/pruning_effect.yaml``): the paper's toy at T = 10,000,
     where cyclical β makes most seeds use z and monotonic collapses, judged on KL;
   - the **null grid** (``bench/specs/pruning_null.yaml``) with β_max = ``--null-beta-max``
     (0.01): the KL weight is so small that the β schedule cannot matter, so M = 1 and M > 1
     differ only by seed noise, and a fair pruner must prune both families alike.
2. **Replay.** A trial is deterministic given its seed, so a pruned trial's curve is exactly the
   prefix of its full curve. Each policy is replayed over the recorded curves with the real
   decision code: ``study._pruning.OptunaPruningScheduler`` over the ``OptunaMirror`` and the
   ``PruningPolicy`` that ``study._driver`` builds from the spec (Optuna storage in memory).
   Trials start 2 at a time in the driver's run order (``StudySpec.grid_configs``, interleaved)
   and evaluations interleave by simulated time = step. "legacy" replays the design before this
   one: the spec-order grid (M outermost), fixing-stage values only, no minimum share, no grace.
3. **Real run** (``--confirm``): the effect grid with the default pruner through
   ``study.run_study`` (Ray Tune + Optuna + MLflow); its pruned trials and steps are compared with
   the replay's.

Scores per grid and policy: the fraction of trial-steps spent; trials pruned per family (M = 1,
M > 1) and Fisher's exact p of "pruned share differs"; whether the pruned study names the same
best configuration (by mean final objective over its completed seeds) as the full grid, or one
whose full-grid mean lies within the full best's 95% CI ("within seed noise"); and the
cyclical-vs-monotonic effect (mean final objective of M > 1 trials − M = 1 trials, Welch 95% CI,
completed trials only) next to the full grid's: the same verdict (CI above 0, below 0, or
containing 0) and overlapping CIs.

Run from the repository root: ``python bench/pruning.py --confirm --out bench/results/pruning.md``.
"""

from __future__ import annotations

import argparse
import copy
import heapq
import itertools
import json
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from _common import ci95, command_line, environment_line, markdown_table, write_output

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no traffic beyond 127.0.0.1

import optuna  # noqa: E402
from scipy import stats  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
STOP = "STOP"  # = ray.tune.schedulers.TrialScheduler.STOP
POLICIES = (  # (label, pruning section overrides, legacy order)
    ("median (default)", {"pruner": "median"}, False),
    ("percentile 25", {"pruner": "percentile"}, False),
    ("successive halving", {"pruner": "successive_halving"}, False),
    ("hyperband", {"pruner": "hyperband"}, False),
    ("patient", {"pruner": "patient"}, False),
    ("median, same-seed reference", {"pruner": "median", "reference": "same_seed"}, False),
    ("median, completed-only reference", {"pruner": "median", "reference": "completed"}, False),
    ("median, legacy", {"pruner": "median", "min_share": 0.0, "fixing_grace_share": 1.0,
                        "reference": "completed"}, True),
)


# --- stage 1 ------------------------------------------------------------------------------------
def grid_specs(args: argparse.Namespace) -> dict[str, dict]:
    base = yaml.safe_load(Path(args.spec).read_text())
    if args.null_spec == "none":  # only the given grid (e.g. the quickstart as shipped)
        base.pop("tracking", None)
        return {"effect": base}
    null = yaml.safe_load(Path(args.null_spec).read_text()) if args.null_spec else copy.deepcopy(base)
    if args.seeds:
        base["seeds"] = null["seeds"] = args.seeds
    for spec in (base, null):
        spec.pop("tracking", None)
    null["schedule"]["beta_max"] = [args.null_beta_max]
    return {"effect": base, "null": null}


def _full_trial(config_dict: dict[str, Any]) -> tuple[str, float, list[dict[str, Any]]]:
    from workers import TrialConfig, train_trial

    config = TrialConfig.from_dict(config_dict)
    t0 = time.perf_counter()
    result = train_trial(config)
    curve = [{"step": ev.step, "at_beta_max": ev.at_beta_max, "final": ev.final,
              **{f"valid/{k}": v for k, v in ev.valid.items()}} for ev in result.evaluations]
    return config.trial_id, time.perf_counter() - t0, curve


def run_full_grid(configs: list[Any], procs: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs) as pool:
        rows = list(pool.imap_unordered(_full_trial, [c.to_dict() for c in configs], chunksize=1))
    return {"wall_s": time.perf_counter() - t0, "compute_s": {t: s for t, s, _ in rows},
            "curves": {t: curve for t, _, curve in rows}}


# --- stage 2 ------------------------------------------------------------------------------------
class Policy:
    """klstudy's scheduler, mirror and policy exactly as ``study._driver`` builds them."""

    def __init__(self, spec: Any, tmp: Path) -> None:
        from study._driver import _mirror, pruning_policy
        from study._pruning import OptunaPruningScheduler
        from study._store import StudyDir

        mirror = _mirror(spec, StudyDir(tmp), "bench")
        mirror.storage_url = None  # optuna.create_study(storage=None): in memory
        self.scheduler = OptunaPruningScheduler(mirror, policy=pruning_policy(spec))


def legacy_order(configs: list[Any]) -> list[Any]:
    """The spec order of the design before interleaving: M, R, ramp, β_max, seed innermost."""
    return sorted(configs, key=lambda c: (c.n_cycles, c.ratio, c.ramp, c.beta_max, c.seed))


def replay(policy: Policy, configs: list[Any], curves: dict[str, list[dict]],
           slots: int) -> dict[str, int]:
    """Steps each trial ran when ``policy`` decides, trials started ``slots`` at a time."""
    pending, events, running, steps = list(configs), [], {}, {}
    order = itertools.count()

    def start(now: int) -> None:
        if pending:
            config, seq = pending.pop(0), next(order)
            running[seq] = (SimpleNamespace(config={"trial": config.to_dict()}), now)
            heapq.heappush(events, (now + curves[config.trial_id][0]["step"], seq, 0))

    for _ in range(slots):
        start(0)
    while events:
        now, seq, idx = heapq.heappop(events)
        trial, started = running[seq]
        tid = trial.config["trial"]["trial_id"]
        result = {**curves[tid][idx], "klstudy_trial_id": tid}
        done = policy.scheduler.on_trial_result(None, trial, result) == STOP or result["final"]
        if not done:
            heapq.heappush(events, (started + curves[tid][idx + 1]["step"], seq, idx + 1))
            continue
        policy.scheduler.on_trial_complete(None, trial, result)
        steps[tid] = result["step"]
        del running[seq]
        start(now)
    return steps


# --- the order case of issue 17 -----------------------------------------------------------------
ORDER_CURVES = {"A": 1.0, "B": 3.0, "C": 2.0, "D": 0.0, "E": 2.5, "F": 2.0}  # value at 300 and 400
ORDER_STEPS = (300, 400, 500)  # 500 is the final evaluation (never judged)
ORDER_POLICIES = (  # (label, pruner kwargs); n_startup_trials 2 throughout
    ("median (default)", {"kind": "median"}),
    ("median, the previous release's rule (best so far; pruned trials dropped)",
     {"kind": "previous"}),
    ("median, completed-only reference (Optuna's)", {"kind": "median", "reference": "completed"}),
    ("successive halving (default), rung 300, η 2", {"kind": "successive_halving",
                                                      "min_resource_steps": 300,
                                                      "reduction_factor": 2}),
    ("successive halving, Optuna's", {"kind": "successive_halving", "min_resource_steps": 300,
                                      "reduction_factor": 2, "reference": "completed"}),
)


class PreviousPeerRule(optuna.pruners.BasePruner):
    """The median rule of the release before issue 17, replicated for this comparison: the
    trial's best value so far against the values at its step of the trials that reported
    there (completed, pruned, running), a trial pruned earlier counting at no later step."""

    def __init__(self, n_startup_trials: int) -> None:
        self.n_startup_trials = n_startup_trials

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        from optuna.trial import TrialState

        step = trial.last_step
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        trials = study.get_trials(deepcopy=False, states=states)
        if sum(t.state == TrialState.COMPLETE for t in trials) < max(1, self.n_startup_trials):
            return False
        values = [t.intermediate_values[step] for t in trials
                  if t.number != trial.number and step in t.intermediate_values]
        if len(values) < max(1, self.n_startup_trials):
            return False
        return max(trial.intermediate_values.values()) < statistics.median(values)


def _order_scheduler(pruner: dict[str, Any]):
    from study._optuna_bridge import OptunaMirror
    from study._pruning import OptunaPruningScheduler, PruningPolicy

    space = {"n_cycles": [4], "ratio": [0.5], "ramp": ["linear"], "beta_max": [1.0]}
    previous = pruner.get("kind") == "previous"
    kwargs = {"n_startup_trials": 2, **({"kind": "median"} if previous else pruner)}
    mirror = OptunaMirror(None, "order", pruner_kwargs=kwargs, search_space=space)
    if previous:
        mirror._study = optuna.create_study(direction="maximize",
                                            pruner=PreviousPeerRule(n_startup_trials=2))
    return OptunaPruningScheduler(mirror, policy=PruningPolicy(phase_aware=False))


def replay_in_order(pruner: dict[str, Any], order: str) -> dict[str, int]:
    """Trials one after another in ``order``, each a flat curve (ORDER_CURVES); {pruned: step}."""
    from workers import TrialConfig

    sched, pruned = _order_scheduler(pruner), {}
    for name in order:
        trial = SimpleNamespace(config={"trial": TrialConfig(trial_id=name).to_dict()})
        value = ORDER_CURVES[name]
        for step in ORDER_STEPS:
            result = {"step": step, "valid/elbo": value, "at_beta_max": True,
                      "final": step == ORDER_STEPS[-1], "klstudy_trial_id": name}
            if sched.on_trial_result(None, trial, result) == STOP:
                pruned[name] = step
                break
        sched.on_trial_complete(None, trial, {**result, "final": name not in pruned})
    return pruned


def order_case() -> list[dict[str, Any]]:
    """Per policy: what the issue's order prunes, and over all 720 orders how often C and F
    (the same curve), both started after the first two trials, are decided differently."""
    rows = []
    for label, pruner in ORDER_POLICIES:
        issue = replay_in_order(pruner, "ABCDEF")
        split = judged = 0
        for order in itertools.permutations("ABCDEF"):
            if order.index("C") < 2 or order.index("F") < 2:
                continue  # a startup trial is never judged
            judged += 1
            pruned = replay_in_order(pruner, "".join(order))
            split += ("C" in pruned) != ("F" in pruned)
        rows.append({"label": label, "issue": issue, "split": split, "judged": judged})
    return rows


def order_section(rows: list[dict[str, Any]]) -> list[str]:
    table = [[r["label"], ", ".join(f"{k} at {v}" for k, v in sorted(r["issue"].items()))
              or "none", "yes" if ("C" in r["issue"]) == ("F" in r["issue"]) else "**no**",
              f"{r['split']}/{r['judged']}"] for r in rows]
    return [
        "## Order dependence: the case of issue 17", "",
        "Six trials run one after another, each a flat curve (value at steps 300 and 400; 500 "
        "is the final evaluation): A 1, B 3, C 2, D 0, E 2.5, F 2 (C's exact curve); "
        "n_startup_trials 2, objective max. The previous rule dropped D from step 400's "
        "reference once it was pruned at 300, so the bar at 400 rose to 2.25 and F was pruned "
        "where C was kept; Optuna's own rule (completed trials only) cuts F already at 300. "
        "Last column: over all 720 orders, those in which C and F (both after the first two "
        "trials) end differently — what remains there is the small reference of the early "
        "decisions (2–4 values), not the survivor drift.", "",
        markdown_table(["policy", "pruned (order A…F)", "C and F alike",
                        "orders splitting C, F"], table), "",
    ]


# --- scoring ------------------------------------------------------------------------------------
def key_of(c: Any) -> tuple:
    return (c.n_cycles, c.ratio, c.ramp, c.beta_max)


def name_of(key: tuple) -> str:
    return f"M{key[0]} R{key[1]:g}" + (f" {key[2]}" if key[2] != "linear" else "")


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) − mean(b) and its Welch 95% CI."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    diff = statistics.mean(a) - statistics.mean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb else 1.0
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    return diff, diff - half, diff + half


def verdict(effect: tuple[float, float, float]) -> str:
    """What an effect's CI says: "+" (above 0), "−" (below 0) or "0" (it contains 0)."""
    return "+" if effect[1] > 0 else "−" if effect[2] < 0 else "0"


def conclusions(configs: list[Any], finals: dict[str, float], kept: set[str],
                mode: str) -> dict[str, Any]:
    sign = 1.0 if mode == "max" else -1.0
    by_key: dict[tuple, list[float]] = defaultdict(list)
    for c in configs:
        if c.trial_id in kept and math.isfinite(finals[c.trial_id]):
            by_key[key_of(c)].append(finals[c.trial_id])
    best = max(by_key, key=lambda k: sign * statistics.mean(by_key[k])) if by_key else None
    fam = {f: [finals[c.trial_id] for c in configs if c.trial_id in kept
               and (c.n_cycles > 1) == f and math.isfinite(finals[c.trial_id])]
           for f in (True, False)}
    return {"best": best, "by_key": by_key, "effect": welch(fam[True], fam[False])}


def score(configs: list[Any], finals: dict[str, float], steps: dict[str, int], full: dict,
          mode: str) -> dict[str, Any]:
    pruned = {c.trial_id for c in configs if steps[c.trial_id] < c.total_steps}
    kept = {c.trial_id for c in configs} - pruned
    mine = conclusions(configs, finals, kept, mode)
    fam = [[c for c in configs if (c.n_cycles > 1) == f] for f in (False, True)]
    table = [[sum(c.trial_id in pruned for c in f), sum(c.trial_id not in pruned for c in f)]
             for f in fam]
    p = stats.fisher_exact(table).pvalue if all(sum(r) for r in table) else math.nan
    best_values = full["by_key"][full["best"]]
    mean, half = ci95(best_values)
    same = "—"
    if mine["best"] is not None:
        cand = statistics.mean(full["by_key"][mine["best"]])
        same = ("same" if mine["best"] == full["best"] else
                "within noise" if math.isfinite(half) and abs(cand - mean) <= half else "**no**")
    e, f = mine["effect"], full["effect"]
    agree = (math.isfinite(e[0]) and verdict(e) == verdict(f) and e[1] <= f[2] and f[1] <= e[2])
    return {"fraction": sum(steps.values()) / sum(c.total_steps for c in configs),
            "pruned": table, "fisher_p": p, "best": mine["best"], "same_best": same,
            "effect": e, "effect_agrees": agree}


# --- report -------------------------------------------------------------------------------------
def _effect(e: tuple[float, float, float]) -> str:
    return "—" if not math.isfinite(e[0]) else f"{e[0]:+.3f} [{e[1]:+.3f}, {e[2]:+.3f}]"


def _row(label: str, s: dict[str, Any]) -> list[str]:
    (p1, k1), (pc, kc) = s["pruned"]
    ok = "✓" if s["fraction"] <= 0.5 and s["same_best"] != "**no**" and s["effect_agrees"] else ""
    return [label, f"{s['fraction']:.2f}", f"{p1}/{p1 + k1}", f"{pc}/{pc + kc}",
            f"{s['fisher_p']:.2f}", name_of(s["best"]) if s["best"] else "—", s["same_best"],
            _effect(s["effect"]), "yes" if s["effect_agrees"] else "**no**", ok]


HEADERS = ["policy", "steps used", "pruned M=1", "pruned M>1", "Fisher p", "best config",
           "same best?", "cyc − mono (95% CI)", "same verdict, CIs overlap", "goal"]


def grid_section(name: str, ctx: dict[str, Any], args: argparse.Namespace) -> list[str]:
    g = ctx[name]
    full = g["full_conc"]
    rows = [_row(label, s) for label, s in g["scores"]]
    if g.get("real"):
        rows.append(_row("**median (default), real run_study**", g["real"]))
    compute = list(g["full"]["compute_s"].values())
    spec = g["spec"]
    return [
        f"## {name} grid: {len(g['configs'])} trials", "",
        f"M {spec['schedule']['n_cycles']} × R {spec['schedule']['ratio']} × ramp "
        f"{spec['schedule'].get('ramp', ['linear'])} × β_max {spec['schedule'].get('beta_max', [1.0])}"
        f" × seeds {spec['seeds']}; {spec['train']['total_steps']} steps. Full grid: "
        f"{g['full']['wall_s']:.0f} s wall in Pool({args.procs}), trial median "
        f"{statistics.median(compute):.1f} s. Objective: valid {g['metric']} ({g['mode']}). "
        f"Full-grid best: "
        f"{name_of(full['best'])} ({_fmt_ci(full['by_key'][full['best']])}); full-grid "
        f"cyclical − monotonic: {_effect(full['effect'])}.", "",
        markdown_table(HEADERS, rows), "",
    ]


def _fmt_ci(values: list[float]) -> str:
    mean, half = ci95(values)
    return f"{mean:.3f} ± {half:.3f}, n={len(values)}" if math.isfinite(half) else f"{mean:.3f}"


def build_report(args: argparse.Namespace, ctx: dict[str, Any]) -> str:
    lines = [
        "# Pruning that preserves the conclusion: steps saved vs answers changed", "",
        f"Command: `{command_line()}`  ",
        f"Machine: {environment_line()}; 2 cores, no GPU, shared with other jobs.  ",
        f"Specs: {args.spec}, {args.null_spec}; bench wall time {ctx['wall_s']:.0f} s.", "",
        *order_section(ctx["order"]),
        *(line for name in ("effect", "null") if name in ctx
          for line in grid_section(name, ctx, args)),
        "Goal (✓): ≤ 0.5 of the steps, the same best configuration (or one within the full "
        "best's seed CI), the same verdict on the cyclical-vs-monotonic effect (CI above, below or "
        "around 0) with overlapping CIs; "
        "on the null grid no family pruned more than chance allows (Fisher p). \"median, legacy\" "
        "is the previous design (spec order, fixing-stage values only, no minimum share, no "
        "grace). Method: the module docstring of `bench/pruning.py`.",
    ]
    if ctx.get("effect", {}).get("real_note"):
        lines += ["", ctx["effect"]["real_note"]]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------
def _stage1(args: argparse.Namespace, name: str, configs: list[Any]) -> dict[str, Any]:
    path = Path(f"{args.curves}.{name}.json") if args.curves else None
    if path is not None and path.is_file():
        full = json.loads(path.read_text())
        if set(full["curves"]) == {c.trial_id for c in configs}:
            return full
    full = run_full_grid(configs, args.procs)
    if path is not None:
        path.write_text(json.dumps(full))
    return full


def run_grid(args: argparse.Namespace, name: str, spec_dict: dict, tmp: Path) -> dict[str, Any]:
    from study._spec import parse_spec

    spec = parse_spec(spec_dict)
    configs = spec.grid_configs()
    full = _stage1(args, name, configs)
    metric, mode = spec.objective.metric, spec.objective.mode
    finals = {t: c[-1].get(f"valid/{metric}", math.nan) for t, c in full["curves"].items()}
    full_conc = conclusions(configs, finals, set(finals), mode)
    scores = []
    for i, (label, overrides, legacy) in enumerate(POLICIES):
        variant = copy.deepcopy(spec_dict)
        variant["pruning"] = {**variant.get("pruning", {}), **overrides}
        vspec = parse_spec(variant)
        order = legacy_order(configs) if legacy else configs
        steps = replay(Policy(vspec, tmp / f"{name}-{i}"), order, full["curves"], args.procs)
        scores.append((label, score(configs, finals, steps, full_conc, mode)))
    return {"spec": spec_dict, "configs": configs, "full": full, "finals": finals,
            "full_conc": full_conc, "scores": scores, "mode": mode, "metric": metric}


def confirm(g: dict[str, Any], tmp: Path) -> None:
    """The effect grid for real with the default pruner; compare with the replay."""
    import pyarrow.parquet as pq

    from study._driver import run_study
    from study._spec import parse_spec

    spec_dict = {**g["spec"], "name": "bench-pruning-real"}
    t0 = time.perf_counter()
    run_study(parse_spec(spec_dict), yaml.safe_dump(spec_dict), study_dir=tmp / "real")
    wall = time.perf_counter() - t0
    rows = pq.read_table(tmp / "real" / "trials.parquet").to_pylist()
    steps = {r["trial_id"]: int(r["last_step"]) for r in rows}
    g["real"] = score(g["configs"], g["finals"], steps, g["full_conc"], g["mode"])
    replayed = dict(g["scores"])["median (default)"]
    g["real_note"] = (f"Real run (effect grid, default pruner, `study.run_study`): {wall:.0f} s "
                      f"wall; steps used {g['real']['fraction']:.2f} (replay "
                      f"{replayed['fraction']:.2f}); pruned per family {g['real']['pruned']} "
                      f"(replay {replayed['pruned']}); trials finish in another order than in "
                      "the replay when their speeds differ.")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="bench/specs/pruning_effect.yaml", help="the effect grid")
    p.add_argument("--null-spec", default="bench/specs/pruning_null.yaml",
                   help="the null grid (its beta_max is replaced); empty: the effect grid's; "
                   "none: no null grid")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override both grids'")
    p.add_argument("--null-beta-max", type=float, default=0.01)
    p.add_argument("--procs", type=int, default=2, help="concurrent trials (= the cores)")
    p.add_argument("--curves", help="cache prefix for the full grids (FILE.effect.json, …)")
    p.add_argument("--confirm", action="store_true", help="also run the effect grid for real")
    p.add_argument("--grids", nargs="+", choices=["effect", "null"], default=["effect", "null"],
                   help="which grids to train/replay (the order case always runs; it trains "
                   "nothing)")
    p.add_argument("--out", help="also write the markdown report to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    t0 = time.perf_counter()
    specs = grid_specs(args)
    ctx: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="klstudy-bench-prune-") as tmp:
        ctx["order"] = order_case()
        for name, spec_dict in specs.items():
            if name in args.grids:
                ctx[name] = run_grid(args, name, spec_dict, Path(tmp))
        if args.confirm and "effect" in ctx:
            confirm(ctx["effect"], Path(tmp))
    ctx["wall_s"] = time.perf_counter() - t0
    report = build_report(args, ctx)
    print(report)
    write_output(args.out, report)


if __name__ == "__main__":
    main()
