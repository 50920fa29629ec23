"""The ``klstudy`` command line.

Exit codes: 0 success, 2 user error (one ``error: <where>: <what>`` line on stderr, no
traceback), 1 internal failure. Heavy modules (torch, ray, mlflow) are imported by the
subcommand that needs them, so ``klstudy validate`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; printed as one ``error:`` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message}\n")


# --- klstudy train ----------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one trial (no Ray), printing each evaluation")
    p.add_argument("--model", choices=["toy", "lstm_text"], default="toy")
    p.add_argument("--data", default="toy", help="toy | ptb | a directory of train/valid/test .txt")
    p.add_argument("--n-cycles", type=int, default=4, help="M, number of β cycles")
    p.add_argument("--ratio", type=float, default=0.5, help="R, proportion of a cycle spent ramping")
    p.add_argument("--ramp", choices=["linear", "sigmoid", "cosine"], default="linear")
    p.add_argument("--beta-max", type=float, default=1.0)
    p.add_argument("--total-steps", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="default: 10 (toy), 32 (text)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=["constant", "cyclical_cosine"], default="constant")
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--eval-every", type=int, default=None, help="steps; default: total/20")
    p.add_argument("--iw-samples", type=int, default=500, help="K of the final IW-NLL; 0 skips")
    p.add_argument("--max-train-sentences", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest for the toy; try 2-4 for lstm_text)")
    p.add_argument("--out", type=Path, default=None, help="directory for checkpoint and results")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint file or directory")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON, last")
    p.set_defaults(handler=_cmd_train)


def _train_config(args: argparse.Namespace):  # -> TrialConfig
    from workers import ConfigError, TrialConfig

    if args.data in ("toy", "ptb"):
        data, data_path = args.data, None
    else:
        data, data_path = "text", str(args.data)
        if not Path(data_path).is_dir():
            raise UserError(f"--data: must be toy, ptb or an existing directory, got {args.data!r}")
    text_model = args.model == "lstm_text"
    config = TrialConfig(
        model=args.model,
        data=data,
        data_path=data_path,
        max_train_sentences=args.max_train_sentences,
        total_steps=args.total_steps,
        batch_size=args.batch_size or (32 if text_model else 10),
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        grad_clip=args.grad_clip,
        n_cycles=args.n_cycles,
        ratio=args.ratio,
        ramp=args.ramp,
        beta_max=args.beta_max,
        eval_every_steps=args.eval_every or max(1, args.total_steps // 20),
        eval_batch_size=256,
        iw_samples=args.iw_samples,
        seed=args.seed,
        device=args.device,
        num_threads=args.threads,
        trial_id=f"train-seed{args.seed}",
    )
    try:
        config.check()
    except ConfigError as exc:
        raise UserError(f"--{exc.field.replace('_', '-')}: {exc.message}") from None
    return config


def _format_evaluation(ev, total_steps: int) -> str:
    v, t = ev.valid, ev.train
    line = (
        f"step {ev.step:>{len(str(total_steps))}}/{total_steps}  beta {t['beta']:.3f}  "
        f"loss {t['loss']:.3f}  valid: rec {v['rec']:.3f} kl {v['kl']:.3f} elbo {v['elbo']:.3f} "
        f"ppl {v['ppl']:.2f} au {v['au']:.0f} mi {v['mi']:.3f}"
    )
    if "iw_nll" in v:
        line += f" iw_nll {v['iw_nll']:.3f}"
    return line


def _cmd_train(args: argparse.Namespace) -> int:
    from workers import CheckpointError, DataError, train_trial

    config = _train_config(args)
    out: Path | None = args.out
    history = []

    def report(ev) -> None:
        print(_format_evaluation(ev, config.total_steps), flush=True)
        history.append({"step": ev.step, **ev.flat()})

    try:
        result = train_trial(config, report=report, checkpoint_dir=out, resume_from=args.resume)
    except (DataError, CheckpointError) as exc:
        raise UserError(str(exc)) from None
    if not result.evaluations:
        raise UserError(f"--resume: the checkpoint is already at step {result.step} of "
                        f"--total-steps {config.total_steps}; nothing left to train")
    final = dict(result.final)
    if out is not None:
        mode = "a" if args.resume is not None else "w"  # a resumed run extends its history
        with open(out / "evaluations.jsonl", mode) as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        (out / "final.json").write_text(json.dumps(final, indent=2))
    if args.json:
        print(json.dumps(final))
    return 0


# --- klstudy validate / run / resume / status / submit ----------------------------------------
def _load_spec(path: Path):  # -> (StudySpec, text)
    from study._spec import SpecError, load_spec

    try:
        spec = load_spec(path)
    except SpecError as exc:
        raise UserError(str(exc)) from None
    return spec, path.read_text()


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a study spec and print how many trials it expands to")
    p.add_argument("spec", type=Path)
    p.set_defaults(handler=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    spec, _ = _load_spec(args.spec)
    axes = spec.search_space()
    shape = " x ".join(f"{len(v)} {k}" for k, v in axes.items())
    print(f"{args.spec}: ok — study {spec.name!r}, {spec.n_trials()} trials "
          f"({spec.search.kind}: {shape} x {len(spec.seeds)} seeds)")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a study to the end (embedded Ray and MLflow by default)")
    p.add_argument("spec", type=Path)
    p.add_argument("--study-dir", type=Path, default=None, help="default: ./klstudy-runs/<name>")
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded Ray)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in the study dir)")
    p.set_defaults(handler=_cmd_run)


def _show_progress() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    progress = logging.getLogger("klstudy.progress")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False


def _print_summary(summary) -> None:
    c = summary.counts
    print(f"study {summary.name!r} finished in {summary.wall_s:.0f} s: {c.get('completed', 0)} completed, "
          f"{c.get('pruned', 0)} pruned, {c.get('error', 0)} failed")
    if summary.best_trial:
        print(f"best validation ELBO {summary.best_elbo:.4f}: {summary.best_trial}")
    print(f"study dir: {summary.study_dir}")
    print(f"MLflow: {summary.tracking_uri} (parent run {summary.parent_run_id}); "
          f"report: klstudy report {summary.study_dir}")


def _cmd_run(args: argparse.Namespace) -> int:
    from study._driver import StudyError, run_study

    spec, text = _load_spec(args.spec)
    study_dir = (args.study_dir or Path("klstudy-runs") / spec.name).expanduser()
    print(f"study {spec.name!r}: {spec.n_trials()} trials -> {study_dir}", flush=True)
    _show_progress()
    try:
        summary = run_study(spec, text, study_dir=study_dir, address=args.address,
                            tracking_uri=args.tracking_uri)
    except StudyError as exc:
        raise UserError(str(exc)) from None
    _print_summary(summary)
    return 0 if summary.counts.get("completed", 0) + summary.counts.get("pruned", 0) else 1


def _add_resume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="restore a killed study from its directory and finish it")
    p.add_argument("study_dir", type=Path)
    p.add_argument("--address", default=None, help="Ray cluster address (default: as recorded)")
    p.set_defaults(handler=_cmd_resume)


def _cmd_resume(args: argparse.Namespace) -> int:
    from study._driver import StudyError, resume_study

    _show_progress()
    try:
        summary = resume_study(args.study_dir, address=args.address)
    except StudyError as exc:
        raise UserError(str(exc)) from None
    _print_summary(summary)
    return 0


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="summarise a study directory (starts nothing)")
    p.add_argument("study_dir", type=Path)
    p.add_argument("--json", action="store_true")
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
    print(f"  trials {status['n_trials']}: {c['completed']} completed, {c['pruned']} pruned, "
          f"{c['running']} running, {c['error']} failed, {c['pending']} pending")
    if status["best_trial"]:
        print(f"  best validation ELBO {status['best_elbo']:.4f}: {status['best_trial']}")
    print(f"  MLflow: {status['tracking_uri']}")
    return 0


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run a study on a Ray cluster through the Ray Jobs API")
    p.add_argument("spec", type=Path)
    p.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://HOST:8265")
    p.add_argument("--study-dir", default=None,
                   help="study directory on the cluster (default: ~/klstudy-runs/<name> there)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI the cluster can reach")
    p.add_argument("--ship-code", action="store_true",
                   help="upload klstudy's packages with the job (cluster lacks klstudy)")
    p.add_argument("--python", default="python", help="python executable on the cluster")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.set_defaults(handler=_cmd_submit)


def _cmd_submit(args: argparse.Namespace) -> int:
    from study._jobs import follow_job, submit_study

    spec, _ = _load_spec(args.spec)
    study_dir = args.study_dir or f"~/klstudy-runs/{spec.name}"  # expanded on the cluster
    try:
        submission = submit_study(args.spec, address=args.address, study_dir=study_dir,
                                  tracking_uri=args.tracking_uri, ship_code=args.ship_code,
                                  python=args.python)
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(f"--address: could not submit to {args.address!r}: {exc}") from None
    print(f"submitted job {submission.job_id} to {args.address}; study dir on the cluster: {study_dir}",
          flush=True)
    if not args.follow:
        return 0
    status = follow_job(submission, out=lambda text: print(text, flush=True))
    print(f"job {submission.job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1

# --- klstudy report / ui ----------------------------------------------------------------------
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the M-vs-R sensitivity report (HTML + PNGs)")
    p.add_argument("study_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: STUDY_DIR/report")
    p.add_argument("--tracking-uri", default=None,
                   help="rebuild from this MLflow store (when the study's Parquet is gone)")
    p.set_defaults(handler=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis import ReportError, build_report

    try:
        result = build_report(args.study_dir, out_dir=args.out, tracking_uri=args.tracking_uri)
    except ReportError as exc:
        raise UserError(str(exc)) from None
    note = " (PARTIAL: the study is still running)" if result.partial else ""
    print(f"report{note}: {result.html_path}")
    print(f"figures: {len(result.figure_paths)} PNGs in {result.html_path.parent}")
    return 0


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the MLflow UI of a study's tracking store on 127.0.0.1")
    p.add_argument("study_dir", type=Path)
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(handler=_cmd_ui)


def _cmd_ui(args: argparse.Namespace) -> int:
    from analysis import ReportError, serve_ui, stop_ui, ui_url, wait_for_health

    try:
        url = ui_url(args.study_dir, port=args.port)
        proc = serve_ui(args.study_dir, port=args.port)
    except ReportError as exc:
        raise UserError(str(exc)) from None
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
    parser = _Parser(prog="klstudy", description="KL-annealing schedule studies for VAEs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_validate, _add_run, _add_resume, _add_status, _add_submit, _add_report, _add_ui,
]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
