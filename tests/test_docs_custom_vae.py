"""docs/custom-vae.md: its complete minimal example (module + spec) is extracted from the page
and run, so the page cannot drift from the contract; what it says validate prints is checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

from study.cli import main

PAGE = Path(__file__).resolve().parent.parent / "docs" / "custom-vae.md"


def _block(first_line: str) -> str:
    """The fenced code block of the page whose first line is ``first_line``."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)
    found = [b for b in blocks if b.splitlines()[0] == first_line]
    assert len(found) == 1, f"{PAGE.name}: {len(found)} blocks start with {first_line!r}"
    return found[0]


def _write_example(tmp_path: Path) -> Path:
    (tmp_path / "my_vae.py").write_text(_block("# my_vae.py"))
    spec = tmp_path / "my_vae.yaml"
    spec.write_text(_block("# my_vae.yaml"))
    return spec


def test_the_pages_example_validates_as_the_page_says(tmp_path, capsys):
    spec = _write_example(tmp_path)
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    text = PAGE.read_text(encoding="utf-8")
    claimed = re.search(r"`klstudy validate` prints `(\d+) trials` and the batch it checked "
                        r"\(`(one batch on CPU: [^…]*)…`\)", text.replace("\n", " "))
    assert claimed, "the page no longer says what validate prints"
    assert f"{claimed.group(1)} trials" in out
    assert claimed.group(2).strip() in out.replace("\n", " "), out


def test_the_pages_example_trains_one_trial_with_dict_batches_and_free_bits(tmp_path, capsys):
    spec = _write_example(tmp_path)
    assert main(["train", "--spec", str(spec), "--total-steps", "40", "--eval-every", "20",
                 "--free-bits", "0.1", "--iw-samples", "5", "--threads", "1", "--device",
                 "cpu", "--json"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < final["rec"] < 16 * 0.6932 + 1  # 16 binary pixels: below a coin flip's NLL + 1
    assert final["kl"] > 0 and final["ppl"] is None
