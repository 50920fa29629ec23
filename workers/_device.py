"""Where and how a trial computes: device, precision, determinism, its GPU share, RNG state.

Everything that touches process-wide torch settings lives here, applied once per trial by
:func:`configure_runtime` before the model is built:

- **threads**: ``torch.set_num_threads(num_threads)`` (≤ the CPUs the trial was given);
- **GPU share**: with ``gpu_memory_fraction`` (several trials on one GPU) the trial's caching
  allocator is capped at that share of the device (``set_per_process_memory_fraction``); an
  allocation beyond it raises CUDA out-of-memory in that trial only;
- **precision** (CUDA): ``fp32`` turns TF32 off for matmuls and cuDNN LSTMs (torch's default
  lets cuDNN LSTMs use TF32), ``tf32`` turns it on for both, ``bf16`` autocasts the training
  forward pass (:func:`autocast`) with fp32 matmuls elsewhere. On CPU ``tf32`` is ``fp32``
  and ``bf16`` uses CPU autocast. Evaluation never autocasts;
- **determinism** (CUDA, ``deterministic``): deterministic cuDNN, no cuDNN benchmarking,
  ``torch.use_deterministic_algorithms(True, warn_only=True)`` and the cuBLAS workspace
  setting it needs (set before the first cuBLAS call of the process).

Checkpoints hold the CPU RNG state and the state of *the trial's own device* only (not every
visible GPU's), so they restore onto any device: another GPU count, another index, or CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch

from workers._config import ConfigError, TrialConfig

log = logging.getLogger(__name__)

_CUBLAS_WORKSPACE = ":4096:8"  # what torch's deterministic cuBLAS mode asks for


def configure_runtime(config: TrialConfig) -> torch.device:
    """Apply a resolved config's threads, device, GPU share, precision and determinism.

    Returns:
        The trial's device; a bare ``cuda`` becomes ``cuda:<current index>``.

    Raises:
        ConfigError: ``device`` is CUDA but this process sees no CUDA device.
    """
    torch.set_num_threads(max(1, config.num_threads))
    device = torch.device(config.device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError("device",
                          f"CUDA is not available in this process, got {config.device!r}")
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    if config.gpu_memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(config.gpu_memory_fraction, device)
    _set_tf32(config.precision == "tf32")
    torch.backends.cudnn.deterministic = config.deterministic
    torch.backends.cudnn.benchmark = False  # input shapes change every batch
    torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
    log.info("trial %s on %s (%s, precision %s, memory share %s, deterministic %s)",
             config.trial_id, device, torch.cuda.get_device_name(device), config.precision,
             config.gpu_memory_fraction, config.deterministic)
    return device


def _set_tf32(enabled: bool) -> None:
    """TF32 on or off for CUDA matmuls and cuDNN LSTMs (the new API where torch has it: it
    refuses a mix of the two)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "rnn"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "tf32" if enabled else "ieee"
    else:  # torch < 2.9
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def make_optimizer(params: Iterable[torch.nn.Parameter], config: TrialConfig,
                   device: torch.device) -> torch.optim.Adam:
    """Adam at ``config.lr``; the fused CUDA kernel on CUDA (one launch for all parameters).

    On CPU it stays torch's default implementation, so CPU trajectories do not change.
    """
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=config.lr, fused=True)
    return torch.optim.Adam(params, lr=config.lr)


def autocast(config: TrialConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context of the training forward pass: bf16 autocast, or nothing."""
    if config.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """The CPU RNG state and, on CUDA, the trial device's (never every visible GPU's)."""
    return {
        "rng_cpu": torch.get_rng_state(),
        "rng_device": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Set the RNGs from a checkpoint (either format); a device state is used only when both
    the checkpoint and this trial are on CUDA, whatever GPU count either machine had.

    Format 1 stored ``torch.cuda.get_rng_state_all()``: its entry for this device index when
    present, else its first (the trial's device, when Ray gave it one visible GPU).
    """
    torch.set_rng_state(state["rng_cpu"].cpu())
    if device.type != "cuda":
        return
    saved = state.get("rng_device")
    if saved is None and state.get("rng_cuda"):
        states, index = state["rng_cuda"], device.index or 0
        saved = states[index] if index < len(states) else states[0]
    if saved is not None:
        torch.cuda.set_rng_state(saved.cpu(), device)
