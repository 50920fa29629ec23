"""A trial's checkpoint file: what it holds, how it is written, and when it may be resumed.

``checkpoint.pt`` (``torch.save``, loadable with ``weights_only=True``) holds ``format``,
``step``, the model and Adam state dicts, the RNG states (:func:`workers._device.rng_state`:
CPU, and the trial device's on CUDA) and the resolved config; ``config.json`` beside it is
the config for people. Files are written to a temporary name and renamed, so a reader never
sees half a checkpoint. They are read onto the CPU, so any machine can resume them: another
GPU count or index, or none.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from workers._config import TrialConfig

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_FORMAT = 2  # 2: the trial device's RNG state only; 1 (still read): every GPU's
# Fields that may differ between a checkpoint and the config resuming it: they change neither
# the training trajectory nor the schedules (total_steps does: it sets ⌈T/M⌉, so β(t), lr(t)).
RESUMABLE_DIFFERENCES = frozenset({"device", "num_threads", "trial_id", "eval_every_steps",
                                   "eval_batch_size", "eval_subset_sentences", "iw_samples",
                                   "gpu_memory_fraction", "deterministic"})


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or belongs to another configuration."""


def write_checkpoint(directory: Path, state: dict[str, Any], config: TrialConfig) -> Path:
    """Write ``state`` (plus ``format`` and the config) into ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **state, "config": config.to_dict()}, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
    (directory / CONFIG_FILE).write_text(text)
    return directory


def read_checkpoint(path: Path, config: TrialConfig) -> dict[str, Any]:
    """The state of a checkpoint file (or directory) that ``config`` may resume, on CPU.

    Raises:
        CheckpointError: missing, of an unknown format, or made with another configuration.
    """
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"resume: no checkpoint at {str(file)!r}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if state.get("format") not in (1, CHECKPOINT_FORMAT):
        raise CheckpointError(
            f"resume: {str(file)!r} has unknown format {state.get('format')!r}")
    check_compatible(TrialConfig.from_dict(state["config"]), config, file)
    return state


def check_compatible(saved: TrialConfig, current: TrialConfig, file: Path) -> None:
    """Raise :class:`CheckpointError` unless ``current`` may continue ``saved``'s trial."""
    if saved.total_steps != current.total_steps:
        raise CheckpointError(
            f"resume: total_steps must be the checkpoint's {saved.total_steps} (it sets the cycle "
            f"length ⌈T/M⌉ and so β(t) and lr(t) of the remaining steps; {str(file)!r}), "
            f"got {current.total_steps}"
        )
    for f in dataclasses.fields(TrialConfig):
        if f.name in RESUMABLE_DIFFERENCES:
            continue
        old, new = getattr(saved, f.name), getattr(current, f.name)
        if old != new:
            raise CheckpointError(
                f"resume: checkpoint {str(file)!r} was made with {f.name}={old!r}, "
                f"the config asks for {new!r}"
            )
