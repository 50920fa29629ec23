"""The CUDA path: tests marked ``gpu`` run only where torch sees a CUDA device.

Tolerance of a resume on CUDA (README, GPU workers): with ``deterministic`` a resumed trial
equals the uninterrupted one bit for bit; without it cuDNN and atomics may reorder float sums,
so a resumed 40-step toy trial's parameters stay within 1e-4 and its validation ELBO within
1e-3 relative of the uninterrupted run's.

The unmarked tests check, on any machine, what the CUDA path is built from: the spec's GPU
share and precision reaching the trial config, and a clear error where CUDA is asked for but
absent. ``bash bench/gpu_check.sh OUTDIR`` runs the ``gpu`` tests on a GPU machine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from workers import CheckpointError, ConfigError, TrialConfig, train_trial

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.is_available() is False)")
PARAMS_ATOL, ELBO_RTOL = 1e-4, 1e-3  # resume on CUDA without `deterministic` (module docstring)


def _config(**overrides: Any) -> TrialConfig:
    values: dict[str, Any] = {"total_steps": 40, "eval_every_steps": 10, "n_cycles": 2,
                              "ratio": 0.5, "iw_samples": 10, "eval_batch_size": 10,
                              "device": "cuda", "num_threads": 1}
    return TrialConfig(**(values | overrides))


def _load(directory: Path) -> dict[str, Any]:
    return torch.load(directory / "checkpoint.pt", map_location="cpu", weights_only=True)


def _stop_at(step: int):
    return lambda ev: ev.step == step


# --- on any machine ----------------------------------------------------------------------------
@pytest.mark.parametrize(("gpus", "device", "fraction"),
                         [(0.25, "cuda", 0.25), (0.5, "cuda", 0.5), (1, "cuda", None),
                          (2, "cuda", None), (0, "cpu", None)])
def test_the_specs_gpu_share_becomes_the_trials_device_and_memory_fraction(gpus, device, fraction):
    pytest.importorskip("pydantic")
    from study._spec import parse_spec

    spec = parse_spec({"name": "gpu", "model": {"kind": "toy"}, "data": {"kind": "toy"},
                       "train": {"total_steps": 100, "precision": "bf16"},
                       "schedule": {"n_cycles": [1], "ratio": [0.5]}, "seeds": [0],
                       "resources": {"cpus_per_trial": 2, "gpus_per_trial": gpus}})
    config = spec.grid_configs()[0]
    assert (config.device, config.gpu_memory_fraction) == (device, fraction)
    assert (config.precision, config.num_threads) == ("bf16", 2)
    config.check()


@pytest.mark.parametrize(("field", "value"), [("precision", "fp16"), ("gpu_memory_fraction", 0.0),
                                              ("gpu_memory_fraction", 1.5)])
def test_precision_and_gpu_share_are_checked(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: .*got {value!r}"):
        TrialConfig(**{field: value}).check()


@pytest.mark.skipif(CUDA, reason="checks the error of a machine without CUDA")
def test_a_cuda_trial_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^device: CUDA is not available .*got 'cuda'"):
        train_trial(_config(total_steps=2))


def test_cpu_trials_keep_torchs_default_adam():
    from workers._device import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert not make_optimizer(params, TrialConfig(), torch.device("cpu")).defaults.get("fused")


# --- on CUDA -----------------------------------------------------------------------------------
@gpu
@needs_cuda
def test_a_cuda_trial_trains_on_the_gpu_with_fused_adam(tmp_path):
    from workers._trainer import _Trainer

    trainer = _Trainer(_config().resolved(), None, torch.device("cuda", 0))
    assert next(trainer.model.parameters()).is_cuda and trainer.optimizer.defaults["fused"]
    result = train_trial(_config(), checkpoint_dir=tmp_path)
    assert result.status == "completed" and result.step == 40
    assert all(math.isfinite(v) for v in result.final.values())
    state = _load(tmp_path)
    assert state["format"] == 2 and "rng_cuda" not in state
    assert state["rng_device"].dtype == torch.uint8  # the trial device's state only


def _sync_warnings(run) -> list[str]:
    """Where (file:line of the innermost Python frame) ``run()`` made CUDA sync with the host."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).resolve()}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message)]


@gpu
@needs_cuda
@pytest.mark.parametrize("model", ["toy", "lstm_text"])
def test_klstudys_training_step_code_never_syncs_with_the_host(tmp_path, model):
    # torch's own kernels may sync inside backward (embedding backward counts its segments);
    # those warnings point into torch. None may point into workers/: the step's own code.
    import workers
    from workers._trainer import _Trainer

    package = str(Path(workers.__file__).resolve().parent) + "/"
    for precision in ("fp32", "bf16"):
        config = _config(precision=precision, model=model)
        trainer = _Trainer(config.resolved(), None, torch.device("cuda", 0))
        trainer.train_step(1)  # builds the split tensors
        where = _sync_warnings(lambda tr=trainer: [tr.train_step(t) for t in range(2, 30)])
        ours = [w for w in where if w.startswith(package)]
        assert not ours, ours
        trainer.check_finite()


@gpu
@needs_cuda
def test_a_deterministic_cuda_trial_resumes_bit_for_bit(tmp_path):
    config = _config(deterministic=True, dropout=0.3)
    straight = train_trial(config, checkpoint_dir=tmp_path / "straight")
    train_trial(config, checkpoint_dir=tmp_path / "first", report=_stop_at(20))
    resumed = train_trial(config, checkpoint_dir=tmp_path / "resumed",
                          resume_from=tmp_path / "first")
    a, b = _load(tmp_path / "straight"), _load(tmp_path / "resumed")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert torch.equal(a["rng_device"], b["rng_device"])
    assert [(e.train, e.valid, e.test) for e in resumed.evaluations] == [
        (e.train, e.valid, e.test) for e in straight.evaluations[2:]]


@gpu
@needs_cuda
def test_a_cuda_trial_resumes_within_the_stated_tolerance(tmp_path):
    config = _config(dropout=0.3)
    straight = train_trial(config, checkpoint_dir=tmp_path / "straight")
    train_trial(config, checkpoint_dir=tmp_path / "first", report=_stop_at(20))
    resumed = train_trial(config, checkpoint_dir=tmp_path / "resumed",
                          resume_from=tmp_path / "first")
    a, b = _load(tmp_path / "straight"), _load(tmp_path / "resumed")
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], atol=PARAMS_ATOL, rtol=0), name
    assert resumed.final["elbo"] == pytest.approx(straight.final["elbo"], rel=ELBO_RTOL)


@gpu
@needs_cuda
def test_a_cuda_checkpoint_resumes_on_cpu(tmp_path):
    train_trial(_config(), checkpoint_dir=tmp_path, report=_stop_at(20))
    saved = _load(tmp_path)
    result = train_trial(_config(device="cpu", total_steps=40), resume_from=tmp_path,
                         report=_stop_at(30))
    assert (result.status, result.step) == ("stopped", 30)
    assert all(math.isfinite(v) for v in result.final.values())
    assert saved["step"] == 20


@gpu
@needs_cuda
@pytest.mark.parametrize("written_as", ["format-2-cuda3", "format-1-eight-gpus"])
def test_a_checkpoint_from_a_machine_with_another_gpu_count_resumes(tmp_path, written_as):
    train_trial(_config(), checkpoint_dir=tmp_path, report=_stop_at(20))
    state = _load(tmp_path)
    state["config"]["device"] = "cuda:3"
    if written_as == "format-1-eight-gpus":
        state["format"] = 1
        state["rng_cuda"] = [state.pop("rng_device")] * 8
    torch.save(state, tmp_path / "checkpoint.pt")
    result = train_trial(_config(device="cuda:0"), resume_from=tmp_path)
    assert result.step == 40 and math.isfinite(result.final["elbo"])


@gpu
@needs_cuda
def test_bf16_autocasts_training_only_and_trains():
    from workers._trainer import _Trainer

    trainer = _Trainer(_config(precision="bf16").resolved(), None, torch.device("cuda", 0))
    dtypes: list[tuple[bool, torch.dtype]] = []
    trainer.model.out.register_forward_hook(
        lambda module, args, out: dtypes.append((module.training, out.dtype)))
    trainer.train_step(1)
    trainer._evaluate_split("valid", final=False)
    assert (True, torch.bfloat16) in dtypes
    assert {d for training, d in dtypes if not training} == {torch.float32}
    # Trajectories part within a few hundred toy steps, so only finiteness is asserted here;
    # bench/gpu_trials.py precision measures the ELBO difference.
    bf16 = train_trial(_config(total_steps=200, eval_every_steps=100, precision="bf16")).final
    assert all(math.isfinite(v) for v in bf16.values())


@gpu
@needs_cuda
def test_the_gpu_memory_fraction_caps_the_trials_allocations():
    device = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        train_trial(_config(total_steps=2, gpu_memory_fraction=512 * 2**20 / total))
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


@gpu
@needs_cuda
def test_resume_on_cuda_refuses_another_precision(tmp_path):
    train_trial(_config(), checkpoint_dir=tmp_path, report=_stop_at(10))
    with pytest.raises(CheckpointError, match="precision="):
        train_trial(_config(precision="bf16"), resume_from=tmp_path)
