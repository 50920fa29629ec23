"""``klstudy train``, called in-process through ``study.cli.main``."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch

from study.cli import main

FAST = ["--eval-every", "10", "--iw-samples", "10", "--threads", "1", "--device", "cpu"]
FINAL_KEYS = {"rec", "kl", "elbo", "ppl", "au", "mi", "iw_nll"}


def _run(argv: Sequence[str]) -> int:
    """main()'s exit code; argparse's own errors leave through SystemExit."""
    try:
        return main(["train", *argv])
    except SystemExit as exc:
        return int(exc.code or 0)


def _train(*argv: str, total_steps: int = 20) -> int:
    return _run(["--total-steps", str(total_steps), *FAST, *argv])


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_json_flag_prints_final_metrics_last(capsys):
    assert _train("--json") == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("step 10/20") and lines[1].startswith("step 20/20")
    final = _last_json(out)
    assert FINAL_KEYS <= final.keys()
    assert final["elbo"] == pytest.approx(-(final["rec"] + final["kl"]))


def test_without_json_nothing_but_evaluation_lines_is_printed(capsys):
    assert _train() == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("step ") for line in lines)


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["--ratio", "1.5"], "error: --ratio: must be in [0, 1], got 1.5"),
        (["--ratio", "-0.5"], "error: --ratio:"),
        (["--n-cycles", "0"], "error: --n-cycles:"),
        (["--n-cycles", "21"], "error: --n-cycles:"),  # more cycles than the 20 steps
        (["--beta-max", "0"], "error: --beta-max:"),
        (["--lr", "-1"], "error: --lr:"),
        (["--data", "no/such/directory"], "error: --data:"),
        (["--ramp", "tanh"], "error:"),  # argparse choices
        (["--total-steps", "many"], "error:"),
    ],
)
def test_user_errors_exit_2_with_one_error_line(capsys, argv, prefix):
    assert _train(*argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), captured.err
    assert captured.out == ""


def test_data_directory_without_split_files_is_a_user_error(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("a b\n")
    assert _train("--data", str(tmp_path)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.path:")


def test_text_data_directory_trains(tmp_path, capsys):
    for split in ("train", "valid", "test"):
        (tmp_path / f"ptb.{split}.txt").write_text("the cat sat\nthe dog ran away\na cat\n")
    args = ["--data", str(tmp_path), "--model", "lstm_text", "--batch-size", "2", "--json"]
    assert _run(["--total-steps", "4", *FAST, *args]) == 0
    assert FINAL_KEYS <= _last_json(capsys.readouterr().out).keys()


def test_out_writes_checkpoint_config_evaluations_and_final(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train("--out", str(out), "--json", total_steps=25) == 0
    printed = _last_json(capsys.readouterr().out)
    assert {p.name for p in out.iterdir()} >= {
        "checkpoint.pt",
        "config.json",
        "evaluations.jsonl",
        "final.json",
        "timing.json",
    }
    assert json.loads((out / "final.json").read_text()) == printed
    rows = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [10, 20, 25]
    assert rows[-1]["valid/elbo"] == printed["elbo"] and "test/iw_nll" in rows[-1]
    config = json.loads((out / "config.json").read_text())
    assert (config["total_steps"], config["n_cycles"], config["seed"]) == (25, 4, 0)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 25


def _checkpoint_at(step: int, run_dir, target):
    """The checkpoint the run in ``run_dir`` had after ``step`` (same resolved config)."""
    from workers import TrialConfig, train_trial

    config = TrialConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    result = train_trial(config, checkpoint_dir=target, report=lambda ev: ev.step == step)
    assert result.step == step
    return target


def test_resume_continues_bit_for_bit_from_the_checkpoint(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train("--out", str(straight), "--json", total_steps=40) == 0
    expected = _last_json(capsys.readouterr().out)
    middle = _checkpoint_at(20, straight, tmp_path / "middle")
    assert _train("--resume", str(middle), "--out", str(resumed), "--json", total_steps=40) == 0
    assert _last_json(capsys.readouterr().out) == expected
    rows = [json.loads(line) for line in (resumed / "evaluations.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [30, 40]  # steps 1–20 came from the checkpoint
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["step"] == 40


def test_resume_with_another_total_steps_is_a_user_error(tmp_path, capsys):
    assert _train("--out", str(tmp_path)) == 0
    capsys.readouterr()
    assert _train("--resume", str(tmp_path), total_steps=40) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: resume: total_steps must be the checkpoint's 20 ")
    assert lines[0].endswith("got 40")


def test_out_records_where_the_time_went(tmp_path):
    assert _train("--out", str(tmp_path)) == 0
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing.keys() == {"train_s", "eval_s", "checkpoint_s"}
    assert timing["train_s"] > 0 and timing["eval_s"] > 0 and timing["checkpoint_s"] > 0


def test_default_evaluation_interval_is_a_tenth_of_training(capsys):
    assert _run(["--total-steps", "30", "--iw-samples", "0", "--threads", "1",
                 "--device", "cpu"]) == 0
    steps = [line.split()[1] for line in capsys.readouterr().out.strip().splitlines()]
    assert steps == [f"{3 * i}/30" for i in range(1, 11)]


def test_resume_with_another_schedule_is_a_user_error(tmp_path, capsys):
    assert _train("--out", str(tmp_path)) == 0
    capsys.readouterr()
    assert _train("--resume", str(tmp_path), "--n-cycles", "2") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: resume:") and "n_cycles" in lines[0]


def test_resume_from_a_missing_checkpoint_is_a_user_error(tmp_path, capsys):
    assert _train("--resume", str(tmp_path / "none")) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: resume: no checkpoint")


def test_resume_of_a_finished_trial_keeps_its_results(tmp_path, capsys):
    assert _train("--out", str(tmp_path), "--json") == 0
    before = _last_json(capsys.readouterr().out)
    code = _train("--resume", str(tmp_path), "--out", str(tmp_path), "--json")
    captured = capsys.readouterr()
    if code == 2:  # refusing with a clear error is fine too
        assert captured.err.startswith("error:")
        return
    assert code == 0 and FINAL_KEYS <= _last_json(captured.out).keys()
    assert json.loads((tmp_path / "final.json").read_text()) == before


@pytest.mark.parametrize(("mi", "shown"), [(-0.012, "mi ~0"), (-0.0004, "mi ~0"),
                                          (0.0, "mi 0.000"), (0.5, "mi 0.500")])
def test_an_evaluation_line_never_shows_a_negative_mutual_information(mi, shown):
    """I(z; x) ≥ 0: a negative Monte-Carlo estimate is noise around 0 and printed as ~0."""
    from study._cli_train import _format_evaluation
    from workers._trainer import Evaluation

    valid = {"rec": 1.0, "kl": 0.5, "elbo": -1.5, "ppl": 3.0, "au": 1, "mi": mi}
    ev = Evaluation(step=10, train={"beta": 1.0, "loss": 1.5}, valid=valid, test=None,
                    final=False, at_beta_max=True, checkpoint=None)
    line = _format_evaluation(ev, 20)
    assert line.endswith(shown) and "mi -" not in line, line
