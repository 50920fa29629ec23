"""The evidence pages match what ``python -m analysis.evidence`` produces from the committed
per-trial files."""

from __future__ import annotations

import json
import shutil

import pytest

from analysis import ReportError
from analysis.evidence import ROOT, blocks, fill, main

EVIDENCE = ROOT / "docs" / "evidence.md"


def test_docs_evidence_matches_the_command_output():
    text = EVIDENCE.read_text()
    assert "<!-- evidence:begin studies -->" in text
    assert fill(text, blocks(), where=str(EVIDENCE)) == text, (
        "docs/evidence.md differs from the committed data: run "
        "python -m analysis.evidence docs/evidence.md")


def test_every_markdown_with_evidence_blocks_is_current():
    """README.md (and any docs page) may carry the same markers: they must be current too."""
    available = blocks()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text()
        if "<!-- evidence:begin" in text:
            assert fill(text, available, where=str(path)) == text, f"{path} is stale"


def test_a_typed_number_fails_the_check(tmp_path, capsys):
    page = tmp_path / "page.md"
    text = EVIDENCE.read_text()
    assert "28/180" in text
    page.write_text(text.replace("28/180", "29/180", 1))
    assert main([str(page), "--check"]) == 1
    assert "differ from the committed data" in capsys.readouterr().out
    assert main([str(page)]) == 0 and page.read_text() == text  # the command repairs it


def test_unknown_block_is_an_error(tmp_path):
    with pytest.raises(ReportError, match="evidence block 'nope' is unknown"):
        fill("<!-- evidence:begin nope -->\nx\n<!-- evidence:end nope -->", blocks())


def test_committed_summary_json_agrees_with_the_committed_trials():
    from analysis import analyse_trials, read_results

    study = ROOT / "docs" / "results" / "paper_toy"
    summary = json.loads((study / "summary.json").read_text())
    again = analyse_trials(read_results(study / "trials.csv"), objective="rec")
    assert summary["verdict"] == again.verdict
    assert summary["uses_z"] == again.uses_z
    assert summary["primary"]["p"] == pytest.approx(again.primary["p"])


def test_a_study_without_per_trial_table_makes_no_claim(tmp_path):
    root = tmp_path / "repo"
    (root / "docs" / "results" / "old").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "results" / "paper_toy" / "trials.csv",
                (root / "docs" / "results").joinpath("toy").mkdir() or
                root / "docs" / "results" / "toy" / "trials.csv")
    table = blocks(root)["studies"]()
    assert "| old | — |" in table and "no per-trial table committed: no claim" in table
    assert "| toy | toy/trials.csv | 240 | 5 |" in table
