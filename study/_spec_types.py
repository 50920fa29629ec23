"""Building blocks of the spec schema: strict sections, ranges, axes, our own error type.

A :func:`_fail` error carries klstudy's message and the offending value through pydantic to
``study._spec_errors``, which turns the first error into one ``SpecError`` line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo
from pydantic_core import PydanticCustomError

from study._spec_yaml import _NO_VALUE


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



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)



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
BetaMinAxis = Annotated[tuple[NonNegFloat, ...], _NonEmpty, _Distinct]
FreeBitsAxis = Annotated[tuple[NonNegFloat, ...], _NonEmpty, _Distinct]
Seeds = Annotated[tuple[NonNegInt, ...], _NonEmpty, _Distinct]
LrScheduleAxis = Annotated[tuple[LrSchedule, ...], _NonEmpty, _Distinct]
