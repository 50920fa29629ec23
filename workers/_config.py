"""The fully resolved configuration of one trial: flat, frozen, picklable, JSON-able."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from workers._schedules import LR_SCHEDULES, RAMPS

ModelKind = Literal["toy", "lstm_text"]
DataKind = Literal["toy", "ptb", "text"]
Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")

class ConfigError(ValueError):
    """A trial config value is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# Per-model defaults (DESIGN §2). toy: the paper's §4 network; lstm_text: its PTB settings.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "toy": {"emb_dim": 16, "hidden_dim": 64, "latent_dim": 2, "n_layers": 2, "dropout": 0.0},
    "lstm_text": {"emb_dim": 256, "hidden_dim": 256, "latent_dim": 32, "n_layers": 1, "dropout": 0.5},
}


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs; ``resolved()`` fills model defaults and the device.

    The β schedule fields follow DESIGN §1; ``eval_every_steps`` is the evaluation (and
    checkpoint) interval in optimizer steps.
    """

    # model
    model: ModelKind = "toy"
    emb_dim: int | None = None  # None: the model kind's default (MODEL_DEFAULTS)
    hidden_dim: int | None = None
    latent_dim: int | None = None
    n_layers: int | None = None
    dropout: float | None = None
    # data
    data: DataKind = "toy"
    data_path: str | None = None  # directory of train/valid/test text files, for data="text"
    max_train_sentences: int | None = None
    max_length: int | None = None  # words; longer *training* sentences are dropped
    max_vocab: int | None = None  # the most frequent train words kept (specials included)
    # optimisation
    total_steps: int = 4000
    batch_size: int = 10
    lr: float = 1e-3  # Adam
    lr_schedule: Literal["constant", "cyclical_cosine"] = "constant"
    grad_clip: float = 5.0  # max global grad norm; 0 disables clipping
    # fp32: IEEE float32 everywhere; tf32: TF32 matmuls and cuDNN LSTMs on CUDA (CPU: as fp32);
    # bf16: bfloat16 autocast of the training forward pass. Evaluation always runs in fp32.
    precision: Precision = "fp32"
    # β schedule
    n_cycles: int = 4
    ratio: float = 0.5
    ramp: Literal["linear", "sigmoid", "cosine"] = "linear"
    beta_max: float = 1.0
    # evaluation
    eval_every_steps: int = 200  # steps between evaluations (and checkpoints); always at the end
    eval_batch_size: int = 256  # sentences per evaluation batch (memory is bounded per pass)
    # Intermediate evaluations use a fixed-seed subset of this many valid sentences (the same
    # in every trial); the final one uses every sentence. None: every sentence every time.
    eval_subset_sentences: int | None = 250
    iw_samples: int = 100  # K of the final importance-weighted NLL; 0 skips it
    # execution
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 1  # torch CPU threads; keep ≤ the CPUs given to the trial
    # CUDA only: this share of the device's memory caps the trial's allocations (several trials
    # per GPU: resources.gpus_per_trial < 1); None: no cap.
    gpu_memory_fraction: float | None = None
    # CUDA only: deterministic cuDNN and torch algorithms (bit-for-bit resume; somewhat slower).
    deterministic: bool = False
    trial_id: str = "trial"

    def resolved(self) -> TrialConfig:
        """A copy with every ``None`` model field filled and ``device`` made concrete."""
        import torch

        defaults = MODEL_DEFAULTS[self.model]
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.device == "auto":
            updates["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        return dataclasses.replace(self, **updates)

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first field outside its range."""
        rules: list[tuple[str, bool, str]] = [
            ("model", self.model in MODEL_DEFAULTS, f"must be one of {sorted(MODEL_DEFAULTS)}"),
            ("data", self.data in ("toy", "ptb", "text"), "must be one of toy, ptb, text"),
            ("total_steps", self.total_steps >= 1, "must be at least 1"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"must be one of {LR_SCHEDULES}"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
            ("n_cycles", self.n_cycles >= 1, "must be an integer >= 1"),
            ("n_cycles", self.n_cycles <= self.total_steps, "must be <= total_steps"),
            ("ratio", 0.0 <= self.ratio <= 1.0, "must be in [0, 1]"),
            ("ramp", self.ramp in RAMPS, f"must be one of {RAMPS}"),
            ("beta_max", self.beta_max > 0, "must be > 0"),
            ("eval_every_steps", self.eval_every_steps >= 1, "must be at least 1"),
            ("eval_batch_size", self.eval_batch_size >= 2, "must be at least 2"),
            ("iw_samples", self.iw_samples >= 0, "must be >= 0"),
            ("num_threads", self.num_threads >= 1, "must be at least 1"),
            ("precision", self.precision in PRECISIONS, f"must be one of {PRECISIONS}"),
            ("gpu_memory_fraction",
             self.gpu_memory_fraction is None or 0.0 < self.gpu_memory_fraction <= 1.0,
             "must be in (0, 1] or null"),
            *((name, getattr(self, name) is None or getattr(self, name) >= 1, "must be at least 1")
              for name in ("emb_dim", "hidden_dim", "latent_dim", "n_layers", "max_length",
                           "max_train_sentences", "eval_subset_sentences")),
            ("max_vocab", self.max_vocab is None or self.max_vocab >= 5,
             "must be at least 5 (4 special tokens and a word)"),
            ("dropout", self.dropout is None or 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
        ]
        for name, ok, message in rules:
            if not ok:
                raise ConfigError(name, f"{message}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown trial config keys: {', '.join(unknown)}")
        return cls(**values)
