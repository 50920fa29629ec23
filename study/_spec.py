"""The study spec (DESIGN §6): YAML → a validated, frozen :class:`StudySpec` → trial configs.

Validation happens once, here: strict types (no ``"3"`` → 3, ``true`` is not an integer), ranges,
unknown keys rejected. The first problem becomes one :class:`SpecError` whose text names the key
and the value, e.g. ``schedule.ratio[1]: must be in [0, 1], got 1.5``. Downstream code trusts the
result. ``workers`` (and so torch) is imported only when trial configs are built. Reading the
YAML file itself is ``study._spec_yaml``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from study._grid import interleaved_points
from study._spec_errors import spec_error
from study._spec_model import DataSpec, ModelSpec, _treebank_available  # noqa: F401
from study._spec_race import race_seed_problem
from study._spec_sections import (  # noqa: F401 - re-exported: study._spec is the spec's API
    OBJECTIVE_MODES,
    ObjectiveMetric,
    ObjectiveSpec,
    PruningSpec,
    ResourcesSpec,
    ScheduleSpec,
    SearchSpec,
    TrackingSpec,
    TrainSpec,
)
from study._spec_types import (  # noqa: F401
    _NAME,
    LrSchedule,
    Pruner,
    Ramp,
    Seeds,
    _as_tuple,
    _base_dir,
    _fail,
    _Section,
)
from study._spec_yaml import SpecError, read_yaml

if TYPE_CHECKING:
    from workers import TrialConfig


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or set(name) == {"."}:
        raise _fail("must be a non-empty name of letters, digits, '.', '_', '-'", name)
    return name


def trial_id(
    index: int, *, n_cycles: int, ratio: float, ramp: str, beta_max: float, seed: int,
    lr_schedule: str | None = None, beta_min: float | None = None,
    lr_n_cycles: int | None = None, free_bits: float | None = None,
) -> str:
    """A unique, filesystem-safe trial name, e.g. ``t0007-M4-R0.5-linear-b1-s2``.

    Axes beyond the paper's name themselves only when the spec has them: ``-lrcos`` /
    ``-lrconst`` (``schedule.lr_schedule``), ``-bmin0.1`` (``schedule.beta_min``), ``-lrc4``
    (``schedule.lr_n_cycles``, on trials with a cyclical learning rate), ``-fb0.5``
    (``train.free_bits``); so a spec without them keeps its trial ids.
    """
    lr = "-lrcos" if lr_schedule == "cyclical_cosine" else "-lrconst" if lr_schedule else ""
    extra = "".join(f"-{tag}{value:g}" for tag, value in
                    (("bmin", beta_min), ("lrc", lr_n_cycles), ("fb", free_bits))
                    if value is not None)
    return f"t{index:04d}-M{n_cycles}-R{ratio:g}-{ramp}-b{beta_max:g}{lr}{extra}-s{seed}"


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
    # kind python: the directory imported from first (made absolute); default: the spec's
    code_dir: str | None = None

    @field_validator("code_dir")
    @classmethod
    def _absolute_code_dir(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None:
            return None
        if not path.strip():
            raise _fail("must not be empty", path)
        return str((_base_dir(info) / Path(path).expanduser()).resolve())

    @model_validator(mode="after")
    def _code_dir_for_factories(self, info: ValidationInfo) -> StudySpec:
        if not self.uses_factories():
            if self.code_dir is not None:
                raise _fail("only used when model.kind or data.kind is 'python'",
                            self.code_dir, at="code_dir")
        elif self.code_dir is None:
            object.__setattr__(self, "code_dir", str(_base_dir(info).resolve()))
        return self

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
    def _beta_min_below_beta_max(self) -> StudySpec:
        lowest = min(self.schedule.beta_max)
        for i, value in enumerate(self.schedule.beta_min or ()):
            if value > lowest:
                message = f"must be <= every schedule.beta_max (the smallest is {lowest:g})"
                raise _fail(message, value, at=f"schedule.beta_min[{i}]")
        return self

    @model_validator(mode="after")
    def _lr_cycles_need_a_cyclical_lr(self) -> StudySpec:
        cycles = self.schedule.lr_n_cycles
        if cycles is None:
            return self
        schedules = self.schedule.lr_schedule or (self.train.lr_schedule,)
        if "cyclical_cosine" not in schedules:
            raise _fail("only used with a cyclical_cosine learning rate (train.lr_schedule or "
                        "schedule.lr_schedule)", list(cycles), at="schedule.lr_n_cycles")
        if "constant" in schedules and len(cycles) > 1:
            raise _fail("more than one value would repeat every constant-learning-rate trial "
                        "unchanged; give one value, or run the constant arm in another study",
                        list(cycles), at="schedule.lr_n_cycles")
        for i, n in enumerate(cycles):
            if n > self.train.total_steps:
                message = f"must be <= train.total_steps ({self.train.total_steps})"
                raise _fail(message, n, at=f"schedule.lr_n_cycles[{i}]")
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
    def _race_prunes_only_when_asked(self) -> StudySpec:
        """A race never stops a trial early unless ``pruning.pruner`` is named (issue 19)."""
        if self.search.kind == "race" and "pruner" not in self.pruning.model_fields_set:
            object.__setattr__(self, "pruning",
                               self.pruning.model_copy(update={"pruner": "none"}))
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
        """The grid axes (trial config names); TPE searches them as categorical parameters.

        ``lr_schedule``, ``beta_min``, ``lr_n_cycles`` (``schedule.*``) and ``free_bits``
        (``train.free_bits``) are axes only when the spec gives them, so that a spec without
        them expands to the trials, configs and ids it always had.
        """
        s = self.schedule
        space = {"n_cycles": list(s.n_cycles), "ratio": list(s.ratio), "ramp": list(s.ramp),
                 "beta_max": list(s.beta_max)}
        optional = {"lr_schedule": s.lr_schedule, "beta_min": s.beta_min,
                    "lr_n_cycles": s.lr_n_cycles, "free_bits": self.train.free_bits}
        space |= {name: list(axis) for name, axis in optional.items() if axis is not None}
        return space

    def uses_factories(self) -> bool:
        """Whether the model or the data is a user's factory (kind ``python``)."""
        return self.model.kind == "python" or self.data.kind == "python"

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
            model_factory=m.factory, model_params=_plain(m.params),
            data=d.kind, data_path=d.path, max_train_sentences=d.max_train_sentences,
            max_length=d.max_length, max_vocab=d.max_vocab,
            data_factory=d.factory, data_params=_plain(d.params), code_dir=self.code_dir,
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
        return [dataclasses.replace(base, **point, trial_id=trial_id(index, **_named(point, base)))
                for index, point in enumerate(points)]

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (defaults filled) as JSON-able data; ``parse_spec`` reads it."""
        return self.model_dump(mode="json")


def _named(point: dict[str, Any], base: TrialConfig) -> dict[str, Any]:
    """The point's values its trial id shows: ``lr_n_cycles`` only on cyclical-lr trials."""
    if point.get("lr_schedule", base.lr_schedule) != "cyclical_cosine":
        return {k: v for k, v in point.items() if k != "lr_n_cycles"}
    return point


def _plain(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """Factory params as plain data (a copy the trial config owns)."""
    import copy

    return None if params is None else copy.deepcopy(dict(params))


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
