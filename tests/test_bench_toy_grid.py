"""``bench/toy_grid.py``: the "which trials use z" tables of a toy grid study."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
toy_grid = pytest.importorskip("toy_grid")


def test_tables_count_trials_using_z_per_cell_ramp_and_family():
    rows = [(1, 0.5, "linear", 0.0, 2.30), (1, 0.5, "cosine", 0.02, 2.30),
            (4, 0.5, "linear", 0.6, 1.70), (4, 0.5, "cosine", 0.05, 2.28),
            (4, 1.0, "linear", 0.1, 2.10)]  # 0.1 counts: the threshold is inclusive
    done = pd.DataFrame(rows, columns=["n_cycles", "ratio", "ramp", "kl", "rec"])
    text = "\n".join(toy_grid.tables(done, 0.1))
    assert "| 1 | 0.5 | 0/2 | [0.00, 0.66] | 0.010 | 2.300 |" in text
    assert "| 4 | 0.5 | 1/2 |" in text and "| 4 | 1 | 1/1 |" in text
    assert "| linear | 4 | 2/2 |" in text and "| cosine | 4 | 0/1 |" in text
    assert "| monotonic (M = 1) | 0/2 |" in text and "| cyclical (M > 1) | 2/3 |" in text
    assert "Fisher's exact test, cyclical vs monotonic share: p = 0.4." in text
