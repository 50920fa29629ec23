"""study._results.StudyRecorder: trial statuses and the progress line (Tune faked)."""

from __future__ import annotations

from types import SimpleNamespace

from study._results import StudyRecorder
from study._store import StudyDir
from workers import TrialConfig

CONFIGS = [TrialConfig(trial_id=f"t{i}", n_cycles=m, ratio=0.5, seed=0)
           for i, m in enumerate((1, 4))]


class Mirror:
    def state_of(self, trial_id: str):
        return None


def recorder(root) -> StudyRecorder:
    rec = StudyRecorder(StudyDir(root), study_name="s", configs=CONFIGS, mirror=Mirror(),
                        tracking_uri=None, objective=("elbo", "max"))
    rec.setup()
    return rec


def trial(config: TrialConfig, last: dict | None = None):
    return SimpleNamespace(config={"trial": config.to_dict()}, last_result=last or {})


def result(step: int, elbo: float, *, final: bool = False) -> dict:
    return {"step": step, "final": final, "at_beta_max": True, "train/beta": 1.0,
            "train/lr": 1e-3, "train/loss": 2.0, "valid/elbo": elbo, "valid/rec": -elbo,
            "valid/kl": 0.0}


def test_a_started_trial_counts_as_running_before_its_first_result(tmp_path):
    rec = recorder(tmp_path)
    rec.on_trial_start(0, [], trial(CONFIGS[0]))
    assert rec.counts()["running"] == 1 and rec.counts()["pending"] == 1
    assert "0 done, 0 pruned, 1 running, 0 failed, 1 pending" in rec.progress_line()


def test_a_restored_recorder_shows_the_best_trial_recorded_before(tmp_path):
    first = recorder(tmp_path)
    done = trial(CONFIGS[1], last=result(10, -2.5, final=True))
    first.on_trial_start(0, [], done)
    first.on_trial_result(0, [], done, result(5, -3.0))
    first.on_trial_result(0, [], done, result(10, -2.5, final=True))
    first.on_trial_complete(0, [], done)
    assert "best valid elbo -2.5000 (t1)" in first.progress_line()
    again = recorder(tmp_path)  # a resumed driver
    assert "1 done" in again.progress_line()
    assert "best valid elbo -2.5000 (t1)" in again.progress_line()
    again.on_trial_start(0, [], done)  # Tune re-adds finished trials on restore
    assert again.counts()["completed"] == 1


def _steps_on_disk(root) -> list[int]:
    import pandas as pd

    parts = sorted((root / "evaluations").glob("part-*.parquet"))
    if not parts:
        return []
    evals = pd.concat([pd.read_parquet(p) for p in parts])
    return sorted(evals.loc[evals["split"] == "valid", "step"])


def test_rows_of_a_checkpointed_result_are_on_disk_before_tune_registers_it(tmp_path):
    """Tune calls on_trial_result, then registers the result's checkpoint, then saves its
    experiment state; a driver killed after that save resumes the trial past this step, so
    the rows must be durable when on_trial_result returns (not up to 5 s later)."""
    rec = recorder(tmp_path)
    t = trial(CONFIGS[0])
    rec.on_trial_start(0, [], t)
    rec.on_trial_result(0, [], t, {**result(5, -3.0), "should_checkpoint": True})
    rec.on_trial_result(0, [], t, result(10, -2.8))  # no checkpoint: may wait in memory
    rec.on_trial_result(0, [], t, {**result(15, -2.6), "should_checkpoint": True})
    # the driver is SIGKILLed here: nothing else of the recorder runs
    assert _steps_on_disk(tmp_path) == [5, 10, 15]


def test_a_trial_ending_with_a_nan_objective_is_an_error_as_its_optuna_twin_fails(tmp_path):
    rec = recorder(tmp_path)
    done = trial(CONFIGS[0], last=result(10, float("nan"), final=True))
    rec.on_trial_start(0, [], done)
    rec.on_trial_result(0, [], done, result(10, float("nan"), final=True))
    rec.on_trial_complete(0, [], done)
    row = rec.trials["t0"]
    assert row["status"] == "error" and "valid/elbo is nan" in row["error"]


def test_a_race_rounds_progress_counts_the_trials_asked_for_so_far(tmp_path):
    """A race's recorder (no n_trials) counts the earlier rounds' trials on disk and this
    round's, not the whole grid: round 2's line must not show the grid's trials as pending."""
    first = recorder(tmp_path)  # round 1: t0 and t1
    for c in CONFIGS:
        t = trial(c, last=result(10, -2.5, final=True))
        first.on_trial_start(0, [], t)
        first.on_trial_result(0, [], t, result(10, -2.5, final=True))
        first.on_trial_complete(0, [], t)
    round_2 = [TrialConfig(trial_id="t2", n_cycles=4, ratio=0.5, seed=1)]
    rec = StudyRecorder(StudyDir(tmp_path), study_name="s", configs=round_2, mirror=Mirror(),
                        tracking_uri=None, objective=("elbo", "max"))
    rec.setup()
    assert "trials 3: 2 done, 0 pruned, 0 running, 0 failed, 1 pending" in rec.progress_line()
    fixed = StudyRecorder(StudyDir(tmp_path), study_name="s", configs=round_2, mirror=Mirror(),
                          tracking_uri=None, n_trials=8, objective=("elbo", "max"))
    fixed.setup()
    assert "trials 8: 2 done, 0 pruned, 0 running, 0 failed, 6 pending" in fixed.progress_line()
