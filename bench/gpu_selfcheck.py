"""The CUDA checks of ``tests/workers/test_cuda.py`` without pytest (for a bare GPU machine).

``bench/gpu_check.sh`` runs the ``gpu`` tests with pytest when it can import it, else this:
the same properties, fewer variants, one line per check (``PASS``/``FAIL``/``SKIP``), exit
status 1 when any failed. ``--device cpu`` runs what applies off CUDA (smoke runs).

Run: ``PYTHONPATH=. python bench/gpu_selfcheck.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import workers
from workers import TrialConfig, train_trial
from workers._trainer import _Trainer

ELBO_RTOL = 1e-3  # resume on CUDA without `deterministic` (README, GPU workers)


def _config(device: str, **overrides: object) -> TrialConfig:
    values: dict[str, object] = {"total_steps": 40, "eval_every_steps": 10, "n_cycles": 2,
                                 "iw_samples": 10, "eval_batch_size": 10, "device": device}
    return TrialConfig(**(values | overrides))  # type: ignore[arg-type]


def _load(directory: Path) -> dict:
    return torch.load(directory / "checkpoint.pt", map_location="cpu", weights_only=True)


def check_trains(device: str, work: Path) -> str:
    result = train_trial(_config(device), checkpoint_dir=work)
    assert result.step == 40 and all(math.isfinite(v) for v in result.final.values())
    state = _load(work)
    assert state["format"] == 2 and "rng_cuda" not in state
    return f"valid ELBO {result.final['elbo']:.3f}"


def check_resume(device: str, work: Path, *, deterministic: bool) -> str:
    config = _config(device, deterministic=deterministic, dropout=0.3)
    straight = train_trial(config, checkpoint_dir=work / "a")
    train_trial(config, checkpoint_dir=work / "b", report=lambda ev: ev.step == 20)
    resumed = train_trial(config, checkpoint_dir=work / "c", resume_from=work / "b")
    a, c = _load(work / "a")["model"], _load(work / "c")["model"]
    diff = max(float((a[k] - c[k]).abs().max()) for k in a)
    if deterministic:
        assert diff == 0.0 and resumed.final == straight.final, f"max |Δparam| {diff:g}"
    else:
        assert math.isclose(resumed.final["elbo"], straight.final["elbo"], rel_tol=ELBO_RTOL)
    return f"max |Δparam| {diff:g}"


def check_cpu_restore(device: str, work: Path) -> str:
    train_trial(_config(device), checkpoint_dir=work, report=lambda ev: ev.step == 20)
    result = train_trial(_config("cpu"), resume_from=work, report=lambda ev: ev.step == 30)
    assert result.step == 30 and math.isfinite(result.final["elbo"])
    return "a checkpoint of this device continued on CPU"


def check_no_sync(device: str, work: Path) -> str:
    package = str(Path(workers.__file__).resolve().parent) + "/"
    trainer = _Trainer(_config(device, model="lstm_text").resolved(), None, torch.device(device))
    trainer.train_step(1)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(2, 30):
                trainer.train_step(t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    where = [f"{Path(w.filename).resolve()}:{w.lineno}" for w in caught
             if "synchroniz" in str(w.message)]
    ours = [w for w in where if w.startswith(package)]
    assert not ours, ours
    return f"{len(where)} syncs inside torch, none in workers/"


def check_bf16(device: str, work: Path) -> str:
    trainer = _Trainer(_config(device, precision="bf16").resolved(), None, torch.device(device))
    seen: list[tuple[bool, torch.dtype]] = []
    trainer.model.out.register_forward_hook(lambda m, a, out: seen.append((m.training, out.dtype)))
    trainer.train_step(1)
    trainer._evaluate_split("valid", final=False)
    assert (True, torch.bfloat16) in seen and (False, torch.float32) in seen, seen
    # The trajectories part within a few hundred steps (the toy is chaotic early on), so
    # only finiteness is asserted; bench/gpu_trials.py precision measures the difference.
    fp32 = train_trial(_config(device, total_steps=200, eval_every_steps=100)).final["elbo"]
    bf16 = train_trial(_config(device, total_steps=200, eval_every_steps=100,
                               precision="bf16")).final["elbo"]
    assert math.isfinite(bf16), bf16
    return f"valid ELBO at step 200: bf16 {bf16:.4f}, fp32 {fp32:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    device = p.parse_args(argv).device
    cuda = device.startswith("cuda")
    checks: list[tuple[str, Callable[[str, Path], str], bool]] = [
        ("a trial trains on the device", check_trains, True),
        ("deterministic resume is bit-for-bit",
         lambda d, w: check_resume(d, w, deterministic=True), True),
        (f"resume within rel {ELBO_RTOL} without deterministic",
         lambda d, w: check_resume(d, w, deterministic=False), True),
        ("its checkpoint resumes on CPU", check_cpu_restore, True),
        ("no host sync in klstudy's step code", check_no_sync, cuda),
        ("bf16 autocasts training only and trains", check_bf16, True),
    ]
    failed = 0
    for name, check, applies in checks:
        if not applies:
            print(f"SKIP  {name} (needs CUDA)")
            continue
        with tempfile.TemporaryDirectory() as work:
            try:
                print(f"PASS  {name}: {check(device, Path(work))}", flush=True)
            except Exception:  # noqa: BLE001 - every check runs and reports
                failed += 1
                print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)
    print(f"{len(checks) - failed} of {len(checks)} checks passed or skipped, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
