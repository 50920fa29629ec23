"""Per-trial cost of klstudy's MLflow logging from the worker.

The same toy trial (default 3000 steps, an evaluation every 100) runs through
``workers.train_trial`` three ways:

- **none**: no tracking (the report callback does nothing);
- **sqlite**: klstudy's own ``workers._trainable.TrialRunLogger``, used exactly as the Ray
  trainable uses it: ``search_runs`` for a run to re-attach to, ``create_run`` with tags, the
  config as params (``log_batch``) and ``config.json`` (``log_dict``), ``log_evaluation`` after
  every evaluation (metrics go out with ``log_batch``; the latent scatter with ``log_figure``)
  and ``finish`` (``set_tag``/``set_terminated``) — against an sqlite store (the embedded
  default); the call table of the report shows how often each call happened;
- **server**: the same against a real ``mlflow server`` on 127.0.0.1 (sqlite backend,
  ``--workers 1``, ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, artifacts served by it),
  started here and stopped by PID at the end.

The experiment and the study's parent run are created before timing (the driver does that
once per study). Each timed trial is the wall time from creating the logger to ``finish``.
Variants are interleaved (rotating the order each repeat) after one untimed warm-up each, so
imports and first connections are not counted — with ``reuse_actors`` a Ray worker pays them
once; ``cold start`` below measures them in a fresh process. Every MLflow client call and the
latent-figure drawing are timed (the methods are wrapped): logging is synchronous in the
trial's thread, so Σ call time is the overhead, and unlike the difference of wall-time medians
it does not drown in the trial's own run-to-run noise (±10% on this VM even when idle).

Run from the repository root: ``python bench/mlflow_overhead.py --out bench/results/mlflow_overhead.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import (CLK_TCK, command_line, environment_line, machine_busy, markdown_table,
                     quiet_wait, write_output)

# MLflow 3 otherwise sends usage telemetry to an outside host from a background thread.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_CLIENT_CALLS = ("search_runs", "create_run", "update_run", "log_batch", "log_dict", "log_figure",
                 "set_tag", "set_terminated")
_COLD_START = """
import sys, time
t0 = time.perf_counter()
from mlflow.tracking import MlflowClient
from workers import TrialConfig
from workers._trainable import TrialRunLogger
t1 = time.perf_counter()
logger = TrialRunLogger(dict(name=sys.argv[1], tracking_uri=sys.argv[2], experiment_id=sys.argv[3],
                             parent_run_id=sys.argv[4]), TrialConfig(trial_id="cold-start"))
t2 = time.perf_counter()
logger.finish("completed")
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
"""


# --- the MLflow server ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(tmp: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A local MLflow server in its own process group; stopped (by its PID/group) on exit."""
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
           "--serve-artifacts", "--artifacts-destination", str(tmp / "server-artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, proc, timeout_s=120)
        yield uri, proc
    finally:
        _stop_group(proc)
        log.close()


def _wait_healthy(uri: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s")


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)  # the group this script created for the server
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _group_cpu_s(pgid: int) -> float:
    """CPU seconds of the live processes in process group ``pgid``."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


# --- timing -----------------------------------------------------------------------------------
class CallTimer:
    """Wraps MlflowClient methods and ``latent_figure``; accumulates seconds per call name."""

    def __init__(self) -> None:
        self.current: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def installed(self) -> Iterator[None]:
        from mlflow.tracking import MlflowClient

        import workers._trainable as trainable

        saved = [(MlflowClient, name, getattr(MlflowClient, name)) for name in _CLIENT_CALLS]
        saved.append((trainable, "latent_figure", trainable.latent_figure))
        for owner, name, original in saved:
            label = "latent_figure (matplotlib draw)" if name == "latent_figure" else name
            setattr(owner, name, self._timed(original, label))
        try:
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)

    def _timed(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.current[label].append(time.perf_counter() - t0)

        return timed

    def take(self) -> dict[str, list[float]]:
        out, self.current = dict(self.current), defaultdict(list)
        return out


def make_study(uri: str, name: str, artifacts: Path | None) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    location = artifacts.as_uri() if artifacts is not None else None
    experiment_id = client.create_experiment(name, artifact_location=location)
    parent = client.create_run(experiment_id, run_name=name, tags={"klstudy.role": "study"})
    return {"name": name, "tracking_uri": uri, "experiment_id": experiment_id,
            "parent_run_id": parent.info.run_id}


def one_trial(config: Any, study: dict[str, str] | None) -> tuple[float, float]:
    """(wall s, CPU s of this process) of one trial, tracked to ``study`` or not at all."""
    from workers import train_trial
    from workers._trainable import TrialRunLogger

    t0, cpu0 = time.perf_counter(), time.process_time()
    logger = TrialRunLogger(study, config) if study else None
    train_trial(config, report=logger.log_evaluation if logger else None)
    if logger:
        logger.finish("completed")
    return time.perf_counter() - t0, time.process_time() - cpu0


def cold_start(study: dict[str, str]) -> tuple[float, float]:
    """(import s, first logger s) in a fresh interpreter: what a new Ray worker pays once."""
    out = subprocess.run(
        [sys.executable, "-c", _COLD_START, study["name"], study["tracking_uri"],
         study["experiment_id"], study["parent_run_id"]],
        capture_output=True, text=True, check=True,
    )
    imports, first = out.stdout.split()[-2:]
    return float(imports), float(first)


# --- report -------------------------------------------------------------------------------------
def _pct(x: float, base: float) -> str:
    return f"{100 * (x - base) / base:+.1f}%"


def _bootstrap_ci(with_: list[float], without: list[float], n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of median(with) ÷ median(without) − 1, in %."""
    import random

    rng = random.Random(0)
    ratios = sorted(
        statistics.median(rng.choices(with_, k=len(with_)))
        / statistics.median(rng.choices(without, k=len(without))) - 1
        for _ in range(n)
    )
    return 100 * ratios[int(0.025 * n)], 100 * ratios[int(0.975 * n)]


def _variant_row(variant: str, data: dict[str, Any], base_wall: float) -> list[str]:
    walls = data["walls"][variant]
    w = statistics.median(walls)
    cells = [variant, str(len(walls)), f"{w:.2f}", f"{min(walls):.2f}–{max(walls):.2f}"]
    if variant == "none":
        return [*cells, "—", "—", "—"]
    call_s = statistics.median(sum(sum(v) for v in rep.values()) for rep in data["calls"][variant])
    lo, hi = _bootstrap_ci(walls, data["walls"]["none"])
    server = f" (+ {statistics.median(data['server_cpu']):.2f} CPU-s in the server)" \
        if variant == "server" else ""
    return [*cells, f"{call_s:.3f}{server}", f"**{100 * call_s / base_wall:.2f}%**",
            f"{_pct(w, base_wall)} [{lo:+.1f}%, {hi:+.1f}%]"]


def build_report(args: argparse.Namespace, data: dict[str, Any]) -> str:
    base = data["walls"]["none"]
    base_wall = statistics.median(base)
    rows = [_variant_row(v, data, base_wall) for v in data["variants"]]
    headers = ["tracking", "n", "median wall s", "range s", "Σ MLflow call s per trial",
               "overhead = Σ calls ÷ none", "wall-median difference [95% bootstrap CI]"]
    spread = 100 * (max(base) - min(base)) / base_wall
    lines = [
        "# MLflow logging overhead per trial",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {environment_line()}; 2 cores, no GPU, shared with other jobs.  ",
        f"Trial: toy model, {args.total_steps} steps, eval every {args.eval_every} "
        f"({args.total_steps // args.eval_every} evaluations), iw_samples {args.iw_samples}, "
        f"1 torch thread, seed 0; {args.repeats} interleaved repeats per variant after one "
        "untimed warm-up each. MLflow telemetry off (`MLFLOW_DISABLE_TELEMETRY=true`: by default "
        "MLflow 3 posts usage data to an outside host from a background thread).  ",
        f"Machine load: other processes used {data['foreign_pct']:.0f}% of the 2 cores during "
        "the timed repeats (from /proc/stat, minus this bench's processes).  ",
        f"Bench wall time: {data['bench_wall']:.0f} s.",
        "",
        markdown_table(headers, rows),
        "",
        "Goal ≤ 2% per trial. The logging runs synchronously in the trial's thread, so its cost "
        "is the time spent inside the MLflow client calls and the latent-figure drawing, timed "
        "around each call ('Σ MLflow call s'); the overhead is that ÷ the median untracked "
        "trial. The difference of the wall-time medians is given too, but the identical "
        f"untracked trial itself varied by {spread:.0f}% (range ÷ median) between repeats on "
        "this machine, so it cannot resolve a few percent (see its interval).",
        "",
    ]
    lines += _calls_table(data)
    lines += ["", "Cold start in a fresh interpreter (a new Ray worker pays this once, not per "
              "trial with `reuse_actors=True`): " + "; ".join(
                  f"{v}: import mlflow + workers {imp:.2f} s, first TrialRunLogger "
                  f"(search_runs + create_run + params + config.json) {first:.2f} s"
                  for v, (imp, first) in data["cold"].items())]
    return "\n".join(lines)


def _calls_table(data: dict[str, Any]) -> list[str]:
    names = sorted({n for v in data["calls"].values() for rep in v for n in rep})
    rows = []
    for name in names:
        row = [name]
        for variant in data["variants"][1:]:
            reps = data["calls"][variant]
            n = statistics.median(len(rep.get(name, [])) for rep in reps)
            total = statistics.median(sum(rep.get(name, [])) for rep in reps)
            row.append(f"{1000 * total:.0f} ({n:.0f} × {1000 * total / n:.1f})" if n else "—")
        rows.append(row)
    headers = ["MLflow call", *(f"{v}: ms (calls × ms)" for v in data["variants"][1:])]
    return ["Where the time goes, per trial (median over repeats):", "",
            markdown_table(headers, rows)]


# --- main ---------------------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--total-steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=100, help="evaluation interval, steps")
    p.add_argument("--iw-samples", type=int, default=100, help="final IW-NLL samples")
    p.add_argument("--repeats", type=int, default=7, help="timed trials per variant")
    p.add_argument("--warmup-steps", type=int, default=200, help="steps of the untimed warm-up")
    p.add_argument("--variants", nargs="+", choices=["none", "sqlite", "server"],
                   default=["none", "sqlite", "server"])
    p.add_argument("--quiet-wait-s", type=float, default=0.0,
                   help="first wait up to this long for the machine to be < 25%% busy")
    p.add_argument("--out", help="also write the markdown report to this file")
    return p.parse_args(argv)


def _run(args: argparse.Namespace, tmp: Path, server: tuple[str, subprocess.Popen] | None) -> dict:
    import dataclasses

    from workers import TrialConfig

    variants = ["none"] + [v for v in args.variants if v != "none"]
    config = TrialConfig(total_steps=args.total_steps, eval_every_steps=args.eval_every,
                         iw_samples=args.iw_samples, n_cycles=4, ratio=0.5, seed=0,
                         num_threads=1, trial_id="bench-mlflow")
    studies: dict[str, dict[str, str] | None] = {"none": None}
    if "sqlite" in variants:
        studies["sqlite"] = make_study(f"sqlite:///{tmp / 'mlflow.db'}", "bench-sqlite",
                                       tmp / "artifacts")
    if server is not None:
        studies["server"] = make_study(server[0], "bench-server", None)
    warm = dataclasses.replace(config, total_steps=args.warmup_steps,
                               eval_every_steps=min(args.eval_every, args.warmup_steps))
    for variant in variants:
        one_trial(dataclasses.replace(warm, trial_id=f"warmup-{variant}"), studies[variant])
    timer = CallTimer()
    data: dict[str, Any] = {"variants": variants, "walls": defaultdict(list),
                            "calls": defaultdict(list),
                            "server_cpu": []}
    busy0, mine0, t0 = machine_busy()[0], time.process_time(), time.perf_counter()
    server_cpu0 = _group_cpu_s(server[1].pid) if server else 0.0
    with timer.installed():
        for rep in range(args.repeats):
            for variant in variants[rep % len(variants):] + variants[: rep % len(variants)]:
                cfg = dataclasses.replace(config, trial_id=f"rep{rep}-{variant}")
                s0 = _group_cpu_s(server[1].pid) if server else 0.0
                wall, cpu = one_trial(cfg, studies[variant])
                if variant == "server" and server:
                    data["server_cpu"].append(_group_cpu_s(server[1].pid) - s0)
                data["walls"][variant].append(wall)
                calls = timer.take()
                if variant != "none":
                    data["calls"][variant].append(calls)
                print(f"rep {rep} {variant}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    elapsed = time.perf_counter() - t0
    server_total = (_group_cpu_s(server[1].pid) - server_cpu0) if server else 0.0
    foreign = machine_busy()[0] - busy0 - (time.process_time() - mine0) - server_total
    data["foreign_pct"] = max(0.0, 100 * foreign / (2 * elapsed))
    data["cold"] = {v: cold_start(s) for v, s in studies.items() if s is not None}
    return data


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    quiet_wait(args.quiet_wait_s)
    bench_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="klstudy-bench-mlflow-") as tmp_name:
        tmp = Path(tmp_name)
        if "server" in args.variants:
            with mlflow_server(tmp) as server:
                data = _run(args, tmp, server)
        else:
            data = _run(args, tmp, None)
    data["bench_wall"] = time.perf_counter() - bench_start
    report = build_report(args, data)
    print(report)
    write_output(args.out, report)


if __name__ == "__main__":
    main()
