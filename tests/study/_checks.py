"""Checks that whole-study tests share: every evaluation recorded exactly once, finished trials
never trained again. Each compares what the study wrote with what it must have written, so a
lost row, a duplicated row or a re-trained trial fails the test."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd


def eval_steps(total_steps: int, eval_every_steps: int, *, up_to: int | None = None) -> list[int]:
    """The evaluation grid of a trial: multiples of eval_every_steps, and total_steps."""
    steps = sorted({*range(eval_every_steps, total_steps + 1, eval_every_steps), total_steps})
    return [s for s in steps if up_to is None or s <= up_to]


def trials(study_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(study_dir / "trials.parquet").set_index("trial_id")


def expected_rows(study_dir: Path, train: dict[str, Any]) -> Counter:
    """{(trial, step, split): 1} for every evaluation the study's trials must have recorded:
    train and valid rows at each evaluation step (up to the pruned-at step of a pruned trial),
    a test row at the final one."""
    want: Counter = Counter()
    total, every = train["total_steps"], train["eval_every_steps"]
    for tid, row in trials(study_dir).iterrows():
        assert row["status"] in ("completed", "pruned"), (tid, row["status"], row.get("error"))
        last = total if row["status"] == "completed" else int(row["pruned_at_step"])
        for step in eval_steps(total, every, up_to=last):
            want.update([(tid, step, "train"), (tid, step, "valid")])
        if row["status"] == "completed":
            want[(tid, total, "test")] += 1
    return want


def recorded_rows(study_dir: Path) -> Counter:
    evals = pd.read_parquet(study_dir / "evaluations")
    return Counter(zip(evals["trial_id"], evals["step"].astype(int), evals["split"],
                       strict=True))


def assert_rows_exactly_once(study_dir: Path, train: dict[str, Any]) -> None:
    """Every (trial, step, split) evaluation of the grid is in Parquet once: none lost, none
    twice, none outside the grid."""
    want, got = expected_rows(study_dir, train), recorded_rows(study_dir)
    missing = sorted(want - got)
    extra = sorted(got - want)
    assert not missing and not extra, f"missing {missing[:12]} (of {len(missing)}); " \
                                      f"extra or twice {extra[:12]} (of {len(extra)})"


def _result_files(study_dir: Path) -> list[Path]:
    # a restarted Tune experiment moves the old one to tune.broken-*
    return sorted(study_dir.glob("tune*/run_trial_*/result.json"))


def snapshot(study_dir: Path) -> dict[Path, int]:
    """How many results each Tune result file holds now (what a later check compares with)."""
    return {path: len([ln for ln in path.read_text().splitlines() if ln.strip()])
            for path in _result_files(study_dir)}


def trial_results(study_dir: Path, since: dict[Path, int] | None = None
                  ) -> dict[str, list[dict[str, Any]]]:
    """Every result each trial reported to Tune, in every Tune experiment the study had; with
    ``since`` (a :func:`snapshot`), only those reported after it."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in _result_files(study_dir):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        for line in lines[(since or {}).get(path, 0):]:
            result = json.loads(line)
            tid = result.get("klstudy_trial_id")
            if tid and "step" in result:
                out.setdefault(tid, []).append(result)
    return out


def trained_steps(study_dir: Path, since: dict[Path, int] | None = None) -> dict[str, Counter]:
    """{trial: {step: how many times it was trained and reported}}; a replayed final result
    (a trial restored from its final checkpoint reports it again without training) is not
    training."""
    return {tid: Counter(r["step"] for r in results if not r.get("replayed"))
            for tid, results in trial_results(study_dir, since).items()}


def assert_not_trained_again(study_dir: Path, trial_ids: set[str],
                             since: dict[Path, int] | None = None) -> None:
    """These trials (finished before a kill) trained no step twice; with ``since`` (a
    :func:`snapshot` taken before the resume, valid also when the Tune state was deleted
    after it), trained nothing at all after it."""
    assert trial_ids, "no finished trial to check"
    steps = trained_steps(study_dir, since)
    limit = 0 if since is not None else 1
    again = {tid: sorted(s for s, n in steps.get(tid, Counter()).items() if n > limit)
             for tid in trial_ids}
    again = {tid: s for tid, s in again.items() if s}
    assert not again, f"finished trials trained again at steps {again}"
