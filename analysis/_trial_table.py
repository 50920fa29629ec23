"""One row per trial: checking a user's table (``klstudy report --results``) and filling the
defaults of optional columns, so every analysis sees the same columns and dtypes.

Required: ``n_cycles ratio ramp beta_max seed rec kl elbo``. Optional, with the value an
absent column or an empty cell means: ``status`` ("completed"), ``lr_schedule``
("constant"), ``beta_min`` (0.0), ``free_bits`` (0.0), ``lr_n_cycles`` (= ``n_cycles``),
and the metrics ``mi au iw_nll ppl`` (NaN).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from analysis._load import ReportError

REQUIRED_COLUMNS: tuple[str, ...] = ("n_cycles", "ratio", "ramp", "beta_max", "seed", "rec",
                                     "kl", "elbo")
OPTIONAL_METRICS: tuple[str, ...] = ("mi", "au", "iw_nll", "ppl")
METRICS: tuple[str, ...] = ("rec", "kl", "elbo", *OPTIONAL_METRICS)
# Config keys besides n_cycles and seed, with the default an absent column means.
AXIS_DEFAULTS: dict[str, object] = {"ratio": None, "ramp": None, "beta_max": None,
                                    "lr_schedule": "constant", "beta_min": 0.0,
                                    "free_bits": 0.0}
CONFIG_KEYS: tuple[str, ...] = ("n_cycles", *AXIS_DEFAULTS, "lr_n_cycles")
RAMPS = frozenset({"linear", "sigmoid", "cosine"})
STATUSES = frozenset({"completed", "pruned", "error", "running", "pending"})
_ROW = re.compile(r"\brow (\d+)")
_NONNEGATIVE = ("beta_max", "beta_min", "free_bits", "kl", "au")


def _fail(frame: pd.DataFrame, column: str, bad: np.ndarray, what: str, *,
          first_row: int) -> None:
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        value = frame[column].iloc[position] if column in frame.columns else None
        value = value.item() if isinstance(value, np.generic) else value
        raise ReportError(f"{column}, row {position + first_row}: {what}, got {value!r} "
                          f"({int(bad.sum())} such row(s))")


def _numeric(frame: pd.DataFrame, column: str, *, first_row: int,
             allow_missing: bool) -> np.ndarray:
    raw = frame[column]
    if pd.api.types.is_numeric_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw.dtype):
        values = raw.to_numpy(dtype=float, na_value=np.nan)
        missing = np.isnan(values)
    else:
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        text = raw.astype(str).str.strip()
        missing = (raw.isna() | text.isin(["", "nan", "NaN", "None"])).to_numpy()
        _fail(frame, column, np.isnan(values) & ~missing, "not a number", first_row=first_row)
    if not allow_missing:
        _fail(frame, column, missing, "missing value", first_row=first_row)
    return values


def _text(frame: pd.DataFrame, column: str, default: str) -> np.ndarray:
    if column not in frame.columns:
        return np.full(len(frame), default, dtype=object)
    s = frame[column].to_numpy(dtype=object)
    empty = pd.isna(s) | (s == "")
    return np.where(empty, default, s).astype(str).astype(object)


def normalise_trials(trials: pd.DataFrame, *, first_row: int = 0) -> pd.DataFrame:
    """``trials`` checked, with every config key and metric column present in house dtypes.

    Args:
        trials: one row per trial.
        first_row: the number error messages give the first row (0 for a DataFrame, 2 for a
            CSV whose line 1 is the header).

    Raises:
        ReportError: a required column is missing or a value is malformed; the message names
            the column and the row, e.g. ``ratio, row 5: must be in [0, 1], got 1.5``.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in trials.columns]
    if missing:
        raise ReportError(f"missing column(s) {', '.join(missing)}: the table needs one row per "
                          f"trial with columns {', '.join(REQUIRED_COLUMNS)}")
    if trials.empty:
        raise ReportError("the table has no rows: nothing to analyse")
    frame, kw = trials, {"first_row": first_row}
    out: dict[str, np.ndarray] = {}
    for column in ("n_cycles", "seed"):
        values = _numeric(frame, column, allow_missing=False, **kw)
        _fail(frame, column, values != np.round(values), "must be a whole number", **kw)
        out[column] = values.astype(np.int64)
    _fail(frame, "n_cycles", out["n_cycles"] < 1, "must be at least 1", **kw)
    out["ratio"] = _numeric(frame, "ratio", allow_missing=False, **kw)
    _fail(frame, "ratio", (out["ratio"] < 0) | (out["ratio"] > 1), "must be in [0, 1]", **kw)
    ramp = frame["ramp"].to_numpy(dtype=object)
    _fail(frame, "ramp", ~np.isin(ramp, list(RAMPS)),
          f"must be one of {', '.join(sorted(RAMPS))}", **kw)
    out["ramp"] = ramp.astype(str).astype(object)
    out["beta_max"] = _numeric(frame, "beta_max", allow_missing=False, **kw)
    n = len(frame)
    for column in ("beta_min", "free_bits"):
        out[column] = (np.nan_to_num(_numeric(frame, column, allow_missing=True, **kw), nan=0.0)
                       if column in frame.columns else np.zeros(n))
    out["lr_schedule"] = _text(frame, "lr_schedule", "constant")
    if "lr_n_cycles" in frame.columns:
        given = _numeric(frame, "lr_n_cycles", allow_missing=True, **kw)
        out["lr_n_cycles"] = np.where(np.isnan(given), out["n_cycles"], given).astype(np.int64)
    else:
        out["lr_n_cycles"] = out["n_cycles"].copy()
    out["status"] = _text(frame, "status", "completed")
    if "status" in frame.columns:
        _fail(frame, "status", ~np.isin(out["status"], list(STATUSES)),
              f"must be one of {', '.join(sorted(STATUSES))}", **kw)
    for metric in METRICS:
        out[metric] = (_numeric(frame, metric, allow_missing=True, **kw)
                       if metric in frame.columns else np.full(n, np.nan))
    done = out["status"] == "completed"
    for metric in ("rec", "kl", "elbo"):
        _fail(frame, metric, done & ~np.isfinite(out[metric]),
              "a completed trial needs a finite value", **kw)
    for column in _NONNEGATIVE:
        _fail(frame, column, out[column] < 0, "must be ≥ 0", **kw)
    table = pd.DataFrame(out)
    _, codes = group_codes(table, [*CONFIG_KEYS, "seed"])
    duplicated = np.ones(len(codes), dtype=bool)
    duplicated[np.unique(codes, return_index=True)[1]] = False
    if duplicated.any():
        raise ReportError(f"row {int(np.flatnonzero(duplicated)[0]) + first_row}: a second "
                          "trial with the same configuration and seed; give one row per trial")
    return table


def read_results(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet table of one row per trial and check it (:func:`normalise_trials`).

    Raises:
        ReportError: no such file, an unknown extension, an unreadable file or a malformed
            table (the message names the file, the column and the CSV line).
    """
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"results table {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            frame, first = pd.read_csv(p), 2  # line 1 is the header
        elif suffix in (".parquet", ".pq"):
            frame, first = pd.read_parquet(p), 0
        else:
            raise ReportError(f"{str(p)!r}: results table must be .csv or .parquet, "
                              f"got {suffix or 'no extension'!r}")
    except ReportError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many kinds for a broken file
        raise ReportError(f"{str(p)!r}: not a readable {suffix[1:]} table ({exc})") from exc
    try:
        return normalise_trials(frame, first_row=first)
    except ReportError as err:
        where = "line" if suffix == ".csv" else "row"
        message = _ROW.sub(where + r" \1", str(err), count=1)
        raise ReportError(f"{p.name}: {message}") from err


def group_codes(table: pd.DataFrame, keys: list[str] | tuple[str, ...]
                ) -> tuple[pd.DataFrame, np.ndarray]:
    """The distinct rows of ``table[keys]`` sorted by ``keys``, and each row's index into them
    (like ``groupby(keys, sort=True).ngroup()``, several times faster)."""
    if table.empty:
        return table[list(keys)].iloc[:0], np.zeros(0, dtype=np.int64)
    codes = np.column_stack([np.unique(table[k].to_numpy(), return_inverse=True)[1]
                             for k in keys])
    _, first, inverse = np.unique(codes, axis=0, return_index=True, return_inverse=True)
    groups = table[list(keys)].iloc[first].reset_index(drop=True)
    return groups, inverse.reshape(-1)
