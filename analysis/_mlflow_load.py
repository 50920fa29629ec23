"""Rebuilding a study's tables from MLflow, in bulk (when the Parquet records are absent).

The result is the same :class:`analysis._load.StudyData` the Parquet path gives: trial runs
(params = resolved config, tags = status) become ``trials``, their ``split/metric`` histories
become ``evaluations`` rows exactly as the study driver writes them.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis._load import ReportError, StudyData, assemble, coerce
from workers._records import (
    CONFIG_COLUMNS,
    EVAL_COLUMNS,
    METRIC_COLUMNS,
    REMEDY_COLUMNS,
    SPLITS,
    TRIAL_COLUMNS,
)
from workers._schedules import at_beta_max

log = logging.getLogger(__name__)

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
    client = open_client(tracking_uri)
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
    trials = coerce(trials[~unconfigured], TRIAL_COLUMNS)
    scheme = _scheme(tracking_uri)
    if scheme in _DB_SCHEMES:
        history = _history_sql(tracking_uri, list(trials["mlflow_run_id"]))
    else:
        history = (_history_rest(client, runs) if scheme in ("http", "https") else None)
        history = history if history is not None else _history_per_run(client, runs)
    evaluations = _tidy_metrics(history, trials)
    last = evaluations.groupby("trial_id")["step"].max()
    trials["last_step"] = trials["trial_id"].map(last)
    return assemble(evaluations, trials, pd.DataFrame(), meta={}, source="mlflow")


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else "file"


def open_client(uri: str) -> Any:
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
            # remedies: absent from studies older than them (the trial table fills defaults)
            **{name: params.get(name) for name in (*CONFIG_COLUMNS, *REMEDY_COLUMNS)},
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
                             for (s, _, _), ok in zip(parts, usable, strict=True)])
    metric_of_key = np.array([METRIC_COLUMNS.index(m) if ok else -1
                              for (_, _, m), ok in zip(parts, usable, strict=True)])
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
    config = trials[["study", "trial_id", *CONFIG_COLUMNS, *REMEDY_COLUMNS]].iloc[np.maximum(position, 0)]
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
