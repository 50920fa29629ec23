"""Driver-side Tune callback: Parquet rows, trial statuses, MLflow status tags, terminal progress.

Workers log their own metrics to MLflow; what only the driver knows (that the Optuna pruner
stopped a trial, that a worker died) is recorded here, on the trial's run and in
``trials.parquet``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pyarrow.parquet as pq
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.result import SHOULD_CHECKPOINT

from study._optuna_bridge import OptunaMirror
from study._store import PartWriter, StudyDir, Throttle, read_parts, write_table
from workers import (
    TRIAL_COLUMNS,
    Evaluation,
    TrialConfig,
    config_columns,
    evaluation_rows,
    latent_rows,
    trial_key,
)

log = logging.getLogger(__name__)
progress_log = logging.getLogger("klstudy.progress")  # the CLI prints this logger's records

_FLUSH_EVERY_S = 5.0
ERROR_KEY = "klstudy_error"  # a worker's last result when its trial failed deterministically


def written_steps(folder: Any) -> dict[str, int]:
    """{trial id: highest step with rows} in the finished Parquet parts of ``folder``."""
    out: dict[str, int] = {}
    for table in read_parts(folder, ["trial_id", "step"]):  # a damaged part's rows are rewritten
        for trial_id, step in zip(table["trial_id"].to_pylist(), table["step"].to_pylist(),
                                  strict=True):
            out[trial_id] = max(out.get(trial_id, 0), int(step))
    return out


def evaluation_from_result(result: dict[str, Any]) -> Evaluation:
    """Rebuild the worker's :class:`Evaluation` from a Tune result dict."""
    splits: dict[str, dict[str, float]] = {"train": {}, "valid": {}, "test": {}}
    for key, value in result.items():
        split, _, name = key.partition("/")
        if split in splits and name and isinstance(value, (int, float)):
            splits[split][name] = float(value)
    latents = result.get("latents")
    return Evaluation(
        step=int(result["step"]),
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"] or None,
        final=bool(result.get("final")),
        at_beta_max=bool(result.get("at_beta_max")),
        checkpoint=None,
        latents=[tuple(p) for p in latents] if latents else None,
    )


class StudyRecorder(Callback):
    """Writes every evaluation to Parquet and keeps ``trials.parquet`` and MLflow statuses true."""

    progress_prefix = ""  # before the progress line (a race: "race round 2: ")

    def __init__(self, study_dir: StudyDir, *, study_name: str, configs: list[TrialConfig],
                 mirror: OptunaMirror, tracking_uri: str | None, n_trials: int | None = None,
                 objective: tuple[str, str] = ("elbo", "max")) -> None:
        self.study_dir = study_dir
        self.study_name = study_name
        self.mirror = mirror
        self.tracking_uri = tracking_uri
        self._n_trials = n_trials  # None (a race's round): the trials known so far
        self.trials: dict[str, dict[str, Any]] = {c.trial_id: self._new_row(c) for c in configs}
        self._rows: list[dict[str, Any]] = []
        self._latents: list[dict[str, Any]] = []
        self.objective = objective  # (metric, mode) of the study; "best" follows it
        self._final_value: dict[str, float] = {}
        self._written: dict[str, int] = {}  # highest step with Parquet rows, per trial
        self._flush_due = Throttle(_FLUSH_EVERY_S)
        self._progress_due = Throttle(_FLUSH_EVERY_S)
        self._started = time.monotonic()
        self._writers: tuple[PartWriter, PartWriter] | None = None
        self._client: Any = None

    @property
    def n_trials(self) -> int:
        """The study's trials (``n_trials``), or, without it, the trials known so far: those on
        disk after :meth:`setup` and this run's (a race's earlier rounds and its due one)."""
        return self._n_trials if self._n_trials is not None else len(self.trials)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_writers=None, _client=None, _rows=[], _latents=[])
        return state

    def setup(self, **info: Any) -> None:
        """At start and after a restore: continue from the statuses and rows already on disk."""
        self._started = time.monotonic()
        trials_file = self.study_dir.root / "trials.parquet"
        if trials_file.is_file():
            for row in pq.read_table(trials_file).to_pylist():
                self.trials[row["trial_id"]] = {**self.trials.get(row["trial_id"], {}), **row}
        self._written = written_steps(self.study_dir.root / "evaluations")
        self._final_value.update(self._finals_on_disk())

    def _finals_on_disk(self) -> dict[str, float]:
        """{trial id: final validation objective} of the trials recorded before a restore."""
        metric, out = self.objective[0], {}
        columns = ["trial_id", "split", "final", metric]
        for table in read_parts(self.study_dir.root / "evaluations", columns):
            for tid, split, final, value in zip(*(table[c].to_pylist() for c in columns),
                                                strict=True):
                if final and split == "valid" and value is not None:
                    out[tid] = float(value)
        return out

    # --- Tune hooks -----------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Running from its start (the first result of a PTB trial comes ~40 s later)."""
        row = self._trial_row(TrialConfig.from_dict(trial.config["trial"]))
        if row["status"] == "pending":
            row["status"] = "running"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        config = TrialConfig.from_dict(trial.config["trial"])
        row = self._trial_row(config)
        if result.get(ERROR_KEY):  # a deterministic failure, reported by the worker
            row.update(status="running", error=str(result[ERROR_KEY])[:4000])
            return
        ev = evaluation_from_result(result)
        if ev.step > self._written.get(config.trial_id, 0):  # a replayed step: written once
            self._written[config.trial_id] = ev.step
            self._rows.extend(evaluation_rows(self.study_name, config, ev))
            self._latents.extend(latent_rows(self.study_name, config.trial_id, ev))
        if ev.final:
            self._final_value[config.trial_id] = ev.valid.get(self.objective[0], math.nan)
        row.update(status="running", last_step=ev.step, node_ip=result.get("node_ip"),
                   mlflow_run_id=result.get("mlflow_run_id") or row.get("mlflow_run_id"))
        # A result with a checkpoint: Tune registers that checkpoint right after this hook and
        # then saves its experiment state, from which a killed driver resumes the trial past
        # this step. Every buffered row must be on disk before that (DESIGN §4: nothing lost).
        if result.get(SHOULD_CHECKPOINT) or self._flush_due():
            self.flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        config = TrialConfig.from_dict(trial.config["trial"])
        row = self._trial_row(config)
        last = trial.last_result or {}
        if row["status"] in ("completed", "pruned", "error") and not last.get("final") and not (
                last.get(ERROR_KEY)):
            return  # finished before a restore; the worker skipped it (see workers._trainable)
        if last.get(ERROR_KEY):
            row.update(status="error", error=str(last[ERROR_KEY])[:4000])
        elif self.mirror.state_of(config.trial_id) == TrialState.PRUNED:
            row.update(status="pruned", pruned_at_step=row.get("last_step"))
        elif last.get("final") and _is_nan(last.get(f"valid/{self.objective[0]}")):
            # Optuna cannot hold a NaN objective (its twin FAILs): the same outcome here
            row.update(status="error", error=f"completed, but its final valid/"
                       f"{self.objective[0]} is {last.get(f'valid/{self.objective[0]}')}: "
                       "no objective value to compare")
        elif last.get("final"):
            row.update(status="completed")
        else:
            row.update(status="error", error="stopped before its last step")
        self._tag_run(row)
        self.flush()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        config = TrialConfig.from_dict(trial.config["trial"])
        row = self._trial_row(config)
        row.update(status="error", error=_error_text(trial))
        self._tag_run(row)
        self.flush()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._progress_due():
            progress_log.info(self.progress_line())

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.flush()
        progress_log.info(self.progress_line())
        if self._client is not None:  # hand what is left to the driver's drain (_reconcile)
            self._client.close(10.0)
            self._client = None

    # --- bookkeeping ----------------------------------------------------------------------
    def _new_row(self, config: TrialConfig) -> dict[str, Any]:
        return {"study": self.study_name, "trial_id": config.trial_id, **config_columns(config),
                "status": "pending"}

    def _trial_row(self, config: TrialConfig) -> dict[str, Any]:
        if config.trial_id not in self.trials:
            self.trials[config.trial_id] = self._new_row(config)
        return self.trials[config.trial_id]

    def flush(self) -> None:
        if self._writers is None:
            self._writers = (PartWriter(self.study_dir.root / "evaluations"),
                             PartWriter(self.study_dir.root / "latents"))
        self._writers[0].write(self._rows)
        self._writers[1].write(self._latents)
        self._rows, self._latents = [], []
        write_table(self.study_dir.root / "trials.parquet", list(self.trials.values()),
                    TRIAL_COLUMNS)

    def _tag_run(self, row: dict[str, Any]) -> None:
        """What only the driver knows (pruned, error) goes to the trial's MLflow run through the
        trial's own spool stream (``workers._spool``): never an MLflow call inside Tune's event
        loop, and in order with the worker's own writes, even before the run exists."""
        if not self.tracking_uri:
            return
        try:
            if self._client is None:  # the driver's spool; the name is kept for pickling
                from workers._secrets import reveal
                from workers._spool import shared_spool

                uri = reveal(self.tracking_uri, study_dir=self.study_dir.root, key="tracking_uri")
                self._client = shared_spool(self.study_dir.root / "spool", uri)
            key = trial_key(row["trial_id"])
            if row["status"] == "pruned":
                self._client.terminate(key, "KILLED", tags={
                    "klstudy.status": "pruned",
                    "klstudy.pruned_at_step": row.get("pruned_at_step")})
            elif row["status"] == "error":
                self._client.terminate(key, "FAILED", tags={
                    "klstudy.status": "error", "klstudy.error": str(row.get("error"))[:4000]})
        except Exception:  # tracking trouble must not kill the study; the Parquet record stands
            log.warning("could not spool the MLflow status of trial %s", row["trial_id"],
                        exc_info=True)

    def counts(self) -> dict[str, int]:
        counts = {"completed": 0, "pruned": 0, "running": 0, "error": 0}
        for row in self.trials.values():
            if row["status"] in counts:
                counts[row["status"]] += 1
        counts["pending"] = max(0, self.n_trials - sum(counts.values()))
        return counts

    def progress_line(self) -> str:
        c = self.counts()
        elapsed = int(time.monotonic() - self._started)
        best = self._best_final()
        metric, mode = self.objective
        best_text = f"best valid {metric} {best[1]:.4f} ({best[0]})" if best else "best: -"
        return (f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {self.progress_prefix}"
                f"trials {self.n_trials}: "
                f"{c['completed']} done, {c['pruned']} pruned, {c['running']} running, "
                f"{c['error']} failed, {c['pending']} pending | {best_text}")

    def _best_final(self) -> tuple[str, float] | None:
        finite = [(tid, v) for tid, v in self._final_value.items() if math.isfinite(v)]
        pick = max if self.objective[1] == "max" else min
        return pick(finite, key=lambda item: item[1]) if finite else None


def _is_nan(value: Any) -> bool:
    """NaN, or not a number at all (a missing objective)."""
    return not isinstance(value, (int, float)) or math.isnan(value)


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path) as f:
                lines = [ln for ln in f.read().strip().splitlines() if ln.strip()]
            return lines[-1] if lines else "unknown error"
        except OSError:
            pass
    return "unknown error"
