"""Run and resume a study: Ray Tune ``Tuner`` + Optuna pruning + MLflow + Parquet.

``run_study`` starts a study in a fresh study directory; ``resume_study`` restores an
interrupted, killed or failed one from that directory alone (Tune experiment state, Optuna
storage, the same MLflow runs). One driver at a time holds the directory's lock. How a study
ended is recorded in ``study.json``: ``finished`` (every trial completed, pruned or failed with a
recorded reason), ``interrupted`` (Ctrl-C, or trials left unfinished: resumable) or ``failed``
(no trial completed). ``klstudy status`` is ``study._status``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study._cluster_check import connect
from study._parent_run import close_parent_run, open_parent_run, reopen_parent_run
from study._reconcile import reconcile
from study._status import (
    StudyError,
    objective_of,
    read_meta_checked,
    study_status,
    trial_counts,
)
from study._store import (
    LOCK_FILE,
    StudyDir,
    StudyLock,
    StudyLocked,
    describe_holder,
    lock_holder,
    now_iso,
)
from study._tuner import (  # noqa: F401 - _mirror, pruning_policy: used by bench/ and tests
    _build_tuner,
    _mirror,
    _trial_rows,
    pruning_policy,
)
from workers._secrets import redact_text, redact_url, reveal, write_secrets

if TYPE_CHECKING:
    from study._spec import StudySpec

log = logging.getLogger(__name__)
# Checkpoints are kept to 2 per trial, which makes Tune snapshot its state on every checkpoint
# and warn about it each time; the snapshots are cheap here (small experiment state).
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# klstudy prints its own progress line; Tune's new console output would add tables around it.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Tune's default loggers: JSON and CSV are kept (explicitly, below; result.json is what Tune's own
# analysis reads), TensorBoard is not — klstudy records every metric itself, and the TBX writer
# cost 6.5 ms of driver time per report, which the reporting trial waits for.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# On Ctrl-C Tune logs "Resume experiment with: Tuner.restore(...)" (klstudy prints its own resume
# command) and one "Could not fetch metrics" line per trial that never started (200 lines for a
# 240-trial study interrupted early).
_QUIET_RAY_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")


@dataclass(frozen=True)
class StudySummary:
    study_dir: Path
    name: str
    counts: dict[str, int]
    best_trial: str | None
    best_value: float | None  # of the objective (``objective``: "valid/elbo (max)")
    objective: str
    wall_s: float
    tracking_uri: str
    parent_run_id: str
    status: str = "finished"  # finished | interrupted | failed
    ran: bool = True  # False: `run` found this study already finished with the same spec


def run_study(spec: StudySpec, spec_text: str, *, study_dir: str | Path,
              address: str | None = None, tracking_uri: str | None = None,
              overwrite: bool = False) -> StudySummary:
    """Run a study to the end in a new study directory (see ``study._store``).

    A directory that already holds this study, finished, from the same spec: nothing is run
    (the summary says ``ran=False``), so a script that runs a study and then reports it can be
    run again. ``overwrite``: a study the directory holds is deleted first (under its lock).

    Raises:
        StudyError: the directory holds another study, or this one unfinished (the message
            says what to do), or another driver holds it.
    """
    sd = StudyDir(Path(study_dir).resolve())
    if sd.exists() and not overwrite:
        return _already_there(sd, spec)
    created = not sd.root.exists()
    sd.root.mkdir(parents=True, exist_ok=True)
    with _locked(sd, "klstudy run"):
        if overwrite and sd.exists():
            _clear(sd)
        try:
            we_started_ray = connect(sd.root, address)
        except StudyError:  # refused before anything was written: leave no study behind
            (sd.root / LOCK_FILE).unlink(missing_ok=True)
            if created and not any(sd.root.iterdir()):
                sd.root.rmdir()
            raise
        try:
            meta, optuna_study = _start_record(spec, spec_text, sd, tracking_uri, address)
        except BaseException:
            if we_started_ray:
                import ray

                ray.shutdown()
            raise
        return _fit(sd, meta, we_started_ray,
                    lambda: _build_tuner(spec, sd, _context(sd, meta), optuna_study))


def _already_there(sd: StudyDir, spec: StudySpec) -> StudySummary:
    """The summary of the finished study ``spec`` in ``sd``; else a StudyError that says what
    to do instead."""
    meta = read_meta_checked(sd, "run")
    root, name, status = str(sd.root), meta.get("name", "?"), meta.get("status", "?")
    holder = lock_holder(sd)
    if holder is not None:
        raise StudyError(f"study dir {root!r} is in use by {describe_holder(holder)}; wait for "
                         "it to end or stop that process")
    changed = _spec_changes(meta.get("spec") or {}, _redacted_spec(spec))
    if status == "finished" and not changed:
        log.info("study %r in %s already finished: nothing to run", name, root)
        return dataclasses.replace(_summarise(sd, meta, 0.0), ran=False)
    if changed:
        what = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3
                                         else "")
        raise StudyError(f"--study-dir: {root!r} holds study {name!r} ({status}) run from another "
                         f"spec ({what} differ); choose a new --study-dir, or replace that "
                         "study with --overwrite")
    counts = trial_counts(sd, meta["n_trials"])
    left = counts.get("pending", 0) + counts.get("running", 0)
    raise StudyError(f"--study-dir: {root!r} holds study {name!r}, {status} with {left} of "
                     f"{meta['n_trials']} trials unfinished; continue it with `klstudy resume "
                     f"{root}`, or start it afresh with --overwrite")


def _spec_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two resolved specs."""
    from study._parent_run import flatten

    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _clear(sd: StudyDir) -> None:
    """Delete the study ``sd`` holds (everything in the directory but the lock we hold)."""
    log.warning("--overwrite: deleting the study in %s", sd.root)
    _forget_sqlite_engines(sd.root)
    for entry in sd.root.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _forget_sqlite_engines(root: Path) -> None:
    """MLflow keeps one SQLAlchemy engine per store URI in the process: after the study's
    ``mlflow.db`` is deleted, a cached engine would write to the deleted file ("readonly
    database"). Drop the engines of sqlite stores under ``root`` (a run_study called again in
    the same process, e.g. from Python or a notebook)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engines = SqlAlchemyStore._engine_map
        with SqlAlchemyStore._engine_map_lock:
            for uri in [u for u in engines if u.startswith("sqlite:") and str(root) in u]:
                engines.pop(uri).dispose()
    except (ImportError, AttributeError):  # another MLflow: nothing cached that we know of
        pass


def _start_record(spec: StudySpec, spec_text: str, sd: StudyDir, tracking_uri: str | None,
                  address: str | None) -> tuple[dict[str, Any], str]:
    """Secrets, the redacted spec, the MLflow parent run and ``study.json`` of a new study."""
    uri = tracking_uri or spec.tracking.uri or sd.mlflow_url
    write_secrets(sd.root, {"tracking_uri": uri, "pruning_storage": spec.pruning.storage})
    spec_text = redact_text(spec_text, known=[uri, spec.pruning.storage, tracking_uri])
    (sd.root / "spec.yaml").write_text(spec_text)
    experiment_id, parent_run_id = open_parent_run(spec, spec_text, sd, uri)
    # Unique per study: two studies sharing one Optuna storage never share twins.
    optuna_study = f"{spec.name}.{parent_run_id[:12]}"
    meta = {"name": spec.name, "spec": _redacted_spec(spec), "tracking_uri": redact_url(uri),
            "experiment_name": spec.name, "experiment_id": experiment_id,
            "parent_run_id": parent_run_id, "optuna_study": optuna_study,
            "objective": {"metric": spec.objective.metric, "mode": spec.objective.mode},
            "status": "running", "n_trials": spec.n_trials(), "started_at": now_iso(),
            "finished_at": None, "address": address}
    sd.write_meta(meta)
    return meta, optuna_study


def _redacted_spec(spec: StudySpec) -> dict[str, Any]:
    data = spec.to_dict()
    data["tracking"]["uri"] = redact_url(data["tracking"]["uri"])
    data["pruning"]["storage"] = redact_url(data["pruning"]["storage"])
    return data


def _context(sd: StudyDir, meta: dict[str, Any]) -> dict[str, Any]:
    """What every trial gets about its study (credentials stay in ``secrets.json``)."""
    return {"name": meta["name"], "tracking_uri": meta["tracking_uri"],
            "experiment_id": meta["experiment_id"], "parent_run_id": meta["parent_run_id"],
            "study_dir": str(sd.root), "spool_dir": str(sd.root / "spool")}


class _locked:  # noqa: N801 - used as a context manager, like a function
    """The study lock, or a StudyError that names the holder."""

    def __init__(self, sd: StudyDir, command: str) -> None:
        self.lock = StudyLock(sd, command)

    def __enter__(self) -> StudyLock:
        try:
            return self.lock.acquire()
        except StudyLocked as exc:
            raise StudyError(f"study dir {str(self.lock.path.parent)!r} is in use by {exc}; wait "
                             "for it to end or stop that process") from None

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def resume_study(study_dir: str | Path, *, address: str | None = None,
                 allow_new_optuna: bool = False) -> StudySummary:
    """Continue an interrupted, killed or failed study from its directory to the end.

    Finished trials are not re-run; unfinished ones continue from their last checkpoint. When
    Tune's saved state is missing or unreadable the Tune experiment starts again inside the same
    study (finished trials are still skipped, the same MLflow runs and Optuna twins are used).

    Raises:
        StudyError: no study, a finished one, another driver holds it, or its Optuna storage
            lost the study (unless ``allow_new_optuna``).
    """
    sd = StudyDir(Path(study_dir).resolve())
    read_meta_checked(sd, "resume")
    with _locked(sd, "klstudy resume"):
        meta = read_meta_checked(sd, "resume")
        if meta.get("status") == "finished":
            raise StudyError(
                f"resume: study {meta['name']!r} in {str(sd.root)!r} already finished, nothing "
                f"to resume; its report: `klstudy report {sd.root}`; to run it again: `klstudy "
                f"run SPEC --study-dir {sd.root} --overwrite` (or a new --study-dir)")
        spec = _spec_from_meta(meta)
        for stale in [*sd.root.glob("evaluations/part-*.tmp"),
                      *sd.root.glob("latents/part-*.tmp")]:
            stale.unlink()  # half-written by a killed driver; we hold the lock, nobody writes
        optuna_study = meta.get("optuna_study", meta["name"])  # older studies: the spec name
        _check_optuna(sd, spec, optuna_study, allow_new=allow_new_optuna)
        we_started_ray = connect(sd.root, address or meta.get("address"))
        meta = sd.update_meta(status="running", resumed_at=now_iso())
        _safely("reopen the MLflow parent run", reopen_parent_run, _tracking(sd, meta), meta)
        return _fit(sd, meta, we_started_ray,
                    lambda: _restore_or_restart(sd, meta, spec, optuna_study))


def _tracking(sd: StudyDir, meta: dict[str, Any]) -> str:
    return reveal(meta["tracking_uri"], study_dir=sd.root, key="tracking_uri")


def _spec_from_meta(meta: dict[str, Any]) -> StudySpec:
    from study._spec import parse_spec

    return parse_spec(meta["spec"])


def _check_optuna(sd: StudyDir, spec: StudySpec, name: str, *, allow_new: bool) -> None:
    """A resumed study whose trials reported to Optuna must find its Optuna study again."""
    import optuna

    counts = trial_counts(sd, spec.n_trials())
    started = any(v for k, v in counts.items() if k != "pending")
    if not started or allow_new or spec.pruning.pruner == "none" and spec.search.kind == "grid":
        return
    url = reveal(redact_url(spec.pruning.storage), study_dir=sd.root,
                 key="pruning_storage") or sd.optuna_url
    try:
        names = optuna.get_all_study_names(storage=url)
    except Exception as exc:
        names, why = [], f"unreadable: {exc}"
    else:
        why = "it does not hold the study (missing or empty file?)"
    if name not in names:
        raise StudyError(
            f"resume: the Optuna storage {redact_url(url)} has lost study {name!r} ({why}), "
            "though trials have run: pruning and TPE would start from nothing. Restore the file, "
            "or resume with --allow-new-optuna to go on with a fresh Optuna history")


def _restore_or_restart(sd: StudyDir, meta: dict[str, Any], spec: StudySpec,
                        optuna_study: str):  # -> tune.Tuner
    from ray import tune

    from workers._trainable import run_trial

    r = spec.resources
    trainable = tune.with_resources(run_trial, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})
    if spec.search.kind == "race":  # a race rebuilds its due round from the store
        return _build_tuner(spec, sd, _context(sd, meta), optuna_study)
    problem = _tune_state_problem(sd)
    if problem is None:
        try:
            return tune.Tuner.restore(str(sd.tune_dir), trainable, resume_unfinished=True,
                                      resume_errored=True)
        except Exception as exc:  # a damaged tuner.pkl or state file (ray#58179)
            problem = f"it could not be restored ({type(exc).__name__}: {exc})"
    if sd.tune_dir.exists():
        aside = sd.root / f"tune.broken-{int(time.time())}"
        shutil.move(str(sd.tune_dir), aside)
        problem += f"; moved to {aside.name}"
    finished = finished_trials(sd)
    log.warning("Tune's saved state in %s: %s. Starting the Tune experiment again inside this "
                "study: the %d finished trials are kept as they are, the unfinished ones start "
                "again from step 0.", sd.tune_dir, problem, len(finished))
    from workers._trainable import FINAL_RESULTS_KEY

    context = {**_context(sd, meta), FINAL_RESULTS_KEY: earlier_final_results(sd)}
    return _build_tuner(spec, sd, context, optuna_study, finished=finished)


def earlier_final_results(sd: StudyDir) -> dict[str, str]:
    """{trial id: path of its final_result.json} in the study's earlier Tune experiments
    (``tune.broken-*``): a trial that ended there while no driver recorded it (killed between
    the trial's end and its record) is re-reported by its worker from there, not trained
    again. The newest of several wins; a half-written file is left out."""
    from workers._trainable import FINAL_RESULT_FILE

    found: dict[str, tuple[float, str]] = {}
    for path in sd.root.glob(f"tune.broken-*/run_trial_*/checkpoint_*/{FINAL_RESULT_FILE}"):
        try:
            result = json.loads(path.read_text())
            trial_id, mtime = str(result["klstudy_trial_id"]), path.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if result.get("final") and mtime >= found.get(trial_id, (-1.0, ""))[0]:
            found[trial_id] = (mtime, str(path))
    return {tid: path for tid, (_, path) in found.items()}


def finished_trials(sd: StudyDir) -> set[str]:
    """Trials recorded as over for good: completed, pruned, or failed in a way that would fail
    again (``workers._trainable.DETERMINISTIC_ERRORS``, recorded as ``"<Type>: message"``).
    Other failures are retried by a resume, as Tune's restore retries errored trials."""
    from workers._trainable import DETERMINISTIC_ERRORS

    deterministic = {cls.__name__ for cls in DETERMINISTIC_ERRORS}
    return {row["trial_id"] for row in _trial_rows(sd)
            if row["status"] in ("completed", "pruned")
            or row["status"] == "error"
            and str(row.get("error") or "").split(":", 1)[0] in deterministic}


def _tune_state_problem(sd: StudyDir) -> str | None:
    """Why Tune's saved experiment state cannot be restored, or None when it looks whole."""
    from ray import tune

    if not sd.tune_dir.is_dir():
        return "it does not exist (the study was killed before its first trial started)"
    try:
        if not tune.Tuner.can_restore(str(sd.tune_dir)):
            return "it is incomplete (no tuner.pkl)"
    except Exception as exc:
        return f"it is unreadable ({exc})"
    for state in sd.tune_dir.glob("experiment_state-*.json"):
        try:
            json.loads(state.read_text())
        except (OSError, ValueError) as exc:
            return f"{state.name} is truncated or damaged ({exc})"
    return None


def _safely(what: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # tracking trouble must not stop a study
        log.warning("could not %s: %s", what, redact_text(str(exc)))


def _ended_as(counts: dict[str, int], n_trials: int) -> str:
    """finished / interrupted / failed, from the trials' statuses after Tune returned."""
    unfinished = counts.get("pending", 0) + counts.get("running", 0)
    if unfinished:
        return "interrupted"  # Ctrl-C: Tune stops and fit() returns normally
    if n_trials and counts.get("completed", 0) == 0 and counts.get("pruned", 0) == 0:
        return "failed"
    return "finished"


def _fit(sd: StudyDir, meta: dict[str, Any], we_started_ray: bool,
         make_tuner: Any) -> StudySummary:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in _QUIET_RAY_LOGGERS:  # klstudy reports these outcomes itself, with its commands
        logging.getLogger(name).setLevel(logging.ERROR)
    started = time.monotonic()
    try:
        uri = _tracking(sd, meta)
    except PermissionError as exc:
        raise StudyError(str(exc)) from None
    status = "interrupted"
    try:
        if meta.get("spec", {}).get("search", {}).get("kind") == "race":  # study._race_run
            from study._race_run import fit_race

            status = fit_race(sd, _spec_from_meta(meta), make_tuner)
            meta = sd.read_meta()
        else:
            tuner = make_tuner()
            if tuner is not None:
                tuner.fit()
            else:
                log.warning("every trial of the study has already finished: nothing to run")
            status = _ended_as(trial_counts(sd, meta["n_trials"]), meta["n_trials"])
    except Exception:  # KeyboardInterrupt passes through as "interrupted"
        status = "failed"
        raise
    finally:
        _safely("reconcile MLflow with the study's record", reconcile, sd, uri, meta, status)
        summary = dataclasses.replace(_summarise(sd, meta, time.monotonic() - started),
                                      status=status)
        sd.update_meta(status=status, finished_at=now_iso(), counts=summary.counts,
                       best_trial=summary.best_trial, best_value=summary.best_value)
        _safely("close the MLflow parent run", close_parent_run, uri, meta, summary, status)
        if we_started_ray:
            import ray

            ray.shutdown()
    return summary


def _summarise(sd: StudyDir, meta: dict[str, Any], wall_s: float) -> StudySummary:
    status = study_status(sd.root)
    return StudySummary(sd.root, meta["name"], status["counts"], status["best_trial"],
                        status["best_value"], status["objective"], wall_s, meta["tracking_uri"],
                        meta["parent_run_id"])


__all__ = ["StudyError", "StudySummary", "objective_of", "pruning_policy", "resume_study",
           "run_study", "study_status"]
