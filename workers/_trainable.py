"""The Ray Tune function trainable: ``train_trial`` + MLflow child-run logging from the worker.

Tune config: ``{"trial": TrialConfig dict, "study": {"name", "tracking_uri", "experiment_id",
"parent_run_id"}}``. Logging happens here, on the worker, so artifacts from trials on remote
nodes reach the tracking server; a resumed trial re-attaches to its MLflow run (matched by the
``klstudy.trial_id`` tag under the study's parent run) instead of creating a second one.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from workers._config import TrialConfig
from workers._records import mlflow_metrics
from workers._trainer import Evaluation, train_trial

log = logging.getLogger(__name__)

TRIAL_KEY = "klstudy_trial_id"
_TERMINAL = ("completed", "pruned")
# Metrics are sent in batches at most this often (and at the end, or when the trial is stopped):
# one MLflow call costs ~30 ms, a toy evaluation interval well under a second.
_FLUSH_EVERY_S = 10.0
# Tune copies every reported checkpoint into the study directory; on short evaluation intervals
# that copying costs more than the training. A killed study loses at most this much per trial.
_CHECKPOINT_EVERY_S = 30.0


class TrialRunLogger:
    """The MLflow child run of one trial, logged through a ``MlflowClient`` (batched)."""

    def __init__(self, study: dict[str, Any], config: TrialConfig) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=study["tracking_uri"])
        self.config = config
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        self.run_id = self._attach_or_create(study)

    def _attach_or_create(self, study: dict[str, Any]) -> str:
        parent, trial_id = study["parent_run_id"], self.config.trial_id
        found = self.client.search_runs(
            [study["experiment_id"]],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`klstudy.trial_id` = '{trial_id}'",
            max_results=1,
        )
        self.already_finished = bool(found) and found[0].data.tags.get("klstudy.status") in _TERMINAL
        if self.already_finished:  # finished before a restore whose Tune state lagged behind
            return found[0].info.run_id
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "klstudy.status", "running")
            return run_id
        run = self.client.create_run(
            study["experiment_id"],
            run_name=trial_id,
            tags={"mlflow.parentRunId": parent, "klstudy.role": "trial", "klstudy.study": study["name"],
                  "klstudy.trial_id": trial_id, "klstudy.status": "running"},
        )
        self._log_config(run.info.run_id)
        return run.info.run_id

    def _log_config(self, run_id: str) -> None:
        from mlflow.entities import Param

        params = [Param(k, "None" if v is None else str(v)) for k, v in self.config.to_dict().items()]
        self.client.log_batch(run_id, params=params)
        self.client.log_dict(run_id, self.config.to_dict(), "config.json")

    def log_evaluation(self, ev: Evaluation) -> None:
        """Queue an evaluation's metrics; they are sent in one batch every ``_FLUSH_EVERY_S``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, v, now, ev.step) for k, v in mlflow_metrics(ev).items())
        if ev.final or time.monotonic() - self._last_flush >= _FLUSH_EVERY_S:
            self.flush()
        if ev.latents and ev.final:  # every step's latents are in the Parquet records
            self.client.log_figure(self.run_id, latent_figure(ev), f"latents/step_{ev.step:07d}.png")

    def flush(self) -> None:
        """Send the queued metrics (MLflow takes at most 1,000 per call)."""
        for start in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[start : start + 1000])
        self._pending = []
        self._last_flush = time.monotonic()

    def finish(self, status: str, error: str | None = None) -> None:
        self.client.set_tag(self.run_id, "klstudy.status", status)
        if error:
            self.client.set_tag(self.run_id, "klstudy.error", error[:4000])
        self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "FAILED")


def latent_figure(ev: Evaluation):  # -> matplotlib Figure
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2, 3.2), dpi=100)
    ax = fig.add_subplot()
    xs, ys = zip(*ev.latents or [(0.0, 0.0)])
    ax.scatter(xs, ys, c=range(len(xs)), cmap="viridis", s=18)
    ax.set_title(f"E[z|x], step {ev.step}")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    fig.tight_layout()
    return fig


def tune_result(ev: Evaluation, config: TrialConfig, run_id: str | None) -> dict[str, Any]:
    """The dict reported to Tune for one evaluation (flat metric names, plus bookkeeping)."""
    result: dict[str, Any] = dict(ev.flat())
    result.update(step=ev.step, final=ev.final, at_beta_max=ev.at_beta_max,
                  mlflow_run_id=run_id or "", **{TRIAL_KEY: config.trial_id})
    if ev.latents:
        result["latents"] = [list(p) for p in ev.latents]
    return result


def run_trial(tune_config: dict[str, Any]) -> None:
    """Ray Tune function trainable: trains one trial, reporting every evaluation to Tune."""
    from ray import tune

    config = TrialConfig.from_dict(tune_config["trial"]).resolved()
    study = tune_config.get("study") or {}
    run_log = TrialRunLogger(study, config) if study.get("tracking_uri") else None
    if run_log is not None and run_log.already_finished:
        log.info("trial %s already finished; not training it again", config.trial_id)
        return
    checkpoint = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="klstudy-ckpt-") as work:
        resume_from = _restore_dir(checkpoint, Path(work) / "restored") if checkpoint else None

        def report(ev: Evaluation) -> None:
            if run_log is not None:
                run_log.log_evaluation(ev)
            ckpt = tune.Checkpoint.from_directory(str(ev.checkpoint)) if ev.checkpoint else None
            tune.report(tune_result(ev, config, run_log and run_log.run_id), checkpoint=ckpt)

        try:
            train_trial(config, report=report, checkpoint_dir=Path(work) / "current",
                        resume_from=resume_from, checkpoint_every_s=_CHECKPOINT_EVERY_S)
        except Exception as exc:
            if run_log is not None:
                run_log.flush()
                run_log.finish("error", error=f"{type(exc).__name__}: {exc}")
            raise
        except SystemExit:  # Tune stops a trial (e.g. pruned) by exiting its training thread
            if run_log is not None:
                run_log.flush()
            raise
    if run_log is not None:
        run_log.finish("completed")


def _restore_dir(checkpoint: Any, target: Path) -> Path:
    return Path(checkpoint.to_directory(str(target)))
