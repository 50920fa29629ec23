"""Helpers shared by the benchmark scripts: confidence intervals, markdown tables, run headers.

The scripts are run as plain files from the repository root (``python bench/paper_toy.py``):
Python puts ``bench/`` on ``sys.path``, so ``import _common`` works, and ``workers`` comes from the
project's (editable) install.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width of the mean (Student's t, n − 1 degrees of freedom).

    One value gives a half-width of NaN (no spread can be estimated).
    """
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = float(stats.t.ppf(0.975, n - 1)) * math.sqrt(var / n)
    return mean, half


def fmt_ci(values: Sequence[float], digits: int = 3) -> str:
    mean, half = ci95(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that started this process, as it could be typed again from the repo root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO_ROOT)
    except ValueError:
        pass
    return shlex.join([sys.executable, str(script), *sys.argv[1:]])


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
            text=True, check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
        capture_output=True, text=True,
    ).stdout.strip()
    return out.stdout.strip() + ("+uncommitted changes" if dirty else "")


def environment_line() -> str:
    import torch

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"git {git_revision()}"
    )


def write_output(path: str | None, text: str) -> None:
    if path is None:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


CLK_TCK = os.sysconf("SC_CLK_TCK")  # /proc CPU times are in these ticks


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLK_TCK, sum(values) / CLK_TCK


def quiet_wait(max_wait_s: float, threshold: float = 0.25) -> None:
    """Wait (at most ``max_wait_s``) until the machine is < ``threshold`` busy over 5 s;
    prints the busy share it measured last."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, total0 = machine_busy()
        time.sleep(5)
        busy1, total1 = machine_busy()
        fraction = (busy1 - busy0) / max(total1 - total0, 1e-9)
        if fraction < threshold or time.monotonic() >= deadline:
            print(f"machine {100 * fraction:.0f}% busy before the phase")
            return
