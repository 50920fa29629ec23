"""``klstudy train --spec SPEC``: one trial of a study spec, the flags overriding its values."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from study.cli import main

FAST = ["--iw-samples", "0", "--threads", "1", "--device", "cpu"]


def _spec(tmp_path, **changes) -> str:
    spec = {"name": "train-spec", "model": {"kind": "toy"}, "data": {"kind": "toy"},
            "train": {"total_steps": 30, "batch_size": 10, "eval_every_steps": 15},
            "schedule": {"n_cycles": [2, 4], "ratio": [0.25, 0.5], "beta_min": [0.1, 0.2],
                         "lr_schedule": ["cyclical_cosine"], "lr_n_cycles": [3]},
            "seeds": [7, 8]}
    spec["train"]["free_bits"] = [0.05]
    for key, value in changes.items():
        spec[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _run(argv: list[str]) -> int:
    try:
        return main(["train", *argv])
    except SystemExit as exc:
        return int(exc.code or 0)


def test_the_spec_gives_every_value_its_axes_their_first_and_flags_override(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["--spec", _spec(tmp_path), "--ratio", "0.75", "--out", str(out), *FAST]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["15/30", "30/30"]  # the spec's T and interval
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["data"], config["total_steps"]) == ("toy", "toy", 30)
    assert (config["n_cycles"], config["ratio"], config["beta_min"]) == (2, 0.75, 0.1)
    assert (config["free_bits"], config["lr_n_cycles"], config["seed"]) == (0.05, 3, 7)
    assert config["lr_schedule"] == "cyclical_cosine"


def test_a_user_factory_trains_through_train_spec(tmp_path, capsys):
    (tmp_path / "tiny_vae_train.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        def load(n=30):
            x = (torch.rand(n, 5, generator=torch.Generator().manual_seed(1)) > 0.5).float()
            return {"train": x[:16], "valid": x[16:23], "test": x[23:]}

        class VAE(nn.Module):
            def __init__(self):
                super().__init__()
                self.enc, self.dec = nn.Linear(5, 4), nn.Linear(2, 5)

            def encode(self, x):
                return tuple(self.enc(x).chunk(2, dim=-1))

            def reconstruction_nll(self, x, z):
                x = x.repeat(z.shape[0] // x.shape[0], 1)
                return nn.functional.binary_cross_entropy_with_logits(
                    self.dec(z), x, reduction="none").sum(-1)

        def build(info):
            return VAE()
    '''))
    path = _spec(tmp_path, model={"kind": "python", "factory": "tiny_vae_train:build"},
                 data={"kind": "python", "factory": "tiny_vae_train:load"})
    assert _run(["--spec", path, "--json", "--total-steps", "12", *FAST]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["rec"] > 0 and final["kl"] >= 0 and final["ppl"] is None


@pytest.mark.parametrize(("argv", "prefix"), [
    (["--model", "lstm_text"], "error: --model: not used with --spec"),
    (["--data", "ptb"], "error: --data: not used with --spec"),
    (["--beta-min", "1.5"], "error: --beta-min:"),
    (["--free-bits", "-1"], "error: --free-bits:"),
])
def test_flags_that_do_not_fit_the_spec_are_one_error_line(tmp_path, capsys, argv, prefix):
    assert _run(["--spec", _spec(tmp_path), *argv, *FAST]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), captured.err
    assert captured.out == ""


def test_a_broken_user_module_is_named_by_its_spec_key(tmp_path, capsys):
    path = _spec(tmp_path, model={"kind": "python", "factory": "no_such_module_i18:build"},
                 data={"kind": "toy"})
    assert _run(["--spec", path, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: model.factory: module 'no_such_module_i18' not found"), err
