"""The Ray Tune function trainable: ``train_trial`` + MLflow child-run logging from the worker.

Tune config: ``{"trial": TrialConfig dict, "study": {"name", "tracking_uri", "experiment_id",
"parent_run_id", "spool_dir"}}``. Logging happens here, on the worker, so artifacts from
trials on remote nodes reach the tracking server, and it goes through the study's on-disk
spool (:mod:`workers._spool`): training and ``tune.report`` never wait for MLflow, an outage
only delays the writes. A resumed trial re-attaches to its MLflow run (found by the
``klstudy.trial_id`` tag under the study's parent run) instead of creating a second one.

Reliability rules kept here:

- the first evaluation is always checkpointed (then at most every ``_CHECKPOINT_EVERY_S``), so
  a trial killed early does not replay from step 0;
- a trial's final checkpoint holds its final result (``final_result.json``): a worker restored
  from it re-reports that result to Tune (``replayed``) instead of training or going silent;
- deterministic failures (:data:`DETERMINISTIC_ERRORS`) end the trial with a last result
  carrying ``klstudy_error`` and return normally, so that Tune does not retry them; any other
  exception propagates, so that Tune retries the trial from its checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from workers._config import ConfigError, PluginError, TrialConfig
from workers._data import DataError
from workers._records import mlflow_metrics
from workers._secrets import reveal
from workers._spool import Spool, shared_spool, trial_key
from workers._trainer import (
    CheckpointError,
    Evaluation,
    NonFiniteLossError,
    load_trial_corpus,
    train_trial,
)

log = logging.getLogger(__name__)

TRIAL_KEY = "klstudy_trial_id"
ERROR_KEY = "klstudy_error"
FINAL_RESULT_FILE = "final_result.json"
HISTORY_KEY = "klstudy_history"  # in final_result.json: what the worker reported before it
REPLAYED_KEY = "replayed"  # a result re-reported from a final checkpoint, not trained again
# in the Tune config's "study": {trial id: final_result.json path} from an earlier experiment
FINAL_RESULTS_KEY = "final_results"
DETERMINISTIC_ERRORS = (NonFiniteLossError, DataError, ConfigError, CheckpointError, PluginError)
# Tune copies every reported checkpoint into the study directory; on short evaluation intervals
# that copying costs more than the training. A killed study loses at most this much per trial.
_CHECKPOINT_EVERY_S = 30.0
# At its end a trial waits at most this long for its spooled writes to reach MLflow; whatever
# is left is sent by this process's spool thread later, or by the driver's drain_spools.
_END_FLUSH_S = 2.0
_MLFLOW_STATUS = {"completed": "FINISHED", "pruned": "KILLED", "error": "FAILED"}


def spool_dir(study: dict[str, Any]) -> Path:
    """The study's spool root (``study["spool_dir"]``), else one in the temp dir per parent run."""
    if study.get("spool_dir"):
        return Path(study["spool_dir"])
    parent = str(study.get("parent_run_id") or "none")
    return Path(tempfile.gettempdir()) / "klstudy-spool" / parent


class TrialRunLogger:
    """The MLflow child run of one trial, written through the study's spool (never blocks)."""

    def __init__(self, study: dict[str, Any], config: TrialConfig, *,
                 spool: Spool | None = None) -> None:
        self.config = config
        self.spool = spool or shared_spool(spool_dir(study), study["tracking_uri"])
        parent, trial_id = study["parent_run_id"], config.trial_id
        self.key = self.spool.define_run(
            trial_key(trial_id), experiment_id=study["experiment_id"], run_name=trial_id,
            tags={"mlflow.parentRunId": parent, "klstudy.role": "trial",
                  "klstudy.study": study["name"], "klstudy.trial_id": trial_id,
                  "klstudy.status": "running",
                  # what the driver adds per trial (a race's round: {"race_round": "2"})
                  **{str(k): str(v) for k, v in (study.get("run_tags") or {}).items()}},
            match_tags={"mlflow.parentRunId": parent, "klstudy.trial_id": trial_id},
        )

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once the spool resolved it (None while MLflow never answered)."""
        return self.spool.run_id(self.key)

    def start(self) -> None:
        """Mark the run running (also a run an earlier attempt left FAILED) and log the config."""
        self.spool.set_status(self.key, "RUNNING", tags={"klstudy.status": "running"})
        self.spool.log_params(self.key, self.config.to_params())
        self.spool.log_dict(self.key, self.config.to_dict(), "config.json")

    def log_evaluation(self, ev: Evaluation) -> None:
        """Spool an evaluation's metrics (and, at the end, the latent scatter of 2-D models)."""
        self.spool.log_metrics(self.key, mlflow_metrics(ev), step=ev.step)
        if ev.latents and ev.final:  # every step's latents are in the Parquet records
            self.spool.log_artifact_bytes(self.key, figure_png(latent_figure(ev)),
                                          f"latents/step_{ev.step:07d}.png")

    def flush(self, timeout_s: float = _END_FLUSH_S) -> bool:
        return self.spool.flush(timeout_s)

    def note_error(self, error: str) -> None:
        """An error Tune may retry: recorded as a tag; the status is left to the retry/driver."""
        self.spool.set_tags(self.key, {"klstudy.last_error": error[:4000]})

    def finish(self, status: str, error: str | None = None, *,
               wait_s: float = _END_FLUSH_S) -> bool:
        """End the run with a klstudy status (completed, pruned, error); waits up to
        ``wait_s`` for the spool to send it; True when everything was sent."""
        tags = {"klstudy.status": status}
        if error:
            tags["klstudy.error"] = error[:4000]
        self.spool.terminate(self.key, _MLFLOW_STATUS.get(status, "FAILED"), tags=tags)
        return self.spool.flush(wait_s)


def latent_figure(ev: Evaluation):  # -> matplotlib Figure
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2, 3.2), dpi=100)
    ax = fig.add_subplot()
    xs, ys = zip(*ev.latents or [(0.0, 0.0)], strict=True)
    ax.scatter(xs, ys, c=range(len(xs)), cmap="viridis", s=18)
    ax.set_title(f"E[z|x], step {ev.step}")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    fig.tight_layout()
    return fig


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def tune_result(ev: Evaluation, config: TrialConfig, run_id: str | None) -> dict[str, Any]:
    """The dict reported to Tune for one evaluation (flat metric names, plus bookkeeping)."""
    result: dict[str, Any] = dict(ev.flat())
    result.update(step=ev.step, final=ev.final, at_beta_max=ev.at_beta_max,
                  mlflow_run_id=run_id or "", **{TRIAL_KEY: config.trial_id})
    if ev.latents:
        result["latents"] = [list(p) for p in ev.latents]
    return result


class _Reporter:
    """The ``report`` callback of ``train_trial``: spool first (local disk), then Tune.

    It keeps what this worker reported: the final checkpoint holds it (``final_result.json``,
    ``history``), because a driver killed before it recorded the evaluations that followed the
    checkpoint Tune resumes from has lost their rows, and a worker restored from the final
    checkpoint re-reports instead of training them again.
    """

    def __init__(self, config: TrialConfig, run_log: TrialRunLogger | None, tune: Any) -> None:
        self.config, self.run_log, self.tune = config, run_log, tune
        self.last_step = 0
        self.history: list[dict[str, Any]] = []

    def __call__(self, ev: Evaluation) -> None:
        self.last_step = ev.step
        if self.run_log is not None:
            self.run_log.log_evaluation(ev)
        result = tune_result(ev, self.config, self.run_log and self.run_log.run_id)
        ckpt = None
        if ev.checkpoint is not None:
            if ev.final:  # a worker restored from this checkpoint re-reports instead of training
                stored = {**result, HISTORY_KEY: self.history}
                (ev.checkpoint / FINAL_RESULT_FILE).write_text(json.dumps(stored))
            ckpt = self.tune.Checkpoint.from_directory(str(ev.checkpoint))
        self.tune.report(result, checkpoint=ckpt)
        self.history.append(result)


def _tune() -> Any:
    from ray import tune

    return tune


def run_trial(tune_config: dict[str, Any]) -> None:
    """Ray Tune function trainable: trains one trial, reporting every evaluation to Tune.

    Returns normally when the trial completed or failed deterministically (its last result then
    has ``klstudy_error``); raises what Tune should retry; Tune's stop (SystemExit) passes.
    """
    tune = _tune()
    study = dict(tune_config.get("study") or {})
    if study.get("tracking_uri"):  # a redacted URI: its credentials are in the study's secrets
        study["tracking_uri"] = reveal(study["tracking_uri"], study_dir=study.get("study_dir"),
                                       key="tracking_uri")
    trial_id = str((tune_config.get("trial") or {}).get("trial_id", ""))
    run_log: TrialRunLogger | None = None
    reporter: _Reporter | None = None
    try:
        config = TrialConfig.from_dict(tune_config["trial"]).resolved()
        config.check()
        run_log = TrialRunLogger(study, config) if study.get("tracking_uri") else None
        reporter = _Reporter(config, run_log, tune)
        _run(config, run_log, reporter, tune,
             earlier_final=(study.get(FINAL_RESULTS_KEY) or {}).get(config.trial_id))
    except DETERMINISTIC_ERRORS as exc:  # would fail the same way again: end it, no retry
        reason = f"{type(exc).__name__}: {exc}"
        log.error("trial %s failed: %s", trial_id, reason)
        if run_log is not None:
            run_log.finish("error", error=reason)
        tune.report({ERROR_KEY: reason, "final": False, TRIAL_KEY: trial_id,
                     "step": reporter.last_step if reporter else 0,
                     "mlflow_run_id": (run_log and run_log.run_id) or ""})


def _run(config: TrialConfig, run_log: TrialRunLogger | None, reporter: _Reporter,
         tune: Any, *, earlier_final: str | None = None) -> None:
    """``earlier_final``: the final_result.json of this trial in an earlier Tune experiment of
    the study (the driver passes it when it restarted the experiment: ``study._driver``)."""
    checkpoint = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="klstudy-ckpt-") as work:
        resume_from = _restore_dir(checkpoint, Path(work) / "restored") if checkpoint else None
        if resume_from is not None and (resume_from / FINAL_RESULT_FILE).is_file():
            final = _read_final(resume_from / FINAL_RESULT_FILE)
        else:  # a driver killed before it registered the final checkpoint restores an older one
            final = stored_final_result(tune)
        if final is None and earlier_final:
            final = _read_final(Path(earlier_final))
        if final is not None:
            _replay_final(final, config, run_log, tune)
            return
        if run_log is not None:
            run_log.start()
        try:
            _train(config, reporter, Path(work) / "current", resume_from)
        except SystemExit:  # Tune stops a trial (e.g. pruned) by exiting its training thread
            if run_log is not None:
                run_log.flush(0.0)  # wakes the sender; the driver records the stop
            raise
        except DETERMINISTIC_ERRORS:
            raise
        except Exception as exc:  # Tune retries it from the last checkpoint
            if run_log is not None:
                run_log.note_error(f"{type(exc).__name__}: {exc}")
            raise
    if run_log is not None:
        run_log.finish("completed")


def _train(config: TrialConfig, report: _Reporter, ckpt_dir: Path,
           resume_from: Path | None) -> None:
    """``train_trial`` with a checkpoint at the first evaluation, then every 30 s (and at the
    end). A fresh trial runs in two segments: to its first evaluation, checkpointed and
    reported, then on from that checkpoint (resuming is bit-for-bit, so the trajectory is the
    one of an uninterrupted run)."""
    corpus = load_trial_corpus(config)
    if resume_from is None:
        first = train_trial(config, report=lambda ev: report(ev) or True, checkpoint_dir=ckpt_dir,
                            corpus=corpus, checkpoint_every_s=0.0)
        if first.status == "completed":
            return
        resume_from = ckpt_dir
    train_trial(config, report=report, checkpoint_dir=ckpt_dir, resume_from=resume_from,
                corpus=corpus, checkpoint_every_s=_CHECKPOINT_EVERY_S)


def _final_of(text: str) -> dict[str, Any] | None:
    """A ``final_result.json``'s result, or None when it is half copied (its copier was
    killed) or not a final result: then the trial trains on."""
    try:
        result = json.loads(text)
    except ValueError:
        return None
    return result if isinstance(result, dict) and result.get("final") else None


def _read_final(path: Path) -> dict[str, Any] | None:
    try:
        return _final_of(path.read_text())
    except OSError:
        return None


def stored_final_result(tune: Any) -> dict[str, Any] | None:
    """The final result in any of this trial's checkpoints in the study's storage, or None.

    Tune restores a trial from the last checkpoint its driver *registered*; a driver killed
    between a trial's final checkpoint landing in storage and the next experiment-state save
    restores an older one (or none), and the trial would be trained again."""
    try:
        import pyarrow.fs as pafs

        storage = tune.get_context().get_storage()
        fs, trial_path = storage.storage_filesystem, storage.trial_fs_path
        found = fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True))
        names = sorted((Path(f.path).name for f in found
                        if f.type == pafs.FileType.Directory
                        and Path(f.path).name.startswith("checkpoint_")), reverse=True)
        for name in names:
            path = f"{trial_path}/{name}/{FINAL_RESULT_FILE}"
            if fs.get_file_info(path).type != pafs.FileType.File:
                continue
            with fs.open_input_stream(path) as stream:
                result = _final_of(stream.read().decode(errors="replace"))
            if result is not None:
                return result
    except Exception as exc:  # noqa: BLE001 - a lookup that fails means: train as before
        log.warning("could not look for a final checkpoint in the trial's storage: %s", exc)
    return None


def _replay_final(result: dict[str, Any], config: TrialConfig, run_log: TrialRunLogger | None,
                  tune: Any) -> None:
    """The trial already ended with ``result`` (its final checkpoint): report again what the
    worker that trained it reported (the driver records the rows it lacks; the pruner ignores
    replayed results), then the final result."""
    history = result.pop(HISTORY_KEY, None) or []
    log.info("trial %s restored from its final checkpoint: re-reporting %d results",
             config.trial_id, len(history) + 1)
    if run_log is not None:
        result["mlflow_run_id"] = run_log.run_id or result.get("mlflow_run_id") or ""
        run_log.finish("completed")
    for earlier in history:
        tune.report({**earlier, "final": False, REPLAYED_KEY: True})
    tune.report({**result, "final": True, REPLAYED_KEY: True})


def _restore_dir(checkpoint: Any, target: Path) -> Path:
    return Path(checkpoint.to_directory(str(target)))
