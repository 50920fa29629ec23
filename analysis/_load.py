"""Reading a study into tidy tables: the Parquet fast path, or a rebuild from MLflow.

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

from workers._records import (
    CONFIG_COLUMNS,
    EVAL_COLUMNS,
    LATENT_COLUMNS,
    METRIC_COLUMNS,
    SPLITS,
    TRIAL_COLUMNS,
)
from workers._schedules import at_beta_max

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
    return _assemble(evaluations, trials, latents, meta=meta, source="parquet")


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


def _coerce(df: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
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


def _assemble(evaluations: pd.DataFrame, trials: pd.DataFrame, latents: pd.DataFrame, *,
              meta: dict[str, Any], source: Literal["parquet", "mlflow"]) -> StudyData:
    """Coerce, deduplicate (a resumed trial may repeat a step: the last row wins), join status."""
    ev = _sorted(_coerce(evaluations, EVAL_COLUMNS), ["trial_id", "step", "split"])
    trials = _coerce(trials, TRIAL_COLUMNS)
    missing = sorted(set(ev["trial_id"].unique()) - set(trials["trial_id"]))
    if missing:  # trials.parquet lags the evaluations: those trials are running
        first = ev[ev["trial_id"].isin(missing)].groupby("trial_id", sort=False)
        extra = first.first().reset_index().assign(status="running",
                                                   last_step=first["step"].max().values)
        trials = pd.concat([trials, _coerce(extra, TRIAL_COLUMNS)], ignore_index=True)
    trials = _sorted(trials, ["trial_id"])
    status = ev["trial_id"].map(trials.set_index("trial_id")["status"])
    ev["status"] = status.astype(trials["status"].dtype)
    latents = _sorted(_coerce(latents, LATENT_COLUMNS), ["trial_id", "step", "index"])
    partial = bool(trials["status"].isin(_UNFINISHED).any()) or _meta_partial(meta, trials)
    return StudyData(ev, trials, latents, meta=meta, partial=partial, source=source)


# --- MLflow ---------------------------------------------------------------------------------
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_BULK_ENDPOINT = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"
_BULK_MAX_RUNS, _BULK_MAX_POINTS = 100, 25000  # the server's limits per request
_SQL_CHUNK_RUNS = 500
_RUN_STATUS = {"RUNNING": "running", "SCHEDULED": "running", "FINISHED": "completed",
               "FAILED": "error", "KILLED": "error"}
_HISTORY_COLUMNS = ["run_id", "key", "step", "value", "timestamp"]


def load_from_mlflow(tracking_uri: str, experiment: str, *,
                     parent_run_id: str | None = None) -> StudyData:
    """Rebuild a study's tables from its MLflow experiment, in bulk.

    One paged ``search_runs`` brings every trial run with its params and tags; the metric
    histories then come in bulk: straight from the ``metrics`` table for database stores (one
    query per 500 runs), from the server's ``get-history-bulk`` endpoint for http(s) stores (one
    request per metric and 100 runs), one call per run and metric (threaded) otherwise.

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment: the experiment name (= the study name).
        parent_run_id: the study's parent run (default: the latest run tagged
            ``klstudy.role=study``).

    Raises:
        ReportError: the store does not exist, the experiment is unknown or has no trial runs.
    """
    client = _open_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"experiment {experiment!r} not found in the tracking store "
                          f"{tracking_uri}")
    runs = _trial_runs(client, exp.experiment_id, parent_run_id)
    if not runs:
        raise ReportError(f"experiment {experiment!r} in {tracking_uri} has no trial runs")
    trials = _trials_frame(runs, study=experiment)
    unconfigured = trials[list(CONFIG_COLUMNS)].isna().any(axis=1)
    if unconfigured.any():  # created, params not logged yet
        log.warning("skipping %d trial run(s) without config params: %s", unconfigured.sum(),
                    ", ".join(trials.loc[unconfigured, "mlflow_run_id"]))
    trials = _coerce(trials[~unconfigured], TRIAL_COLUMNS)
    scheme = _scheme(tracking_uri)
    if scheme in _DB_SCHEMES:
        history = _history_sql(tracking_uri, list(trials["mlflow_run_id"]))
    else:
        history = (_history_rest(client, runs) if scheme in ("http", "https") else None)
        history = history if history is not None else _history_per_run(client, runs)
    evaluations = _tidy_metrics(history, trials)
    last = evaluations.groupby("trial_id")["step"].max()
    trials["last_step"] = trials["trial_id"].map(last)
    return _assemble(evaluations, trials, pd.DataFrame(), meta={}, source="mlflow")


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else "file"


def _open_client(uri: str) -> Any:
    """An ``MlflowClient``, after checking that the store exists (a client would create one)."""
    from mlflow.tracking import MlflowClient

    scheme = _scheme(uri)
    if scheme == "sqlite":
        from sqlalchemy.engine import make_url

        database = make_url(uri).database
        if database and database != ":memory:" and not Path(database).is_file():
            raise ReportError(f"tracking store {uri}: no such database file {database!r}")
    elif scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, OSError) as exc:
            raise ReportError(f"tracking server {uri} is not reachable ({exc})") from exc
    return MlflowClient(tracking_uri=uri)


def _trial_runs(client: Any, experiment_id: str, parent_run_id: str | None) -> list[Any]:
    if parent_run_id is None:
        parents = client.search_runs([experiment_id], "tags.`klstudy.role` = 'study'",
                                     max_results=1, order_by=["attributes.start_time DESC"])
        parent_run_id = parents[0].info.run_id if parents else None
    query = (f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id
             else "tags.`klstudy.role` = 'trial'")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _trials_frame(runs: list[Any], *, study: str) -> pd.DataFrame:
    rows = []
    for run in runs:
        params, tags = run.data.params, run.data.tags
        rows.append({
            "study": tags.get("klstudy.study", study),
            "trial_id": (tags.get("klstudy.trial_id") or params.get("trial_id")
                         or run.info.run_name),
            **{name: params.get(name) for name in CONFIG_COLUMNS},
            "status": tags.get("klstudy.status") or _RUN_STATUS.get(run.info.status, "running"),
            "pruned_at_step": tags.get("klstudy.pruned_at_step"),
            "error": tags.get("klstudy.error"),
            "mlflow_run_id": run.info.run_id, "node_ip": tags.get("klstudy.node_ip"),
        })
    frame = pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))
    return frame.drop_duplicates("trial_id", keep="last")  # a re-created run: the latest counts


def _history_sql(uri: str, run_ids: list[str]) -> pd.DataFrame:
    """Every metric point of ``run_ids``, straight from the store's ``metrics`` table.

    The query is built with SQLAlchemy (any MLflow database) but fetched through the raw DBAPI
    cursor: plain tuples are twice as fast as SQLAlchemy rows for millions of points.
    """
    import sqlalchemy as sa

    table = sa.table("metrics", *(sa.column(c) for c in
                                  ("run_uuid", "key", "step", "value", "timestamp", "is_nan")))
    engine = sa.create_engine(uri)
    connection = engine.raw_connection()
    frames = []
    try:
        cursor = connection.cursor()
        for start in range(0, len(run_ids), _SQL_CHUNK_RUNS):
            chunk = run_ids[start:start + _SQL_CHUNK_RUNS]
            query = sa.select(*table.c).where(table.c.run_uuid.in_(chunk))
            sql = query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
            cursor.execute(str(sql))
            frames.append(pd.DataFrame.from_records(cursor.fetchall(),
                                                    columns=[*_HISTORY_COLUMNS, "is_nan"]))
        cursor.close()
    finally:
        connection.close()
        engine.dispose()
    frame = pd.concat(frames, ignore_index=True)
    frame.loc[frame["is_nan"].astype(bool), "value"] = np.nan
    return frame.drop(columns="is_nan")


def _points_per_run(runs: list[Any]) -> int:
    most = 1
    for run in runs:
        try:
            p = run.data.params
            most = max(most, int(p["total_steps"]) // max(1, int(p["eval_every_steps"])) + 1)
        except (KeyError, ValueError):
            return _BULK_MAX_POINTS // _BULK_MAX_RUNS
    return most


def _history_rest(client: Any, runs: list[Any]) -> pd.DataFrame | None:
    """Metric histories through the server's bulk endpoint; None when the server has none."""
    from mlflow.utils.rest_utils import http_request

    get_creds = getattr(getattr(client, "_tracking_client", None), "store", None)
    if not hasattr(get_creds, "get_host_creds"):
        return None
    creds = get_creds.get_host_creds()
    size = max(1, min(_BULK_MAX_RUNS, _BULK_MAX_POINTS // _points_per_run(runs)))
    by_key: dict[str, list[str]] = {}
    for run in runs:
        for key in run.data.metrics:
            by_key.setdefault(key, []).append(run.info.run_id)
    jobs = [(k, ids[i:i + size]) for k, ids in by_key.items() for i in range(0, len(ids), size)]

    def fetch(key: str, run_ids: list[str]) -> list[dict[str, Any]]:
        response = http_request(creds, _BULK_ENDPOINT, "GET", params={
            "run_id": run_ids, "metric_key": key, "max_results": _BULK_MAX_POINTS})
        if response.status_code == 404:
            raise LookupError(_BULK_ENDPOINT)
        response.raise_for_status()
        points = response.json().get("metrics", [])
        if len(points) < _BULK_MAX_POINTS:
            return points
        if len(run_ids) == 1:  # one very long history: the paged per-run call
            return [_point(run_ids[0], m) for m in client.get_metric_history(run_ids[0], key)]
        half = len(run_ids) // 2
        return fetch(key, run_ids[:half]) + fetch(key, run_ids[half:])

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            chunks = list(pool.map(lambda job: fetch(*job), jobs))
    except LookupError:
        log.info("the tracking server has no %s endpoint: one request per run and metric",
                 _BULK_ENDPOINT)
        return None
    return pd.DataFrame([p for chunk in chunks for p in chunk], columns=_HISTORY_COLUMNS)


def _point(run_id: str, metric: Any) -> dict[str, Any]:
    return {"run_id": run_id, "key": metric.key, "step": metric.step, "value": metric.value,
            "timestamp": metric.timestamp}


def _history_per_run(client: Any, runs: list[Any]) -> pd.DataFrame:
    jobs = [(run.info.run_id, key) for run in runs for key in run.data.metrics]
    with ThreadPoolExecutor(max_workers=8) as pool:
        chunks = pool.map(
            lambda job: [_point(job[0], m) for m in client.get_metric_history(*job)], jobs)
        points = [p for chunk in chunks for p in chunk]
    return pd.DataFrame(points, columns=_HISTORY_COLUMNS)


def _tidy_metrics(history: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """``split/metric`` points → EVAL_COLUMNS rows, as the study driver writes them to Parquet."""
    if history.empty:
        return pd.DataFrame(columns=list(EVAL_COLUMNS))
    run_codes, run_ids = pd.factorize(history["run_id"])
    key_codes, keys = pd.factorize(history["key"])
    parts = [str(k).partition("/") for k in keys]
    usable = [s in SPLITS and m in METRIC_COLUMNS for s, _, m in parts]
    split_of_key = np.array([SPLITS.index(s) if ok else -1
                             for (s, _, _), ok in zip(parts, usable)])
    metric_of_key = np.array([METRIC_COLUMNS.index(m) if ok else -1
                              for (_, _, m), ok in zip(parts, usable)])
    step = history["step"].to_numpy(np.int64)
    order = np.lexsort((history["timestamp"].to_numpy(np.int64), step, key_codes, run_codes))
    run_codes, key_codes, step = run_codes[order], key_codes[order], step[order]
    value = history["value"].to_numpy(np.float64)[order]
    same_as_next = ((run_codes[:-1] == run_codes[1:]) & (key_codes[:-1] == key_codes[1:])
                    & (step[:-1] == step[1:]))
    keep = np.append(~same_as_next, True) & (metric_of_key[key_codes] >= 0)  # last write wins
    run_codes, key_codes, step, value = run_codes[keep], key_codes[keep], step[keep], value[keep]
    split = split_of_key[key_codes]
    step_codes, steps = pd.factorize(step)
    composite = (run_codes.astype(np.int64) * len(steps) + step_codes) * len(SPLITS) + split
    row_of_point, rows = pd.factorize(composite)
    matrix = np.full((len(rows), len(METRIC_COLUMNS)), np.nan)
    matrix[row_of_point, metric_of_key[key_codes]] = value
    row_split, rest = rows % len(SPLITS), rows // len(SPLITS)
    # β and lr belong to the step: valid/test rows repeat the train row's (workers._records)
    train_row = pd.Index(rows).get_indexer(rest * len(SPLITS))
    for name in ("beta", "lr"):
        col = METRIC_COLUMNS.index(name)
        taken = np.where(train_row >= 0, matrix[np.maximum(train_row, 0), col], np.nan)
        matrix[:, col] = np.where(row_split == 0, matrix[:, col], taken)
    frame = pd.DataFrame(matrix, columns=list(METRIC_COLUMNS))
    run_of_row = np.asarray(run_ids)[rest // len(steps)]
    position = pd.Index(trials["mlflow_run_id"]).get_indexer(run_of_row)
    config = trials[["study", "trial_id", *CONFIG_COLUMNS]].iloc[np.maximum(position, 0)]
    frame = pd.concat([config.reset_index(drop=True), frame], axis=1)
    frame["step"] = np.asarray(steps)[rest % len(steps)]
    frame["split"] = np.asarray(SPLITS, dtype=object)[row_split]
    frame = frame[position >= 0]
    frame["final"] = frame["step"] == frame["total_steps"]
    frame["at_beta_max"] = _at_beta_max(frame)
    return frame


def _at_beta_max(frame: pd.DataFrame) -> np.ndarray:
    keys = ["step", "total_steps", "n_cycles", "ratio"]
    unique = frame[keys].drop_duplicates()
    flags = [1 <= s <= t and at_beta_max(int(s), total_steps=int(t), n_cycles=int(m),
                                         ratio=float(r))
             for s, t, m, r in unique.itertuples(index=False)]
    lookup = unique.assign(_flag=flags)
    return frame[keys].merge(lookup, on=keys, how="left")["_flag"].to_numpy(bool)


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


def best_rows(data: StudyData, *, metric: str = "elbo", split: str = "valid") -> pd.DataFrame:
    """One row per trial: its evaluation on ``split`` with the best ``metric`` (earliest on ties).

    Best is the maximum for elbo, mi and au, the minimum for rec, kl, loss, nll_elbo, ppl,
    iw_nll and iw_ppl; trials without a finite value give a NaN row as in :func:`final_rows`.
    """
    _check_split(split)
    if metric not in _HIGHER_IS_BETTER | _LOWER_IS_BETTER:
        choices = ", ".join(sorted(_HIGHER_IS_BETTER | _LOWER_IS_BETTER))
        raise ReportError(f"metric must be one of {choices}, got {metric!r}")
    ev = data.evaluations
    ev = ev[(ev["split"] == split) & ev[metric].notna()]
    grouped = ev.groupby("trial_id", sort=False)[metric]
    pick = grouped.idxmax() if metric in _HIGHER_IS_BETTER else grouped.idxmin()
    return _per_trial(data, split, pick)
