"""The fully resolved configuration of one trial: flat, frozen, picklable, JSON-able."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from workers._schedules import LR_SCHEDULES, RAMPS

ModelKind = Literal["toy", "lstm_text", "python"]
DataKind = Literal["toy", "ptb", "text", "python"]
Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
DATA_KINDS: tuple[str, ...] = get_args(DataKind)
# "module:function" (the function may be an attribute path: "module:Class.create")
FACTORY_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

class ConfigError(ValueError):
    """A trial config value is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PluginError(ValueError):
    """A user's factory, module or output breaks the contract (DESIGN §8); ``key`` is the spec
    key that names it (``model.factory``, ``data.params``, ...)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
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
    checkpoint) interval in optimizer steps. A user's model or data (kind ``python``, DESIGN
    §8) is a ``module:function`` factory with keyword ``*_params``, imported with ``code_dir``
    first on the import path; the built-in kinds take the flat fields below instead.
    """

    # model
    model: ModelKind = "toy"
    model_factory: str | None = None  # kind python: "module:function", build(info, **params)
    model_params: dict[str, Any] | None = None  # kind python: keyword arguments of the factory
    emb_dim: int | None = None  # None: the model kind's default (MODEL_DEFAULTS)
    hidden_dim: int | None = None
    latent_dim: int | None = None
    n_layers: int | None = None
    dropout: float | None = None
    # data
    data: DataKind = "toy"
    data_factory: str | None = None  # kind python: "module:function", load(**params)
    data_params: dict[str, Any] | None = None  # kind python: keyword arguments of the factory
    # kind python: the directory searched first for the factories' modules (the spec's); a
    # directory missing here (another node) is skipped: the module is then found installed or
    # shipped with the job (klstudy submit)
    code_dir: str | None = None
    data_path: str | None = None  # directory of train/valid/test text files, for data="text"
    max_train_sentences: int | None = None
    max_length: int | None = None  # words; longer *training* sentences are dropped
    max_vocab: int | None = None  # the most frequent train words kept (specials included)
    # optimisation
    total_steps: int = 4000
    batch_size: int = 10
    lr: float = 1e-3  # Adam
    lr_schedule: Literal["constant", "cyclical_cosine"] = "constant"
    # cyclical_cosine: learning-rate cycles over the run; None: n_cycles (restart with each β
    # cycle, the official cyclical script's behaviour)
    lr_n_cycles: int | None = None
    grad_clip: float = 5.0  # max global grad norm; 0 disables clipping
    # Free bits (Kingma et al. 2016): the trained KL term is Σ_d max(λ, batch-mean KL_d), a
    # floor of λ nats per latent dimension; 0 trains the plain KL. Reported KL is always the
    # true KL.
    free_bits: float = 0.0
    # fp32: IEEE float32 everywhere; tf32: TF32 matmuls and cuDNN LSTMs on CUDA (CPU: as fp32);
    # bf16: bfloat16 autocast of the training forward pass. Evaluation always runs in fp32.
    precision: Precision = "fp32"
    # β schedule
    n_cycles: int = 4
    ratio: float = 0.5
    ramp: Literal["linear", "sigmoid", "cosine"] = "linear"
    beta_max: float = 1.0
    beta_min: float = 0.0  # where each β ramp starts (the official PTB scripts: 0.1)
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

        defaults = MODEL_DEFAULTS.get(self.model, {})  # python: the factory's own defaults
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.device == "auto":
            updates["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        return dataclasses.replace(self, **updates)

    @property
    def lr_cycles(self) -> int:
        """The learning rate's cycles: ``lr_n_cycles``, or the β schedule's M."""
        return self.lr_n_cycles if self.lr_n_cycles is not None else self.n_cycles

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first field outside its range."""
        rules: list[tuple[str, bool, str]] = [
            ("model", self.model in MODEL_KINDS, f"must be one of {', '.join(MODEL_KINDS)}"),
            ("data", self.data in DATA_KINDS, f"must be one of {', '.join(DATA_KINDS)}"),
            *_factory_rules("model", self.model, self.model_factory, self.model_params),
            *_factory_rules("data", self.data, self.data_factory, self.data_params),
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
            ("beta_min", 0.0 <= self.beta_min <= self.beta_max,
             f"must be in [0, beta_max={self.beta_max}]"),
            ("free_bits", self.free_bits >= 0, "must be >= 0 (0 trains the plain KL)"),
            ("lr_n_cycles", self.lr_n_cycles is None or 1 <= self.lr_n_cycles <= self.total_steps,
             "must be an integer in [1, total_steps] or null"),
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

    def to_params(self) -> dict[str, Any]:
        """Flat ``{name: scalar}`` for tracking (MLflow params): ``lr_n_cycles`` resolved,
        factory params as ``model_params.NAME`` / ``data_params.NAME``, Nones dropped."""
        out: dict[str, Any] = {}
        for name, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update(_flatten(value, prefix=name))
            elif value is not None:
                out[name] = value
        out["lr_n_cycles"] = self.lr_cycles
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown trial config keys: {', '.join(unknown)}")
        return cls(**values)


def _factory_rules(section: str, kind: str, factory: str | None,
                   params: dict[str, Any] | None) -> list[tuple[str, bool, str]]:
    """A ``python`` kind needs a ``module:function`` factory; a built-in kind takes none."""
    name = f"{section}_factory"
    if kind != "python":
        return [(name, factory is None, f"only used when {section} is 'python'"),
                (f"{section}_params", params is None, f"only used when {section} is 'python'")]
    return [(name, isinstance(factory, str) and FACTORY_PATTERN.fullmatch(factory) is not None,
             "must be 'module:function'"),
            (f"{section}_params", params is None or isinstance(params, dict),
             "must be a mapping or null")]


def _flatten(values: dict[str, Any], *, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix=f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = value
    return out
