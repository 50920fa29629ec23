"""Reading a study into tidy tables: the Parquet fast path (here), or a rebuild from MLflow
(``analysis._mlflow_load``, used when a directory holds no Parquet yet).

Both paths give the same :class:`StudyData`: ``evaluations`` holds one row per (trial,
evaluation step, split) with the columns of ``workers._records.EVAL_COLUMNS`` plus the trial's
``status``, sorted by trial, step and split (train, valid, test). ``final_rows`` and
``best_rows`` reduce it to one row per trial.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workers._records import EVAL_COLUMNS, LATENT_COLUMNS, METRIC_COLUMNS, SPLITS, TRIAL_COLUMNS

log = logging.getLogger(__name__)

EVALUATION_COLUMNS: tuple[str, ...] = (*EVAL_COLUMNS, "status")
_INT_COLUMNS = frozenset({"n_cycles", "seed", "total_steps", "step", "last_step", "index"})
_FLOAT_COLUMNS = frozenset({"ratio", "beta_max", "pruned_at_step", "z0", "z1", *METRIC_COLUMNS})
_BOOL_COLUMNS = frozenset({"final", "at_beta_max"})
_HIGHER_IS_BETTER = frozenset({"elbo", "mi", "au"})
_LOWER_IS_BETTER = frozenset({"rec", "kl", "loss", "nll_elbo", "ppl", "iw_nll", "iw_ppl"})
_UNFINISHED = ("pending", "running")


class ReportError(ValueError):
    """A study cannot be read or reported: the message says what and where."""


@dataclass(frozen=True)
class StudyData:
    """One study as tidy tables (see the module docstring).

    Attributes:
        evaluations: ``EVAL_COLUMNS`` + ``status``; NaN for metrics a split lacks.
        trials: ``TRIAL_COLUMNS``, one row per trial (``pruned_at_step`` NaN unless pruned).
        latents: ``LATENT_COLUMNS`` (2-D posterior means); empty when rebuilt from MLflow.
        meta: the content of ``study.json`` (``{}`` when rebuilt from MLflow without a directory).
        partial: the study is still running, or not all of its trials finished.
        source: ``"parquet"`` or ``"mlflow"``.
    """

    evaluations: pd.DataFrame
    trials: pd.DataFrame
    latents: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    partial: bool = False
    source: Literal["parquet", "mlflow"] = "parquet"


def load_study(study_dir: str | Path | None = None, *, tracking_uri: str | None = None,
               experiment: str | None = None) -> StudyData:
    """Read a study from its directory's Parquet files, or rebuild it from MLflow.

    Args:
        study_dir: the study directory; its ``evaluations/`` Parquet parts are read when present.
        tracking_uri: the MLflow store to rebuild from when there is no Parquet (default: the
            ``tracking_uri`` in study.json).
        experiment: the MLflow experiment (default: study.json's ``experiment_name``).

    Raises:
        ReportError: no such directory, no data anywhere, unknown experiment or store.
    """
    from analysis._mlflow_load import load_from_mlflow  # imports this module

    if study_dir is None:
        if tracking_uri is None or experiment is None:
            raise ReportError("give a study directory, or both a tracking URI and an experiment "
                              "name")
        return load_from_mlflow(tracking_uri, experiment)
    root = Path(study_dir)
    if not root.is_dir():
        raise ReportError(f"study directory {str(root)!r} does not exist")
    meta = _read_meta(root)
    if not meta and not (root / "evaluations").is_dir() and tracking_uri is None:
        raise ReportError(f"{str(root)!r} is not a study directory "
                          "(no study.json, no evaluations/)")
    data = _load_parquet(root, meta)
    if data is not None:
        return data
    uri = tracking_uri or meta.get("tracking_uri")
    name = experiment or meta.get("experiment_name") or meta.get("name")
    if not uri or not name:
        raise ReportError(f"{str(root)!r} holds no evaluations yet (evaluations/part-*.parquet) "
                          "and names no MLflow store to rebuild them from; pass a tracking URI")
    log.info("no Parquet evaluations in %s: rebuilding from MLflow %s", root, uri)
    data = load_from_mlflow(uri, name, parent_run_id=meta.get("parent_run_id"))
    return replace(data, meta=meta, partial=data.partial or _meta_partial(meta, data.trials))


def _read_meta(root: Path) -> dict[str, Any]:
    path = root / "study.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{str(path)!r}: not readable JSON ({exc})") from exc


def _meta_partial(meta: dict[str, Any], trials: pd.DataFrame) -> bool:
    n_trials = meta.get("n_trials")
    too_few = isinstance(n_trials, int) and len(trials) < n_trials
    return meta.get("status") == "running" or too_few


# --- Parquet ---------------------------------------------------------------------------------
def _read_parts(directory: Path) -> pa.Table | None:
    """All readable ``part-*.parquet`` of a directory; unreadable ones are skipped (warning)."""
    parts = sorted(directory.glob("part-*.parquet"))

    def read(path: Path) -> pa.Table | None:
        try:
            return pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            which = "last part (still being written?)" if path == parts[-1] else "part"
            log.warning("skipping unreadable %s %s: %s", which, path, exc)
            return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        tables = [t for t in pool.map(read, parts) if t is not None]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _load_parquet(root: Path, meta: dict[str, Any]) -> StudyData | None:
    table = _read_parts(root / "evaluations") if (root / "evaluations").is_dir() else None
    if table is None or table.num_rows == 0:
        return None
    evaluations = table.to_pandas()
    trials = _read_trials(root / "trials.parquet")
    latent_table = _read_parts(root / "latents") if (root / "latents").is_dir() else None
    latents = latent_table.to_pandas() if latent_table is not None else pd.DataFrame()
    return assemble(evaluations, trials, latents, meta=meta, source="parquet")


def _read_trials(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=list(TRIAL_COLUMNS))
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        log.warning("unreadable %s (%s): trial statuses taken from the evaluations", path, exc)
        return pd.DataFrame(columns=list(TRIAL_COLUMNS))


# --- shared tidying --------------------------------------------------------------------------
def _as_str(s: pd.Series) -> pd.Series:
    if int(pd.__version__.split(".")[0]) >= 3:  # the "str" dtype keeps NaN for missing
        return s.astype("str")
    return s.astype(object).where(s.notna(), np.nan)


def coerce(df: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """``df`` with exactly ``columns`` in the house dtypes (int64, float64, bool, str)."""
    out = {}
    for name in columns:
        s = df[name] if name in df.columns else pd.Series(np.nan, index=df.index, dtype=object)
        if name in _INT_COLUMNS:
            s = pd.to_numeric(s, errors="coerce")
            out[name] = (s.fillna(0) if name == "last_step" else s).astype("int64")
        elif name in _FLOAT_COLUMNS:
            out[name] = pd.to_numeric(s, errors="coerce").astype("float64")
        elif name in _BOOL_COLUMNS:
            out[name] = s.eq(True).astype(bool)
        else:
            out[name] = _as_str(s)
    return pd.DataFrame(out, index=df.index)


def _sorted(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if "split" in keys:
        rank = df["split"].map({s: i for i, s in enumerate(SPLITS)})
        df = df.assign(_rank=rank)
        keys = [k if k != "split" else "_rank" for k in keys]
    df = df.drop_duplicates(keys, keep="last").sort_values(keys, kind="stable")
    return df.drop(columns=["_rank"], errors="ignore").reset_index(drop=True)


def assemble(evaluations: pd.DataFrame, trials: pd.DataFrame, latents: pd.DataFrame, *,
              meta: dict[str, Any], source: Literal["parquet", "mlflow"]) -> StudyData:
    """Coerce, deduplicate (a resumed trial may repeat a step: the last row wins), join status."""
    ev = _sorted(coerce(evaluations, EVAL_COLUMNS), ["trial_id", "step", "split"])
    trials = coerce(trials, TRIAL_COLUMNS)
    missing = sorted(set(ev["trial_id"].unique()) - set(trials["trial_id"]))
    if missing:  # trials.parquet lags the evaluations: those trials are running
        first = ev[ev["trial_id"].isin(missing)].groupby("trial_id", sort=False)
        extra = first.first().reset_index().assign(status="running",
                                                   last_step=first["step"].max().values)
        trials = pd.concat([trials, coerce(extra, TRIAL_COLUMNS)], ignore_index=True)
    trials = _sorted(trials, ["trial_id"])
    status = ev["trial_id"].map(trials.set_index("trial_id")["status"])
    ev["status"] = status.astype(trials["status"].dtype)
    latents = _sorted(coerce(latents, LATENT_COLUMNS), ["trial_id", "step", "index"])
    partial = bool(trials["status"].isin(_UNFINISHED).any()) or _meta_partial(meta, trials)
    return StudyData(ev, trials, latents, meta=meta, partial=partial, source=source)


# --- one row per trial -----------------------------------------------------------------------
def _per_trial(data: StudyData, split: str, pick: pd.Series) -> pd.DataFrame:
    """The rows ``pick`` selects, plus a metric-less row for every trial without one."""
    rows = data.evaluations.loc[pick.values]
    absent = data.trials[~data.trials["trial_id"].isin(rows["trial_id"])]
    if len(absent):
        filler = absent.assign(split=split, step=np.nan, final=False, at_beta_max=False)
        rows = pd.concat([rows, filler[[c for c in EVALUATION_COLUMNS if c in filler.columns]]])
    rows = rows.sort_values("trial_id", kind="stable").reset_index(drop=True)
    return rows[list(EVALUATION_COLUMNS)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ReportError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def final_rows(data: StudyData, *, split: str = "valid") -> pd.DataFrame:
    """One row per trial: its last evaluation on ``split``, with config columns and status.

    Pruned, failed and running trials give their last evaluation so far; a trial with no
    evaluation on ``split`` (pending, failed early; ``test`` before the end) gives a row of NaN
    metrics with ``step`` NaN.
    """
    _check_split(split)
    ev = data.evaluations[data.evaluations["split"] == split]
    return _per_trial(data, split, ev.groupby("trial_id", sort=False)["step"].idxmax())


def best_rows(data: StudyData, *, metric: str = "elbo", split: str = "valid",
              mode: Literal["max", "min"] | None = None) -> pd.DataFrame:
    """One row per trial: its evaluation on ``split`` with the best ``metric`` (earliest on ties).

    Best is the maximum (``mode="max"``) or the minimum; by default the maximum for elbo, mi
    and au, the minimum for rec, kl, loss, nll_elbo, ppl, iw_nll and iw_ppl. Trials without a
    finite value give a NaN row as in :func:`final_rows`.
    """
    _check_split(split)
    if metric not in _HIGHER_IS_BETTER | _LOWER_IS_BETTER:
        choices = ", ".join(sorted(_HIGHER_IS_BETTER | _LOWER_IS_BETTER))
        raise ReportError(f"metric must be one of {choices}, got {metric!r}")
    ev = data.evaluations
    ev = ev[(ev["split"] == split) & ev[metric].notna()]
    grouped = ev.groupby("trial_id", sort=False)[metric]
    highest = metric in _HIGHER_IS_BETTER if mode is None else mode == "max"
    pick = grouped.idxmax() if highest else grouped.idxmin()
    return _per_trial(data, split, pick)
