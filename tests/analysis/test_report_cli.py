"""``klstudy report --results TABLE``: the report and summary.json from a one-row-per-trial
table, and clear ``error:`` lines for malformed tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from study.cli import main


def _table(n_seeds: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(n_seeds):
        for m in (1, 4):
            for ratio in (0.5, 1.0):
                kl = rng.uniform(0.4, 0.8) if m == 4 else rng.uniform(0, 0.002)
                rec = 2.3 - 0.9 * kl + rng.normal(0, 0.01)
                rows.append({"n_cycles": m, "ratio": ratio, "ramp": "linear", "beta_max": 1.0,
                             "seed": seed, "rec": rec, "kl": kl, "elbo": -(rec + kl),
                             "mi": kl * 0.9, "au": float(m == 4)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_results_table_writes_report_and_summary(tmp_path, capsys, suffix):
    path = tmp_path / f"sweep{suffix}"
    table = _table()
    table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
    out = tmp_path / "out"
    assert main(["report", "--results", str(path), "--out", str(out), "--objective", "rec",
                 "--elbo-margin", "0.5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "cyclical_better"
    assert summary["uses_z"] == {"cyclical": [16, 16], "monotonic": [0, 16]}
    assert summary["settings"]["elbo_margin"] == 0.5
    assert (out / "report.html").is_file() and (out / "heatmap-final-uses_z.png").is_file()
    printed = capsys.readouterr().out
    assert "verdict: cyclical_better" in printed


def test_kl_threshold_option_changes_what_counts_as_using_z(tmp_path):
    path = tmp_path / "sweep.csv"
    _table().to_csv(path, index=False)
    assert main(["report", "--results", str(path), "--out", str(tmp_path / "o"),
                 "--kl-threshold", "5"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["uses_z"]["cyclical"][0] == 0 and summary["verdict"] == "no_difference_shown"


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.drop(columns="elbo"), "error: sweep.csv: missing column(s) elbo"),
    (lambda d: d.assign(ratio=np.where(d.index == 3, 7.0, d["ratio"])),
     "error: sweep.csv: ratio, line 5: must be in [0, 1], got 7.0"),
    (lambda d: d.assign(status=np.where(d.index == 0, "done", "completed")),
     "error: sweep.csv: status, line 2: must be one of"),
])
def test_malformed_table_is_one_error_line(tmp_path, capsys, change, message):
    path = tmp_path / "sweep.csv"
    change(_table()).to_csv(path, index=False)
    assert main(["report", "--results", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["report"], "error: report: give a study directory or --results TABLE"),
    (["report", "--results", "nowhere.csv"], "error: results table 'nowhere.csv' does not"),
    (["report", "--results", "x.csv", "--objective", "speed"], "error: --objective: metric"),
    (["report", "--results", "x.csv", "--kl-threshold", "0"], "error: --kl-threshold: must"),
])
def test_bad_arguments(capsys, argv, message):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(message)
