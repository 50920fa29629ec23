"""Loading a large study for the report: Parquet, MLflow in bulk, and the naive MLflow loop.

Builds a synthetic study (``analysis._synthetic``; default 1,000 trials × 200 evaluations, i.e.
~400k evaluation rows and ~2.3M MLflow metric points) into Parquet and an sqlite MLflow store,
then times in the same run:

(a) ``load_study`` from Parquet (+ the statistics, + the full report when ``analysis._report``
    exists);
(b) ``load_from_mlflow`` on the sqlite store (one search, then the ``metrics`` table in bulk),
    and on an ``mlflow server`` over that same store (the ``get-history-bulk`` endpoint);
(c) the naive loop: ``search_runs`` then ``MlflowClient.get_metric_history`` per run and metric
    key, then the same tidying. It is timed on a random subset of runs and extrapolated
    linearly to all runs (the table says so).

Every loaded table is checked equal to the Parquet one. Over http the server bounds the gain:
``get-history-bulk`` removes the naive loop's per-call cost (~45 ms × 23 calls per run) but each
point still goes through MLflow's ORM and JSON on the server (~30 µs of server CPU per point,
measured on this 2-core machine), which a client cannot avoid. Run from the repository root:
``python bench/report.py [--trials 1000] [--evals 200] [--out bench/results/report.md]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
from _common import command_line, environment_line, markdown_table, write_output

from analysis import _load, _mlflow_load
from analysis._load import final_rows, load_study
from analysis._mlflow_load import load_from_mlflow
from analysis._stats import config_table, paired_vs_monotonic
from analysis._summary import summary_lines
from analysis._synthetic import write_synthetic_study

NAME = "bench"
SERVER_START_TIMEOUT_S = 120


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def stats_of(data: _load.StudyData) -> list[str]:
    finals = final_rows(data)
    config_table(finals)
    paired_vs_monotonic(finals)
    return summary_lines(finals)


def _trial_runs_plain(client: Any) -> list[Any]:
    """The plain paged search a user would write: every run's params, tags, latest metrics."""
    exp = client.get_experiment_by_name(NAME)
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs.extend(r for r in page if r.data.tags.get("klstudy.role") == "trial")
        token = page.token
        if not token:
            return runs


def naive_load(uri: str, n_sample: int, seed: int = 0) -> tuple[float, int, int]:
    """The per-run, per-key loop on a random subset: (extrapolated s, runs timed, calls made)."""
    from mlflow.tracking import MlflowClient

    start = time.perf_counter()
    client = MlflowClient(tracking_uri=uri)
    runs = _trial_runs_plain(client)
    search_s = time.perf_counter() - start
    chosen = random.Random(seed).sample(runs, min(n_sample, len(runs)))
    start = time.perf_counter()
    points, calls = [], 0
    for run in chosen:
        run_id = run.info.run_id
        for key in run.data.metrics:
            calls += 1
            history = client.get_metric_history(run_id, key)
            points += [_mlflow_load._point(run_id, m) for m in history]
    trials = _load.coerce(_mlflow_load._trials_frame(chosen, study=NAME), _load.TRIAL_COLUMNS)
    _mlflow_load._tidy_metrics(pd.DataFrame(points, columns=_mlflow_load._HISTORY_COLUMNS),
                               trials)
    per_run_s = (time.perf_counter() - start) / len(chosen)
    return search_s + per_run_s * len(runs), len(chosen), calls


class Server:
    """``mlflow server`` on 127.0.0.1 over an existing sqlite store; stopped by process group."""

    def __init__(self, db: Path, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{db}", "--default-artifact-root", str(workdir / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.log = open(workdir / "mlflow-server.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=workdir, start_new_session=True)

    def wait(self) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < SERVER_START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not become healthy")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.log.close()


def check_equal(a: _load.StudyData, b: _load.StudyData) -> str:
    pd.testing.assert_frame_equal(a.evaluations, b.evaluations)
    return "equal"


def report_timings(study_dir: Path, workdir: Path) -> list[list[object]] | None:
    try:
        from analysis._report import build_report
    except ImportError:
        return None
    what = "full report (load + stats + figures + HTML)"
    t, result = timed(lambda: build_report(study_dir, out_dir=workdir / "report-parquet",
                                           log_to_mlflow=False))
    rows: list[list[object]] = [[what, "Parquet", "all", f"{t:.2f}",
                                 f"{len(result.figure_paths)} PNGs"]]
    mlflow_dir = workdir / "study-without-parquet"
    mlflow_dir.mkdir(exist_ok=True)
    shutil.copy(study_dir / "study.json", mlflow_dir / "study.json")
    t, result = timed(lambda: build_report(mlflow_dir, out_dir=workdir / "report-mlflow",
                                           log_to_mlflow=False))
    rows.append([what, "MLflow sqlite (bulk)", "all", f"{t:.2f}", "no Parquet in the study dir"])
    return rows


def build_study(args: argparse.Namespace, workdir: Path) -> float:
    """Build the synthetic stores (or reuse them with --reuse); returns the build time."""
    study_dir, db = workdir / NAME, workdir / "mlflow.db"
    build_file = workdir / "build_seconds.txt"
    built = (study_dir / "study.json").is_file() and db.is_file() and build_file.is_file()
    if args.reuse and built:
        print(f"reusing the synthetic study in {workdir}", flush=True)
        return float(build_file.read_text())
    build_s, _ = timed(lambda: write_synthetic_study(
        study_dir, n_trials=args.trials, n_evals=args.evals, seed=0,
        tracking_uri=f"sqlite:///{db}", name=NAME))
    build_file.write_text(f"{build_s:.1f}")
    print(f"built {args.trials} trials × {args.evals} evaluations in {build_s:.0f} s", flush=True)
    return build_s


def mlflow_rows(label: str, uri: str, parquet: _load.StudyData, n_naive: int,
                n_trials: int, *, repeats: int) -> list[list[object]]:
    t_bulk, bulk = timed(lambda: load_from_mlflow(uri, NAME), repeats=repeats)
    t_naive, n_timed, calls = naive_load(uri, n_naive)
    how = ("measured" if n_timed == n_trials
           else f"extrapolated linearly from {n_timed} random runs ({calls} calls)")
    print(f"{label}: batched {t_bulk:.1f} s, naive {t_naive:.0f} s", flush=True)
    return [
        ["load_from_mlflow (batched)", label, "all", f"{t_bulk:.2f}",
         f"{check_equal(parquet, bulk)} to Parquet; {t_naive / t_bulk:.1f}× faster than naive"],
        ["naive loop: search_runs + get_metric_history per run × key", label, n_timed,
         f"{t_naive:.1f}", how],
    ]


def run(args: argparse.Namespace, workdir: Path) -> str:
    build_s = build_study(args, workdir)
    study_dir, db = workdir / NAME, workdir / "mlflow.db"
    t_parquet, parquet = timed(lambda: load_study(study_dir), repeats=3)
    t_stats, lines = timed(lambda: stats_of(parquet), repeats=3)
    rows: list[list[object]] = [
        ["load_study", "Parquet", "all", f"{t_parquet:.2f}", f"{len(parquet.evaluations):,} rows"],
        ["final_rows + config_table + paired_vs_monotonic + summary_lines", "(in memory)", "all",
         f"{t_stats:.2f}", ""],
    ]
    rows += mlflow_rows("MLflow sqlite", f"sqlite:///{db}", parquet, args.naive_runs, args.trials,
                        repeats=2)
    if not args.no_server:
        server = Server(db, workdir)
        try:
            print(f"mlflow server healthy after {server.wait():.0f} s", flush=True)
            rows += mlflow_rows("MLflow server (http, 1 worker)", server.uri, parquet,
                                args.naive_runs_http, args.trials, repeats=1)
        finally:
            server.stop()
    report = report_timings(study_dir, workdir)
    rows += report or [["full report", "-", "-", "-", "analysis._report not available"]]
    return render(args, build_s, rows, lines)


def render(args: argparse.Namespace, build_s: float, rows: list[list[object]],
           lines: list[str]) -> str:
    table = markdown_table(["what", "source", "runs timed", "time (s)", "notes"], rows)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (f"{date.today().isoformat()} · `{command_line()}` · {environment_line()} · "
              f"load average at the end {load} (other work shares the 2 cores)")
    setup = (f"Synthetic study (`analysis._synthetic`): {args.trials} trials × {args.evals} "
             "evaluations (train and valid rows per evaluation, test at the end; 23 MLflow metric "
             f"keys per finished run). Building it (Parquet + sqlite MLflow, batched `log_batch`) "
             f"took {build_s:.0f} s. Fast rows are the best of 2–3 runs; MLflow times include "
             "creating the client and the search.")
    goals = ("Goals: the full report from Parquet in ≤ 10 s; `load_from_mlflow` ≥ 10× faster "
             "than the naive loop.")
    return "\n".join(["# Report loading benchmark", "", header, "", setup, "", table, "",
                      goals, "", "Summary lines of this study (`summary_lines`):", "",
                      *[f"- {line}" for line in lines], ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--evals", type=int, default=200)
    parser.add_argument("--naive-runs", type=int, default=100,
                        help="runs timed in the naive sqlite loop (then extrapolated)")
    parser.add_argument("--naive-runs-http", type=int, default=50,
                        help="runs timed in the naive http loop (then extrapolated)")
    parser.add_argument("--no-server", action="store_true",
                        help="skip the mlflow server measurements")
    parser.add_argument("--workdir",
                        help="keep the synthetic stores here (default: a temp dir, removed)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --workdir: reuse a study built there by an earlier run")
    parser.add_argument("--out", default="bench/results/report.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        text = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="klstudy-bench-") as tmp:
            text = run(args, Path(tmp))
    print(text)
    write_output(args.out, text)


if __name__ == "__main__":
    main()
