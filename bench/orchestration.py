"""Orchestration overhead of a klstudy study against a plain ``multiprocessing.Pool``.

One grid of short toy trials (default 4 n_cycles × 2 ratios × 2 seeds = 16 trials, 1 CPU each)
runs twice in the same process, on the same 2 cores:

- **pool**: ``multiprocessing.Pool(2)`` (spawn) calling ``workers.train_trial`` on each
  ``TrialConfig`` (``num_threads=1``, no checkpoints, no tracking). Each worker times its own
  ``train_trial`` call: that is the trial's compute time C_i (measured with two trials running,
  as in the study).
- **klstudy**: ``study.run_study`` on the same spec — embedded Ray, Tune, Optuna pruner
  ``none``, MLflow sqlite store and Parquet in a fresh study directory: the real thing.

Reported: W ÷ (Σ C_i ÷ 2) for each (1.00 = the two cores never wait for anything but
trials), the klstudy/pool wall ratio, and where klstudy's extra time goes: driver phases and
hooks (timed by wrapping the driver's functions from this script — no study code is changed),
per-trial worker-side time (Tune's ``time_total_s`` minus the pool's C_i for the same config:
MLflow logging, checkpoints, result round trips), idle slot time between trials, and the
CPU-seconds each kind of process used (sampled from /proc every second).

Run from the repository root:
``python bench/orchestration.py --out bench/results/orchestration.md``.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from _common import (CLK_TCK, command_line, environment_line, machine_busy, markdown_table,
                     quiet_wait, write_output)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no traffic beyond 127.0.0.1



# --- the spec and the pool baseline -----------------------------------------------------------
def make_spec(args: argparse.Namespace, eval_every: int | None = None) -> dict[str, Any]:
    eval_every = eval_every or args.eval_every
    return {
        "name": "bench-orchestration",
        "model": {"kind": "toy"},
        "data": {"kind": "toy"},
        "train": {"total_steps": args.total_steps, "eval_every_steps": eval_every,
                  "iw_samples": args.iw_samples},
        "schedule": {"n_cycles": args.n_cycles, "ratio": args.ratios, "ramp": ["linear"],
                     "beta_max": [1.0]},
        "seeds": args.seeds,
        "pruning": {"pruner": "none"},
        "resources": {"cpus_per_trial": 1},
    }


def _pool_trial(config_dict: dict[str, Any]) -> tuple[str, float, float, float, float]:
    """(trial id, wall s, CPU s, start, end) of one ``train_trial`` call, in a pool worker."""
    from workers import TrialConfig, train_trial

    config = TrialConfig.from_dict(config_dict)
    start, cpu0, t0 = time.time(), time.process_time(), time.perf_counter()
    train_trial(config)
    return config.trial_id, time.perf_counter() - t0, time.process_time() - cpu0, start, time.time()


def run_pool(configs: list[Any], n_procs: int) -> tuple[float, dict[str, tuple[float, float]], float]:
    """Wall time of the whole pool run, {trial id: (compute s, CPU s)}, s to the first trial."""
    t0, epoch0 = time.perf_counter(), time.time()
    with mp.get_context("spawn").Pool(n_procs) as pool:
        rows = list(pool.imap_unordered(_pool_trial, [c.to_dict() for c in configs], chunksize=1))
        pool.close()
        pool.join()
    wall = time.perf_counter() - t0
    first_start = min(start for _, _, _, start, _ in rows) - epoch0
    return wall, {tid: (w, cpu) for tid, w, cpu, _, _ in rows}, first_start


# --- CPU accounting from /proc ----------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str, float]]:
    """{pid: (ppid, name, CPU seconds)} for every readable process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            raw = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
        table[int(entry)] = (int(fields[1]), _kind(comm, [a for a in raw.split("\0") if a]), cpu)
    return table


def _kind(comm: str, argv: list[str]) -> str:
    """A readable process kind: ``ray::ImplicitFunc``, ``raylet``, ``log_monitor.py``, …"""
    cmd = argv[0] if argv else ""
    if cmd.startswith("ray::") or comm.startswith("ray::"):
        name = (cmd or comm).split(".")[0].split(" ")[0][:15]
        return "ray::ImplicitFunc (trial actors)" if name == "ray::ImplicitFu" else name
    if comm in ("gcs_server", "raylet"):
        return comm
    base = os.path.basename(cmd) or comm
    if base.startswith("python"):
        script = next((a for a in argv[1:] if not a.startswith("-")), "")
        return f"python {os.path.basename(script)}" if script else "python"
    return base


class CpuSampler:
    """Samples the CPU time of this process's descendants every second; keeps the last seen."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.seen: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        table = _proc_table()
        me = os.getpid()
        for pid, (ppid, name, cpu) in table.items():
            up, hops = ppid, 0
            while up not in (me, 0, 1) and up in table and hops < 10:
                up, hops = table[up][0], hops + 1
            if up == me:
                self.seen[pid] = (name, cpu)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for name, cpu in self.seen.values():
            out[name] += cpu
        return dict(out)


# --- driver instrumentation (wrapping, no code change) ------------------------------------------
class Probe:
    """Accumulates call counts and seconds per key, and a per-trial timeline on the driver clock."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.events: dict[str, dict[str, float]] = defaultdict(dict)
        self.cpu_at_shutdown: dict[str, float] = {}

    def wrap(self, owner: Any, attr: str, key: str, before: Callable[..., None] | None = None):
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*a: Any, **kw: Any) -> Any:
            if before is not None:
                before(*a, **kw)
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.calls[key].append(time.perf_counter() - t0)

        setattr(owner, attr, timed)
        return original

    def mark(self, what: str) -> Callable[..., None]:
        def record(self_: Any, *a: Any, trial: Any = None, **kw: Any) -> None:
            trial = trial if trial is not None else (a[1] if len(a) > 1 else None)
            tid = trial.config["trial"]["trial_id"]
            now = time.monotonic()
            self.events[tid].setdefault(f"first_{what}", now)
            self.events[tid][f"last_{what}"] = now

        return record


@contextmanager
def instrumented(probe: Probe, sampler: CpuSampler) -> Iterator[None]:
    import ray
    from ray import tune
    from ray.tune import Callback
    from ray.tune.execution.tune_controller import TuneController

    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    import study._cluster_check as cluster_check
    import study._driver as driver
    from study._pruning import OptunaPruningScheduler
    from study._results import StudyRecorder

    def on_trial_start(self_: Any, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        probe.events[trial.config["trial"]["trial_id"]]["start"] = time.monotonic()

    def snapshot(*a: Any, **kw: Any) -> None:
        sampler.sample()

    def fit_called(*a: Any, **kw: Any) -> None:
        probe.events["_study"]["fit_start"] = time.monotonic()

    saved: list[tuple[Any, str, Any]] = []
    targets = [
        (driver, "open_parent_run", "driver: MLflow parent run (open)", None),
        (cluster_check, "_init_ray", "driver: ray.init", None),
        (cluster_check, "check_shared_study_dir", "driver: shared study-dir check", None),
        (driver, "_build_tuner", "driver: build Tuner", None),
        (tune.Tuner, "fit", "driver: Tuner.fit (the trials)", fit_called),
        (driver, "_summarise", "driver: summarise (Parquet read)", None),
        (driver, "close_parent_run", "driver: MLflow parent run (close)", None),
        (ray, "shutdown", "driver: ray.shutdown", snapshot),
        (OptunaPruningScheduler, "on_trial_result", "hook: scheduler.on_trial_result (Optuna sqlite)",
         probe.mark("result")),
        (OptunaPruningScheduler, "on_trial_complete", "hook: scheduler.on_trial_complete",
         probe.mark("complete")),
        (StudyRecorder, "on_trial_result", "hook: recorder.on_trial_result (incl. flushes)", None),
        (StudyRecorder, "on_trial_complete", "hook: recorder.on_trial_complete (flush + MLflow tag)",
         None),
        (StudyRecorder, "flush", "  of which recorder.flush (Parquet)", None),
        (TuneController, "checkpoint", "hook: Tune experiment-state checkpoint", None),
        (JsonLoggerCallback, "log_trial_result", "hook: Tune's default JSON logger", None),
        (CSVLoggerCallback, "log_trial_result", "hook: Tune's default CSV logger", None),
        (TBXLoggerCallback, "log_trial_result", "hook: Tune's default TensorBoard logger", None),
    ]
    StudyRecorder.on_trial_start = on_trial_start  # Callback's no-op hook, recorded
    try:
        for owner, attr, key, before in targets:
            saved.append((owner, attr, probe.wrap(owner, attr, key, before)))
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
        StudyRecorder.on_trial_start = Callback.on_trial_start


def run_klstudy(spec_dict: dict[str, Any], study_dir: Path, probe: Probe,
                sampler: CpuSampler) -> tuple[float, float, Any]:
    from study._driver import run_study
    from study._spec import parse_spec

    spec = parse_spec(spec_dict)
    text = yaml.safe_dump(spec_dict, sort_keys=False)
    with instrumented(probe, sampler):
        probe.events["_study"]["start"] = time.monotonic()
        t0 = time.perf_counter()
        summary = run_study(spec, text, study_dir=study_dir)
        wall = time.perf_counter() - t0
        probe.events["_study"]["end"] = time.monotonic()
    return wall, summary.wall_s, summary


def tune_times(study_dir: Path) -> dict[str, tuple[float, int]]:
    """{trial id: (time_total_s of the last result, number of results)} from Tune's result.json."""
    import json

    out = {}
    for path in (study_dir / "tune").glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[-1]["klstudy_trial_id"]] = (rows[-1]["time_total_s"], len(rows))
    return out


# --- report -----------------------------------------------------------------------------------
def _timeline(probe: Probe) -> dict[str, float]:
    """Phases of the study on the driver clock, and slot time lost between trials."""
    study = probe.events["_study"]
    trials = [v for k, v in probe.events.items() if not k.startswith("_") and "start" in v]
    starts = sorted(v["start"] for v in trials)
    completes = sorted(v.get("first_complete", v["start"]) for v in trials)
    spans = sum(v.get("first_complete", v["start"]) - v["start"] for v in trials)
    # the k-th trial (k >= 2) takes the slot the (k-2)-th completion freed
    gaps = [s - c for s, c in zip(starts[2:], completes[:-2])]
    return {
        "run_study called → Tuner.fit called": study["fit_start"] - study["start"],
        "Tuner.fit called → first trial started": starts[0] - study["fit_start"],
        "first → second trial started": starts[1] - starts[0] if len(starts) > 1 else 0.0,
        "slot idle between a trial's end and the next start (Σ)": sum(gaps),
        "  per hand-over (median)": statistics.median(gaps) if gaps else 0.0,
        "last trial complete → run_study returned": study["end"] - completes[-1],
        "Σ trial spans, start → complete": spans,
    }


def _foreign_pct(busy: float, mine: float, wall: float) -> float:
    """Share (%) of the 2 cores used by processes outside this bench."""
    return max(0.0, 100 * (busy - mine) / (2 * wall))


def decompose_worker(config: Any, repeats: int) -> dict[str, float]:
    """Median wall s of one trial, sequentially: plain, + checkpoints, + MLflow (as in run_trial)."""
    from workers import train_trial
    from workers._trainable import _CHECKPOINT_EVERY_S, TrialRunLogger

    def plain(tmp: Path) -> None:
        train_trial(config)

    def checkpoints(tmp: Path) -> None:
        train_trial(config, checkpoint_dir=tmp / "ckpt", checkpoint_every_s=_CHECKPOINT_EVERY_S)

    def tracked(tmp: Path) -> None:
        logger = TrialRunLogger(study, config)
        train_trial(config, report=logger.log_evaluation, checkpoint_dir=tmp / "ckpt",
                    checkpoint_every_s=_CHECKPOINT_EVERY_S)
        logger.finish("completed")

    with tempfile.TemporaryDirectory(prefix="klstudy-bench-decompose-") as name:
        tmp = Path(name)
        study = _scratch_study(f"sqlite:///{tmp / 'mlflow.db'}", tmp / "artifacts")
        tracked(tmp)  # warm-up: imports, first connection
        times: dict[str, list[float]] = defaultdict(list)
        variants = {"plain": plain, "+ checkpoints": checkpoints, "+ checkpoints + MLflow": tracked}
        for rep in range(repeats):
            for label, fn in (list(variants.items())[::-1] if rep % 2 else variants.items()):
                t0 = time.perf_counter()
                fn(tmp)
                times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(v) for label, v in times.items()}


def _scratch_study(uri: str, artifacts: Path) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("decompose", artifact_location=artifacts.as_uri())
    parent = client.create_run(experiment_id, run_name="decompose")
    return {"name": "decompose", "tracking_uri": uri, "experiment_id": experiment_id,
            "parent_run_id": parent.info.run_id}


_MLFLOW_OPEN = """
import sys, time
t0 = time.perf_counter()
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
t1 = time.perf_counter()
client = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}/mlflow.db")
client.get_experiment_by_name("x")
t2 = time.perf_counter()
eid = client.create_experiment("x")
run = client.create_run(eid, run_name="x")
client.log_batch(run.info.run_id, params=[Param(f"p{i}", "v") for i in range(40)])
client.log_text(run.info.run_id, "spec", "spec.yaml")
t3 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f}")
"""


def mlflow_open_breakdown() -> tuple[float, float, float]:
    """In a fresh interpreter: import mlflow, create the sqlite store, experiment + parent run."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="klstudy-bench-mlflow-open-") as tmp:
        out = subprocess.run([sys.executable, "-c", _MLFLOW_OPEN, tmp], capture_output=True,
                             text=True, check=True)
    imports, store, runs = (float(v) for v in out.stdout.split()[-3:])
    return imports, store, runs


def _round_rows(rounds: list[dict[str, Any]], procs: int) -> list[list[str]]:
    rows = []
    for i, res in enumerate(rounds, 1):
        sum_c = sum(w for w, _ in res["pool_c"].values())
        sum_tune = sum(t for t, _ in res["tune_c"].values())
        w_pool, w_k = res["w_pool"], res["w_klstudy"]
        every = res["eval_every"]
        rows += [
            [i, every, "pool (multiprocessing, spawn)", f"{w_pool:.1f}", f"{sum_c:.1f}",
             f"{w_pool / (sum_c / procs):.3f}", f"{res['foreign_pool']:.0f}%"],
            [i, every, "klstudy run_study", f"{w_k:.1f}", f"{sum_c:.1f}",
             f"**{w_k / (sum_c / procs):.3f}**", f"{res['foreign_klstudy']:.0f}%"],
            [i, every, "klstudy, C_i = its Tune time_total_s", f"{w_k:.1f}", f"{sum_tune:.1f}",
             f"{w_k / (sum_tune / procs):.3f}", f"{res['foreign_klstudy']:.0f}%"],
        ]
    return rows


def _decompose_lines(res: dict[str, Any], decompose: tuple[str, dict[str, float]]) -> list[str]:
    trial_id, times = decompose
    plain = times["plain"]
    ckpt = times["+ checkpoints"] - plain
    mlflow = times["+ checkpoints + MLflow"] - times["+ checkpoints"]
    n = len(res["tune_c"])
    tune_extra = statistics.median(res["tune_c"][t][0] - res["pool_c"][t][0]
                                   for t in res["tune_c"] if t in res["pool_c"])
    rows = [[label, f"{v:.2f}", f"{v - plain:+.2f}"] for label, v in times.items()]
    return [
        f"Worker side, one trial ({trial_id}) run alone in this process, sequentially (median of "
        "repeats, after a warm-up):",
        "",
        markdown_table(["what the worker does", "wall s", "vs plain"], rows),
        "",
        f"So per trial: checkpoints (as `run_trial` takes them) {ckpt:+.2f} s, MLflow logging "
        f"{mlflow:+.2f} s. "
        f"In the study, Tune's time_total_s exceeds the pool's C_i by {tune_extra:.2f} s per trial "
        f"(median); the rest, {tune_extra - ckpt - mlflow:.2f} s, is Tune's side of each report "
        "(checkpoint persisted into the storage directory, result sent and the driver's reply "
        "awaited), contention with the driver and Ray daemons, and on the first trial of each "
        f"actor its cold start (importing MLflow, first connection); × {n} trials.",
        "",
    ]


def build_report(args: argparse.Namespace, all_rounds: list[dict[str, Any]],
                 extra: dict[str, Any]) -> str:
    rounds = [r for r in all_rounds if r["eval_every"] == args.eval_every]
    # The same trial's compute varies between phases on this VM: every round's pool phase is a
    # sample of it; C_i below is the per-trial median over the pool phases of all rounds.
    pooled = {t: (statistics.median(r["pool_c"][t][0] for r in rounds),
                  statistics.median(r["pool_c"][t][1] for r in rounds)) for t in rounds[0]["pool_c"]}
    res = {**rounds[-1], "pool_c": pooled}
    n = len(pooled)
    ideal = sum(w for w, _ in pooled.values()) / args.procs
    w_k = statistics.median(r["w_klstudy"] for r in rounds)
    w_pool = statistics.median(r["w_pool"] for r in rounds)
    sums = [sum(w for w, _ in r["pool_c"].values()) for r in rounds]
    wall_ratios = [r["w_klstudy"] / r["w_pool"] for r in rounds]
    per_trial = [w for w, _ in pooled.values()]
    goal = "met" if w_k / ideal <= 1.10 else "MISSED"
    pooled_rows = [["pool (multiprocessing, spawn)", f"{w_pool:.1f}", f"{2 * ideal:.1f}",
                    f"{w_pool / ideal:.3f}"],
                   ["klstudy run_study", f"{w_k:.1f}", f"{2 * ideal:.1f}", f"**{w_k / ideal:.3f}**"]]
    lines = [
        "# Orchestration overhead: klstudy vs multiprocessing.Pool",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {environment_line()}; 2 cores, no GPU, **shared with other jobs** "
        "(their load is given per phase).  ",
        f"Grid: {n} toy trials (n_cycles {args.n_cycles} × ratio {args.ratios} × seeds "
        f"{args.seeds}), {args.total_steps} steps, eval every {args.eval_every}, iw_samples "
        f"{args.iw_samples}, cpus_per_trial 1, pruner none; klstudy statuses {res['counts']}. "
        f"{len(rounds)} round(s), order {args.order}. MLflow telemetry off "
        "(`MLFLOW_DISABLE_TELEMETRY=true`).  ",
        f"Per-trial compute C_i (pool, 2 concurrent, median over rounds): median "
        f"{statistics.median(per_trial):.1f} s, min {min(per_trial):.1f}, max {max(per_trial):.1f}. "
        f"Σ C_i of the same {n} trials per pool phase: {', '.join(f'{x:.0f}' for x in sums)} s "
        f"(this VM's run-to-run variation).  ",
        f"Bench wall time: {extra['bench_wall']:.0f} s.",
        "",
        f"Pooled over the {len(rounds)} rounds with eval every {args.eval_every} (median W; "
        "Σ of per-trial median C_i):",
        "",
        markdown_table(["run", "median W (s)", "Σ C_i (s)", "W ÷ (Σ C_i ÷ 2)"], pooled_rows),
        "",
        f"Goal W ÷ (Σ C_i ÷ 2) ≤ 1.10 for klstudy: **{goal}** ({w_k / ideal:.3f}); klstudy / pool "
        f"wall ratio per round: {', '.join(f'{r:.3f}' for r in wall_ratios)} (median "
        f"{statistics.median(wall_ratios):.3f}). Every round:",
        "",
        markdown_table(["round", "eval every", "run", "W (s)", "Σ C_i (s)", "W ÷ (Σ C_i ÷ 2)",
                        "other jobs' load"], _round_rows(all_rounds, args.procs)),
        "",
        "Per round, C_i is the pool's in-worker `train_trial` time of that round; 'other jobs' "
        "load' is the share of the 2 cores used by processes outside this bench during that "
        "phase (/proc/stat minus this process and its descendants).",
        "",
    ]
    lines += _breakdown(args, res, extra)
    return "\n".join(lines)


def _breakdown(args: argparse.Namespace, res: dict[str, Any], extra: dict[str, Any]) -> list[str]:
    sum_c = sum(w for w, _ in res["pool_c"].values())
    tl = res["timeline"]
    fixed = (tl["run_study called → Tuner.fit called"] + tl["Tuner.fit called → first trial started"]
             + tl["last trial complete → run_study returned"])
    lines = ["## Where klstudy's time goes (last round; C_i pooled over rounds)", ""]
    phase_rows = [[k, len(v), f"{sum(v):.2f}", f"{1000 * statistics.mean(v):.1f}"]
                  for k, v in res["calls"].items() if v]
    lines += [markdown_table(["driver call (in this process)", "calls", "total s", "mean ms"],
                             phase_rows), ""]
    lines += [markdown_table(["timeline (driver clock)", "s"],
                             [[k, f"{v:.1f}"] for k, v in tl.items()]), ""]
    n_reports = sum(r for _, r in res["tune_c"].values())
    inside = tl["Σ trial spans, start → complete"] - sum_c
    lines += [
        f"Inside the trial spans: Σ spans − Σ C_i = {inside:.1f} slot-s over {n_reports} reports "
        f"= {1000 * inside / max(n_reports, 1):.0f} ms per report, "
        f"{inside / max(len(res['tune_c']), 1):.2f} s per trial (this includes each trial's own "
        "start: actor reset, MLflow run creation). A function trainable's "
        "`tune.report` blocks the training thread until the driver has processed the result "
        "(scheduler, callbacks) and asked for the next one, so every evaluation pays a driver "
        "round trip on top of the worker-side logging and checkpointing below.",
        "",
    ]
    imports, store, runs = extra["mlflow_open"]
    lines += [
        f"Fixed cost (before the first trial starts + after the last ends): **{fixed:.1f} s** = "
        f"{100 * fixed / (sum_c / args.procs):.0f}% of Σ C_i ÷ 2 in this run; the pool needs "
        f"{res['pool_first_start']:.1f} s before its first trial (spawn + imports).  ",
        f"The MLflow parent run, measured alone in a fresh interpreter: import mlflow "
        f"{imports:.2f} s, create the sqlite store (schema migrations) {store:.2f} s, experiment "
        f"+ parent run + params + spec.yaml {runs:.2f} s.",
        "",
    ]
    if "decompose" in extra:
        lines += _decompose_lines(res, extra["decompose"])
    pool_cpu = sum(c for _, c in res["pool_c"].values())
    cpu_rows = [[k, f"{v:.1f}"] for k, v in sorted(res["cpu_klstudy"].items(), key=lambda kv: -kv[1])
                if v >= 0.5]
    cpu_rows.append(["this process (driver: Tune loop, hooks, MLflow/Optuna/Parquet)",
                     f"{res['driver_cpu']:.1f}"])
    lines += [
        "CPU-seconds, which do not depend on the other jobs' load: the trials' own compute "
        f"(Σ in-worker CPU, pool) {pool_cpu:.1f}; whole pool run {res['mine_pool']:.1f}; whole "
        f"klstudy run {res['mine_klstudy']:.1f} (+{res['mine_klstudy'] - res['mine_pool']:.1f} "
        "CPU-s for Ray, Tune, MLflow, Optuna, Parquet). By process, klstudy run (under 0.5 s "
        "omitted):",
        "",
        markdown_table(["process", "CPU s"], cpu_rows),
        "",
    ]
    return lines


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cycles", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--total-steps", type=int, default=3000, help="per trial (≈ 17 s on an idle core)")
    p.add_argument("--eval-every", type=int, default=100, help="evaluation interval, steps")
    p.add_argument("--iw-samples", type=int, default=100, help="final IW-NLL samples (spec default)")
    p.add_argument("--procs", type=int, default=2, help="pool size = the machine's cores")
    p.add_argument("--order", choices=["pool-first", "klstudy-first"], default="pool-first")
    p.add_argument("--quiet-wait-s", type=float, default=0.0,
                   help="before each phase, wait up to this long for the machine to be < 25%% busy")
    p.add_argument("--rounds", type=int, default=1, help="pool + klstudy pairs to run")
    p.add_argument("--extra-eval-every", type=int, nargs="*", default=[],
                   help="after the rounds, one more pair per value with this evaluation interval")
    p.add_argument("--decompose-repeats", type=int, default=3,
                   help="worker-side decomposition of one trial, repeats per variant (0: skip)")
    p.add_argument("--study-dir", help="keep the klstudy studies under here (default: a temp dir)")
    p.add_argument("--out", help="also write the markdown report to this file")
    return p.parse_args(argv)


def _run_pool_phase(configs: list[Any], args: argparse.Namespace, res: dict[str, Any]) -> None:
    quiet_wait(args.quiet_wait_s)
    busy0, cpu0 = machine_busy()[0], time.process_time()
    with CpuSampler() as sampler:
        res["w_pool"], res["pool_c"], res["pool_first_start"] = run_pool(configs, args.procs)
    res["busy_pool"] = machine_busy()[0] - busy0
    res["mine_pool"] = sum(sampler.by_kind().values()) + time.process_time() - cpu0
    res["foreign_pool"] = _foreign_pct(res["busy_pool"], res["mine_pool"], res["w_pool"])


def _run_klstudy_phase(spec_dict: dict[str, Any], study_dir: Path, args: argparse.Namespace,
                       res: dict[str, Any]) -> None:
    quiet_wait(args.quiet_wait_s)
    probe = Probe()
    busy0, cpu0 = machine_busy()[0], time.process_time()
    with CpuSampler() as sampler:
        res["w_klstudy"], res["w_fit"], summary = run_klstudy(spec_dict, study_dir, probe, sampler)
    res["driver_cpu"] = time.process_time() - cpu0
    res["busy_klstudy"] = machine_busy()[0] - busy0
    res["cpu_klstudy"] = sampler.by_kind()
    res["mine_klstudy"] = sum(res["cpu_klstudy"].values()) + res["driver_cpu"]
    res["foreign_klstudy"] = _foreign_pct(res["busy_klstudy"], res["mine_klstudy"], res["w_klstudy"])
    res["calls"] = dict(probe.calls)
    res["timeline"] = _timeline(probe)
    res["tune_c"] = tune_times(study_dir)
    res["counts"] = summary.counts


def _round(args: argparse.Namespace, eval_every: int, study_dir: Path) -> dict[str, Any]:
    """One pool phase and one klstudy phase on the same grid."""
    from study._spec import parse_spec

    spec_dict = make_spec(args, eval_every)
    configs = parse_spec(spec_dict).grid_configs()
    res: dict[str, Any] = {"eval_every": eval_every}
    phases = [lambda: _run_pool_phase(configs, args, res),
              lambda: _run_klstudy_phase(spec_dict, study_dir, args, res)]
    for phase in phases if args.order == "pool-first" else phases[::-1]:
        phase()
    if res["counts"].get("completed") != len(configs):
        print(f"warning: klstudy counts {res['counts']} (expected {len(configs)} completed)")
    return res


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    from study._spec import parse_spec

    bench_start = time.perf_counter()
    if Path("/tmp/ray/ray_current_cluster").exists():
        print("warning: /tmp/ray/ray_current_cluster exists: ray.init() may join that cluster")
    configs = parse_spec(make_spec(args)).grid_configs()
    intervals = [args.eval_every] * args.rounds + list(args.extra_eval_every)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="klstudy-bench-orch-") as tmp:
        for i, every in enumerate(intervals):
            rounds.append(_round(args, every, Path(args.study_dir or tmp) / f"study-{i}"))
    extra: dict[str, Any] = {"mlflow_open": mlflow_open_breakdown()}
    if args.decompose_repeats:
        pool_c = rounds[args.rounds - 1]["pool_c"]
        median_id = sorted(pool_c, key=lambda t: pool_c[t][0])[len(pool_c) // 2]
        config = next(c for c in configs if c.trial_id == median_id)
        extra["decompose"] = (median_id, decompose_worker(config, args.decompose_repeats))
    extra["bench_wall"] = time.perf_counter() - bench_start
    report = build_report(args, rounds, extra)
    print(report)
    write_output(args.out, report)


if __name__ == "__main__":
    main()
