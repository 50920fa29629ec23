"""The ``klstudy`` command line.

Exit codes: 0 success, 2 user error (one ``error: <where>: <what>`` line on stderr, no
traceback), 1 internal failure. Heavy modules (torch, ray, mlflow) are imported by the
subcommand that needs them, so ``klstudy validate`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from study._cli_base import EXIT_USER_ERROR, Parser, UserError
from study._cli_train import _add_train
from workers._secrets import redact_text


# --- klstudy validate / run / resume / status / submit ----------------------------------------
def _load_spec(path: Path):  # -> (StudySpec, text)
    from study._spec import SpecError, load_spec
    from study._spec_errors import problems_of

    try:
        spec = load_spec(path)
    except SpecError as exc:  # every problem of the spec, one per line
        raise UserError("\n".join(str(p) for p in problems_of(exc))) from None
    return spec, path.read_text()


def _check_factories(spec, *, one_batch: bool = True) -> str | None:
    """A spec's user model/data factories (kind python), checked (study._plugin_check)."""
    from study._plugin_check import check_factories
    from study._spec import SpecError

    try:
        return check_factories(spec, one_batch=one_batch)
    except SpecError as exc:
        raise UserError(str(exc)) from None


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate",
                       help="check a study spec and print how many trials it expands to",
                       description="Check a study spec (every problem is reported, one "
                       "`error:` line each) and print how many trials it expands to.")
    p.add_argument("spec", type=Path, help="the study spec (YAML)")
    p.set_defaults(handler=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    spec, _ = _load_spec(args.spec)
    axes = spec.search_space()
    shape = " x ".join(f"{len(v)} {k}" for k, v in axes.items())
    checked = _check_factories(spec)
    if spec.search.kind == "race":
        r = spec.search.race()
        print(f"{args.spec}: ok — study {spec.name!r}, a race of at most {spec.n_trials()} "
              f"trials ({shape} x {r['min_seeds']} to {r['max_seeds']} seeds)")
    else:
        print(f"{args.spec}: ok — study {spec.name!r}, {spec.n_trials()} trials "
              f"({spec.search.kind}: {shape} x {len(spec.seeds)} seeds)")
    if checked:
        print(f"  model {spec.model.factory or spec.model.kind}, data "
              f"{spec.data.factory or spec.data.kind}: {checked}")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a study to the end (embedded Ray and MLflow by default)",
        description="Run a study to the end. A study directory that already holds this study, "
        "finished, is left as it is (exit 0), so `klstudy run SPEC && klstudy report DIR` can "
        "be run again; an unfinished one is continued with `klstudy resume DIR`.")
    p.add_argument("spec", type=Path, help="the study spec (YAML)")
    p.add_argument("--study-dir", type=Path, default=None,
                   help="where the study keeps everything (default: ./klstudy-runs/<name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the study that --study-dir holds and run this one afresh")
    p.add_argument("--address", default=None,
                   help="Ray cluster address, e.g. 10.0.0.1:6379 (default: embedded Ray)")
    p.add_argument("--tracking-uri", default=os.environ.get("KLSTUDY_TRACKING_URI"),
                   help="MLflow tracking URI (default: $KLSTUDY_TRACKING_URI, else sqlite in the "
                   "study dir); pass credentials through the variable, not on the command line")
    p.set_defaults(handler=_cmd_run)


def _show_progress() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    progress = logging.getLogger("klstudy.progress")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False


def _print_summary(summary) -> int:
    """Print how the study ended; the exit code: 0 finished, 130 interrupted, 1 failed."""
    c = summary.counts
    if not summary.ran:
        print(f"study {summary.name!r} already finished in {summary.study_dir}: "
              f"{c.get('completed', 0)} completed, {c.get('pruned', 0)} pruned, "
              f"{c.get('error', 0)} failed; nothing to run (--overwrite runs it again)")
        if summary.best_trial:
            print(f"best {summary.objective}: {summary.best_value:.4f} ({summary.best_trial})")
        print(f"report: klstudy report {summary.study_dir}")
        return 0
    print(f"study {summary.name!r} {summary.status} after {summary.wall_s:.0f} s: "
          f"{c.get('completed', 0)} completed, {c.get('pruned', 0)} pruned, "
          f"{c.get('error', 0)} failed, {c.get('running', 0) + c.get('pending', 0)} unfinished")
    if summary.status == "interrupted":
        print(f"resume it with: klstudy resume {summary.study_dir}")
    if summary.best_trial:
        print(f"best {summary.objective}: {summary.best_value:.4f} ({summary.best_trial})")
    print(f"study dir: {summary.study_dir}")
    print(f"MLflow: {summary.tracking_uri} (parent run {summary.parent_run_id}); "
          f"report: klstudy report {summary.study_dir}")
    return {"finished": 0, "interrupted": 130}.get(summary.status, 1)


def _storage_from_env(spec, text: str):  # -> (StudySpec, text)
    """``$KLSTUDY_OPTUNA_STORAGE`` (a URL with credentials, kept out of files and command
    lines) replaces the spec's ``pruning.storage``."""
    from study._spec import SpecError, parse_spec

    url = os.environ.get("KLSTUDY_OPTUNA_STORAGE")
    if not url:
        return spec, text
    data = spec.to_dict()
    data["pruning"]["storage"] = url
    try:
        return parse_spec(data), text
    except SpecError as exc:
        raise UserError(f"$KLSTUDY_OPTUNA_STORAGE: {exc}") from None


def _cmd_run(args: argparse.Namespace) -> int:
    from study._driver import StudyError, run_study

    spec, text = _storage_from_env(*_load_spec(args.spec))
    _check_factories(spec)  # a broken user module fails here, not in every trial
    study_dir = (args.study_dir or Path("klstudy-runs") / spec.name).expanduser()
    print(f"study {spec.name!r}: {spec.n_trials()} trials -> {study_dir}", flush=True)
    _show_progress()
    try:
        summary = run_study(spec, text, study_dir=study_dir, address=args.address,
                            tracking_uri=args.tracking_uri, overwrite=args.overwrite)
    except StudyError as exc:
        raise UserError(str(exc)) from None
    return _print_summary(summary)


def _add_resume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="restore a killed study from its directory and finish it",
                       description="Continue an interrupted, killed or failed study: finished "
                       "trials are kept, unfinished ones go on from their last checkpoint.")
    p.add_argument("study_dir", type=Path, help="the study's directory")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: the one the study was run with)")
    p.add_argument("--allow-new-optuna", action="store_true",
                   help="go on when the Optuna storage lost the study (fresh pruner history)")
    p.set_defaults(handler=_cmd_resume)


def _cmd_resume(args: argparse.Namespace) -> int:
    from study._driver import StudyError, resume_study

    _show_progress()
    try:
        summary = resume_study(args.study_dir, address=args.address,
                               allow_new_optuna=args.allow_new_optuna)
    except StudyError as exc:
        raise UserError(str(exc)) from None
    return _print_summary(summary)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="summarise a study directory (starts nothing)")
    p.add_argument("study_dir", type=Path, help="the study's directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from study._driver import StudyError, study_status

    try:
        status = study_status(args.study_dir)
    except StudyError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(status, default=str))
        return 0
    c = status["counts"]
    print(f"study {status['name']!r} ({status['status']}) in {status['study_dir']}")
    interrupted = status.get("interrupted", 0)
    running = (f"{interrupted} interrupted (running when the study stopped)" if interrupted
               else f"{c['running']} running")
    print(f"  trials {status['n_trials']}: {c['completed']} completed, {c['pruned']} pruned, "
          f"{running}, {c['error']} failed, {c['pending']} pending")
    if status["best_trial"]:
        print(f"  best {status['objective']}: {status['best_value']:.4f} ({status['best_trial']})")
    from study._race_status import race_status_line

    if (race := race_status_line(status["study_dir"])) is not None:
        print(f"  {race}")
    print(f"  MLflow: {status['tracking_uri']}")
    if status.get("locked_by"):
        holder = status["locked_by"]
        print(f"  in use by pid {holder.get('pid')} on {holder.get('host')} "
              f"({holder.get('command')}, since {holder.get('since')})")
    elif status["status"] in ("running", "interrupted", "failed"):
        print(f"  not running now; continue it with: klstudy resume {status['study_dir']}")
    return 0


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run a study on a Ray cluster through the Ray Jobs API")
    p.add_argument("spec", type=Path)
    p.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://HOST:8265")
    p.add_argument("--study-dir", default=None,
                   help="study directory on the cluster (default: ~/klstudy-runs/<name> there)")
    p.add_argument("--tracking-uri", default=os.environ.get("KLSTUDY_TRACKING_URI"),
                   help="MLflow server URL every node can reach (default: "
                   "$KLSTUDY_TRACKING_URI); credentials travel in the job's environment")
    p.add_argument("--ship-code", action="store_true",
                   help="upload klstudy's packages with the job (cluster lacks klstudy)")
    p.add_argument("--python", default="python", help="python executable on the cluster")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.set_defaults(handler=_cmd_submit)


def _cmd_submit(args: argparse.Namespace) -> int:
    from study._jobs import check_cluster_tracking, follow_job, submit_study

    spec, _ = _load_spec(args.spec)
    _check_factories(spec, one_batch=False)  # the data may live on the cluster: imports only
    try:
        check_cluster_tracking(args.tracking_uri or spec.tracking.uri)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    study_dir = args.study_dir or f"~/klstudy-runs/{spec.name}"  # expanded on the cluster
    try:
        submission = submit_study(args.spec, address=args.address, study_dir=study_dir,
                                  tracking_uri=args.tracking_uri, ship_code=args.ship_code,
                                  python=args.python)
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(f"--address: could not submit to {args.address!r}: {exc}") from None
    print(f"submitted job {submission.job_id} to {args.address}; study dir on the cluster: "
          f"{study_dir}", flush=True)
    if not args.follow:
        return 0
    status = follow_job(submission, out=lambda text: print(text, flush=True))
    print(f"job {submission.job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1

# --- klstudy report / ui ----------------------------------------------------------------------
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the M-vs-R sensitivity report (HTML + PNGs + "
                                      "summary.json)")
    p.add_argument("study_dir", type=Path, nargs="?", default=None,
                   help="the study directory (or give --results)")
    p.add_argument("--results", type=Path, default=None, metavar="TABLE",
                   help="a CSV or Parquet table, one row per trial (n_cycles, ratio, ramp, "
                        "beta_max, seed, rec, kl, elbo; optional status, mi, au, iw_nll, ppl, "
                        "lr_schedule), instead of a study directory")
    p.add_argument("--objective", default=None, metavar="METRIC[:MODE]",
                   help="what the best set is chosen by, e.g. rec or elbo:max (default: the "
                        "study's objective; rec for --results)")
    p.add_argument("--out", type=Path, default=None,
                   help="default: STUDY_DIR/report, or TABLE's name + '-report' beside it")
    p.add_argument("--kl-threshold", type=float, default=0.1, metavar="NATS",
                   help="a trial uses z when its final validation KL ≥ this (default 0.1)")
    p.add_argument("--elbo-margin", type=float, default=None, metavar="NATS",
                   help="ELBO equivalence margin, nats per example (default: 2%% of the "
                        "monotonic arm's |ELBO|)")
    p.add_argument("--tracking-uri", default=None,
                   help="rebuild from this MLflow store (when the study's Parquet is gone)")
    p.set_defaults(handler=_cmd_report)


def _objective_arg(text: str | None):
    from analysis import Objective
    from analysis._noise import DEFAULT_MODES, OBJECTIVE_METRICS

    if text is None:
        return None
    metric, _, mode = text.partition(":")
    if metric not in OBJECTIVE_METRICS:
        raise UserError(f"--objective: metric must be one of {', '.join(OBJECTIVE_METRICS)}, "
                        f"got {metric!r}")
    mode = mode or DEFAULT_MODES[metric]
    if mode not in ("max", "min"):
        raise UserError(f"--objective: mode must be max or min, got {mode!r}")
    return Objective(metric, mode)


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis import ReportError, build_report
    from analysis._report import VerdictOptions, build_results_report

    if (args.study_dir is None) == (args.results is None):
        raise UserError("report: give a study directory or --results TABLE (one of them)")
    if not args.kl_threshold > 0:
        raise UserError(f"--kl-threshold: must be > 0 nats, got {args.kl_threshold}")
    if args.elbo_margin is not None and not args.elbo_margin > 0:
        raise UserError(f"--elbo-margin: must be > 0 nats, got {args.elbo_margin}")
    options = VerdictOptions(kl_threshold=args.kl_threshold, elbo_margin=args.elbo_margin)
    objective = _objective_arg(args.objective)
    try:
        if args.results is not None:
            result = build_results_report(args.results, out_dir=args.out, objective=objective,
                                          options=options)
        else:
            result = build_report(args.study_dir, out_dir=args.out,
                                  tracking_uri=args.tracking_uri, options=options,
                                  objective=objective)
    except ReportError as exc:
        raise UserError(str(exc)) from None
    note = " (PARTIAL: the study is still running)" if result.partial else ""
    print(f"report{note}: {result.html_path}")
    print(f"figures: {len(result.figure_paths)} PNGs in {result.html_path.parent}")
    if result.analysis is not None:
        print(f"summary: {result.summary_path}")
        print(f"verdict: {result.analysis.verdict} — {result.analysis.summary[0]}")
    if args.study_dir is not None:
        from study._race_report import add_race_section

        if (race := add_race_section(Path(args.study_dir), Path(result.html_path))) is not None:
            print(f"race section: {race}")
    return 0


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the MLflow UI of a study's tracking store on 127.0.0.1")
    p.add_argument("study_dir", type=Path, help="the study's directory")
    p.add_argument("--port", type=int, default=5000, help="TCP port on 127.0.0.1")
    p.set_defaults(handler=_cmd_ui)


def _check_port_free(port: int) -> None:
    """A UserError at once when ``port`` is taken on 127.0.0.1 (the MLflow server would fail
    to bind only after its start-up, ~14 s later)."""
    import socket

    if not 0 < port < 65536:
        raise UserError(f"--port: must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise UserError(f"--port: port {port} is in use on 127.0.0.1 ({exc.strerror}); "
                            "choose another with --port P") from None


def _cmd_ui(args: argparse.Namespace) -> int:
    from analysis import ReportError, serve_ui, stop_ui, ui_url, wait_for_health

    _check_port_free(args.port)
    try:
        url = ui_url(args.study_dir, port=args.port)
        proc = serve_ui(args.study_dir, port=args.port)
    except ReportError as exc:
        raise UserError(str(exc)) from None
    def stop(signum: int, frame: object) -> None:  # SIGTERM, SIGHUP (closed terminal)
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        print(f"starting the MLflow UI on 127.0.0.1:{args.port} ...", flush=True)
        if not wait_for_health(f"http://127.0.0.1:{args.port}", timeout_s=120, proc=proc):
            raise UserError(f"--port: the MLflow UI did not start on {args.port}; "
                            f"see {args.study_dir / 'mlflow-ui.log'}")
        print(f"MLflow UI: {url}  (Ctrl-C to stop)", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_ui(proc)
    return 0


# --- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="klstudy", description="KL-annealing schedule studies for VAEs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_validate, _add_run, _add_resume, _add_status, _add_submit, _add_report,
    _add_ui,
]


class _RedactingStream(io.TextIOBase):
    """stdout/stderr that never show a password in a URL, whoever writes (klstudy's own
    output, logging handlers, Ray's or MLflow's warnings): ``scheme://user:***@host``."""

    def __init__(self, stream: TextIO, fallback: TextIO | None = None) -> None:
        self._stream = stream
        self._fallback = fallback  # the process's own stream (sys.__stderr__)

    def _target(self) -> TextIO | None:
        """The wrapped stream, or the process's own once it was closed: a library that took
        this wrapper for its log handler during an in-process main() (Ray, MLflow) outlives
        the stream main() found (a test's capture), and must not fail on it later."""
        if not getattr(self._stream, "closed", False):
            return self._stream
        if self._fallback is not None and not getattr(self._fallback, "closed", False):
            return self._fallback
        return None

    def write(self, text: str) -> int:
        target = self._target()
        if target is not None:
            target.write(redact_text(text))
        return len(text)

    def flush(self) -> None:
        target = self._target()
        if target is not None:
            target.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        target = self._target()
        return target is not None and target.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding


def _redact_output() -> None:
    if not isinstance(sys.stdout, _RedactingStream):
        sys.stdout = _RedactingStream(sys.stdout, sys.__stdout__)
    if not isinstance(sys.stderr, _RedactingStream):
        sys.stderr = _RedactingStream(sys.stderr, sys.__stderr__)
    logging.captureWarnings(True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    streams = sys.stdout, sys.stderr
    _redact_output()  # before any handler takes a reference to the raw streams
    try:
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if not args.verbose:  # MLflow logs schema creation etc. at INFO on its own handler
            os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        return int(args.handler(args) or 0)
    except UserError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
