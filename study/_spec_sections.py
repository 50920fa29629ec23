"""The sections of a spec besides model and data: training, the schedule grid, search,
pruning, the objective, resources and tracking."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from study._spec_race import race_options, race_problem
from study._spec_types import (
    _RDB_SCHEMES,
    _TRACKING_SCHEMES,
    BetaAxis,
    BetaMinAxis,
    CyclesAxis,
    FreeBitsAxis,
    LrSchedule,
    LrScheduleAxis,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Pruner,
    RampAxis,
    RatioAxis,
    _as_tuple,
    _base_dir,
    _check_url,
    _fail,
    _range,
    _Section,
)


class TrainSpec(_Section):
    """Optimisation and evaluation of every trial; steps are optimizer steps."""

    total_steps: PosInt
    batch_size: PosInt = 10  # sentences; 32 when model.kind is lstm_text (filled by StudySpec)
    lr: PosFloat = 1e-3  # Adam
    lr_schedule: LrSchedule = "constant"
    grad_clip: NonNegFloat = 5.0  # max global grad norm; 0 disables clipping
    # fp32 | tf32 (CUDA TF32 matmuls/LSTMs) | bf16 (autocast of the training forward pass);
    # evaluation always in fp32 (workers.TrialConfig.precision)
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    # Absent: max(1, total_steps // 10), filled before validation: 10 evaluations, the
    # intermediate ones on a fixed-seed 250 valid sentences (workers.TrialConfig), so that
    # evaluation stays a small share of a trial's time.
    eval_every_steps: PosInt = 1
    eval_batch_size: Annotated[int, Field(ge=2)] = 256  # sentences per evaluation batch
    # K of the final importance-weighted NLL (valid and test; 0 skips it). Its sentences fit a
    # budget of T × batch / 4 decoder rows: all of them, or a fixed-seed subset.
    iw_samples: NonNegInt = 100
    # Free bits λ (nats per latent dimension; Kingma et al. 2016): the one train key that is a
    # grid axis (a list; a scalar is a one-value axis). None: 0 (off) for every trial.
    free_bits: FreeBitsAxis | None = None

    @field_validator("free_bits", mode="before")
    @classmethod
    def _scalar_is_axis(cls, value: Any) -> Any:
        return value if value is None else _as_tuple(value)

    @model_validator(mode="before")
    @classmethod
    def _default_eval_interval(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "eval_every_steps" in data:
            return data
        total = data.get("total_steps")
        if type(total) is not int:  # invalid: total_steps' own error is reported
            return data
        return {**data, "eval_every_steps": max(1, total // 10)}

    @model_validator(mode="after")
    def _eval_within_training(self) -> TrainSpec:
        if self.eval_every_steps > self.total_steps:
            message = f"must be <= train.total_steps ({self.total_steps})"
            raise _fail(message, self.eval_every_steps, at="eval_every_steps")
        return self



class ScheduleSpec(_Section):
    """The β-schedule grid (DESIGN §1): every list is an axis; a scalar is a one-value axis."""

    n_cycles: CyclesAxis  # M
    ratio: RatioAxis  # R
    ramp: RampAxis = ("linear",)
    beta_max: BetaAxis = (1.0,)
    # The learning-rate schedule as an axis (paper Table 4: cyclical β vs cyclical η); None:
    # train.lr_schedule for every trial.
    lr_schedule: LrScheduleAxis | None = None
    # Where each β ramp starts (the official PTB scripts: 0.1); None: 0 for every trial.
    beta_min: BetaMinAxis | None = None
    # Cycles of a cyclical_cosine learning rate, independent of M (Table 4's "Mon β + Cyc η");
    # None: each trial's M (the learning rate restarts with each β cycle).
    lr_n_cycles: CyclesAxis | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _scalar_is_axis(cls, value: Any) -> Any:
        return value if value is None else _as_tuple(value)


class SearchSpec(_Section):
    """``grid``: every combination with every seed; ``tpe``: ``n_trials`` Optuna TPE trials;
    ``race``: the grid raced over seeds (``study._race``, options in ``study._spec_race``)."""

    kind: Literal["grid", "tpe", "race"] = "grid"
    n_trials: PosInt | None = None
    seed: NonNegInt = 0  # the sampler's seed
    min_seeds: PosInt | None = None  # race: seeds of round 1 (default 3)
    max_seeds: PosInt | None = None  # race: most seeds per configuration (default 12)
    seeds_per_round: PosInt | None = None  # race: seeds added per later round (default 1)
    alpha: Annotated[float, _range(0, 1, lo_open=True, hi_open=True)] | None = None  # race
    # race: level of the drops before max_seeds (default alpha; smaller drops later)
    drop_alpha: Annotated[float, _range(0, 1, lo_open=True, hi_open=True)] | None = None

    @model_validator(mode="after")
    def _race_options(self) -> SearchSpec:
        problem = race_problem(self)
        if problem is not None:
            raise _fail(problem[1], problem[2], at=problem[0])
        return self

    def race(self) -> dict[str, Any]:
        """The race options with defaults filled (``kind: race`` only)."""
        return race_options(self)

    @model_validator(mode="after")
    def _n_trials_for_tpe_only(self) -> SearchSpec:
        if self.kind == "tpe" and self.n_trials is None:
            raise _fail("required when search.kind is 'tpe'", at="n_trials")
        if self.kind in ("grid", "race") and self.n_trials is not None:
            message = "only used when search.kind is 'tpe' (a grid runs every combination)"
            raise _fail(message, self.n_trials, at="n_trials")
        return self


class PruningSpec(_Section):
    """Optuna pruner settings (DESIGN §4); each option is read only by the pruners it names."""

    pruner: Pruner = "median"
    phase_aware: bool = True  # judge trials only on evaluations in the β = β_max stage
    n_startup_trials: NonNegInt = 5  # median/percentile: trials finished before any pruning
    n_warmup_steps: NonNegInt = 0  # median/percentile: optimizer steps before a trial is judged
    percentile: Annotated[float, _range(0, 100, lo_open=True, hi_open=True)] = 25.0
    patience: NonNegInt = 2  # patient: evaluations without improvement tolerated
    min_resource: PosInt = 1  # successive_halving/hyperband: in evaluations
    reduction_factor: Annotated[int, Field(ge=2)] = 3  # successive_halving/hyperband
    # median/percentile/patient: a step's reference values come from every other trial that
    # reported there ("reached"), those of them with the trial's seed ("same_seed") or, as in
    # Optuna, from the completed trials only ("completed").
    reference: Literal["same_seed", "reached", "completed"] = "reached"
    storage: str | None = None  # Optuna RDB URL; None: the driver's default (in the study dir)
    # Nothing is reported to the pruner, so nothing pruned, before this share of total_steps.
    min_share: Annotated[float, _range(0, 1)] = 0.25
    # phase_aware: a trial with no fixing-stage evaluation yet (β still ramping: monotonic with a
    # large R, R = 1) is compared with its current value from this share of total_steps on, so
    # that no schedule escapes comparison for more than this share of its run.
    fixing_grace_share: Annotated[float, _range(0, 1)] = 0.5

    @field_validator("storage")
    @classmethod
    def _rdb_url(cls, url: str | None) -> str | None:
        what = "an RDB URL (sqlite:///PATH, postgresql://…, mysql://…)"
        return None if url is None else _check_url(url, _RDB_SCHEMES, what)


# Metrics a study can optimise, with the direction that is "better" when the spec gives no mode.
OBJECTIVE_MODES: dict[str, str] = {"elbo": "max", "rec": "min", "kl": "max", "mi": "max",
                                   "au": "max", "iw_nll": "min", "ppl": "min"}
ObjectiveMetric = Literal["elbo", "rec", "kl", "mi", "au", "iw_nll", "ppl"]


class ObjectiveSpec(_Section):
    """The validation metric that pruning, TPE, "best" and the report use (DESIGN §4).

    ``mode`` defaults to the metric's better direction (:data:`OBJECTIVE_MODES`). ``iw_nll`` is
    measured only at a trial's final evaluation, so the pruner judges such a study on its bound
    ``nll_elbo`` (= −ELBO ≥ IW-NLL) and TPE on the final ``iw_nll``.
    """

    metric: ObjectiveMetric = "elbo"
    mode: Literal["max", "min"] | None = None

    @model_validator(mode="after")
    def _default_mode(self) -> ObjectiveSpec:
        if self.mode is None:
            object.__setattr__(self, "mode", OBJECTIVE_MODES[self.metric])
        return self

    @property
    def key(self) -> str:
        """The result key of the objective: ``valid/<metric>``."""
        return f"valid/{self.metric}"

    @property
    def pruning_metric(self) -> str:
        """The metric the pruner sees at intermediate evaluations."""
        return "nll_elbo" if self.metric == "iw_nll" else self.metric


class ResourcesSpec(_Section):
    """Ray resources of one trial; torch threads = max(1, int(cpus_per_trial))."""

    cpus_per_trial: PosFloat = 1.0
    gpus_per_trial: NonNegFloat = 0.0  # fractional GPUs share one device
    max_concurrent_trials: PosInt | None = None  # None: as many as resources allow


class TrackingSpec(_Section):
    """MLflow tracking; ``uri`` None: an sqlite store inside the study directory."""

    uri: str | None = None  # a path (made absolute against the spec's directory) or a URL

    @field_validator("uri")
    @classmethod
    def _tracking_uri(cls, uri: str | None, info: ValidationInfo) -> str | None:
        if uri is None or "://" in uri:
            what = "a path or a file://, sqlite:///, http(s):// or database URL"
            return uri if uri is None else _check_url(uri, _TRACKING_SCHEMES, what)
        if not uri.strip():
            raise _fail("must not be empty", uri)
        return str((_base_dir(info) / Path(uri).expanduser()).resolve())

