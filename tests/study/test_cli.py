"""The CLI never sends a user in a circle: what `run` and `resume` say about a study directory
that already holds a study, every spec problem at once, a busy UI port at once, and `--help`
that explains every option with its default. No Ray: the study directories are written here."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import pytest
import yaml

from study._driver import _redacted_spec
from study._spec import parse_spec
from study.cli import build_parser, main

SPEC = {"name": "cli", "model": {"kind": "toy"}, "data": {"kind": "toy"},
        "train": {"total_steps": 100, "eval_every_steps": 50},
        "schedule": {"n_cycles": [1, 2], "ratio": [0.5]}, "seeds": [0]}


def study_dir_with(tmp_path: Path, status: str, spec: dict = SPEC) -> tuple[Path, Path]:
    """(spec file, a study directory holding that study with ``status``) as a driver leaves
    them (study.json; no trial records needed by these messages)."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    meta = {"name": "cli", "status": status, "n_trials": 2,
            "spec": _redacted_spec(parse_spec(spec, base_dir=tmp_path)),
            "tracking_uri": f"sqlite:///{study_dir / 'mlflow.db'}", "experiment_id": "1",
            "parent_run_id": "p" * 32, "objective": {"metric": "elbo", "mode": "max"}}
    (study_dir / "study.json").write_text(json.dumps(meta))
    return spec_file, study_dir


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_on_the_same_finished_study_is_a_no_op_so_run_and_report_can_run_again(
        tmp_path, capsys, monkeypatch):
    spec_file, study_dir = study_dir_with(tmp_path, "finished")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in study_dir.iterdir())
    code, out, err = run(capsys, "run", str(spec_file), "--study-dir", str(study_dir))
    assert code == 0, out + err  # `klstudy run SPEC && klstudy report DIR` goes on to report
    assert "already finished" in out and f"klstudy report {study_dir}" in out
    assert "--overwrite" in out
    assert sorted(p.name for p in study_dir.iterdir()) == before  # nothing started


def test_run_on_a_finished_study_of_another_spec_says_what_to_do(tmp_path, capsys,
                                                                 monkeypatch):
    other = {**SPEC, "seeds": [0, 1]}
    spec_file, study_dir = study_dir_with(tmp_path, "finished", other)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "run", str(spec_file), "--study-dir", str(study_dir))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --study-dir: "), err
    assert "another spec (seeds differ)" in lines[0]
    assert "new --study-dir" in lines[0] and "--overwrite" in lines[0]


def test_run_on_an_interrupted_study_points_at_resume_and_overwrite(tmp_path, capsys,
                                                                    monkeypatch):
    spec_file, study_dir = study_dir_with(tmp_path, "interrupted")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "run", str(spec_file), "--study-dir", str(study_dir))
    assert code == 2 and f"klstudy resume {study_dir}" in err and "--overwrite" in err, err
    assert "2 of 2 trials unfinished" in err


def test_resume_of_a_finished_study_points_at_report_and_run_again(tmp_path, capsys):
    _, study_dir = study_dir_with(tmp_path, "finished")
    code, _, err = run(capsys, "resume", str(study_dir))
    assert code == 2 and "already finished" in err, err
    assert f"klstudy report {study_dir}" in err and "--overwrite" in err
    assert "klstudy resume" not in err  # never back to where the user came from


def test_validate_reports_every_problem_at_once(tmp_path, capsys):
    bad = {**SPEC, "model": {"kind": "toy", "latnt_dim": 2},
           "train": {"total_steps": 0, "lr": "fast"},
           "schedule": {"n_cycles": [1, 0], "ratio": [1.5, 0.5]}}
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(yaml.safe_dump(bad))
    code, _, err = run(capsys, "validate", str(spec_file))
    lines = err.strip().splitlines()
    assert code == 2 and all(line.startswith("error: ") for line in lines), err
    assert [line.split(":")[1].strip() for line in lines] == [
        "model.latnt_dim", "train.total_steps", "train.lr", "schedule.n_cycles[1]",
        "schedule.ratio[0]"], err
    assert "did you mean 'latent_dim'" in lines[0]


def test_ui_on_a_busy_port_says_so_at_once(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run(capsys, "ui", str(tmp_path), "--port", str(port))
    assert code == 2 and err.strip() == (
        f"error: --port: port {port} is in use on 127.0.0.1 (Address already in use); "
        "choose another with --port P"), err


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", ["train", "validate", "run", "resume", "status", "ui"])
def test_help_explains_every_argument(command: str) -> None:
    parser = _subcommands()[command]
    for action in parser._actions:
        assert action.help, (command, action.dest)


@pytest.mark.parametrize(("command", "shown"), [
    ("train", ["(default: 4000)", "(default: 0.5)", "(default: linear)", "(default: 0)"]),
    ("run", ["default: ./klstudy-runs/<name>", "default: embedded Ray", "--overwrite"]),
    ("ui", ["(default: 5000)"]),
])
def test_help_shows_the_defaults(command: str, shown: list[str], monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside a default
    text = " ".join(_subcommands()[command].format_help().split())
    for item in shown:
        assert item in text, (command, item)


def test_a_log_handler_made_during_main_survives_the_stream_main_found_closing(
        tmp_path, monkeypatch) -> None:
    """Ray and MLflow take sys.stderr for their log handlers when first imported, which an
    in-process main() may do while its redacting wrapper is installed; when the stream main()
    wrapped (a test's capture) is closed, their later records must not raise "I/O operation on
    closed file" (they go to the process's own stderr instead, still redacted)."""
    import io
    import logging

    import study.cli as cli

    captured, process = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", captured)
    monkeypatch.setattr("sys.__stderr__", process)
    handler = None

    def validate_and_take_stderr(args):  # a library configuring its handler inside main()
        nonlocal handler
        handler = logging.StreamHandler(cli.sys.stderr)
        return 0

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    parser = build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: _with_handler(parser,
                                                                   validate_and_take_stderr))
    assert main(["validate", str(spec)]) == 0
    captured.close()
    failures = []
    monkeypatch.setattr(logging, "raiseExceptions", True)
    monkeypatch.setattr(handler, "handleError", lambda record: failures.append(record))
    logger = logging.getLogger("test-closed-stream")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("lost at postgresql://u:secret@db:5432/x")
    finally:
        logger.removeHandler(handler)
    assert not failures
    assert "u:***@db" in process.getvalue() and "secret" not in process.getvalue()


def _with_handler(parser: argparse.ArgumentParser, handler) -> argparse.ArgumentParser:
    """parser with the validate subcommand's handler replaced."""
    for action in parser._subparsers._group_actions:
        action.choices["validate"].set_defaults(handler=handler)
    return parser
