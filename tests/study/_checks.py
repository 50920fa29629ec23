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


def study_result_files(study_dir: Path) -> list[Path]:
    """The Tune result files in the study directory (a restarted experiment moves the old one to
    ``tune.broken-*``). Tune writes them on the driver and syncs them here later: a driver
    killed before a sync leaves its latest results only in its staging directory."""
    return sorted(study_dir.glob("tune*/run_trial_*/result.json"))


def staging_result_files(ray_tmp: Path) -> list[Path]:
    """The Tune result files a driver wrote into its Ray session (started with
    ``RAY_TMPDIR=ray_tmp``): every result it received, also when it was killed."""
    return sorted(ray_tmp.glob("ray/session_*/artifacts/*/*/driver_artifacts/run_trial_*/"
                               "result.json"))


def snapshot(study_dir: Path) -> dict[Path, int]:
    """How many results each Tune result file of the study holds now (for a driver that ends
    normally: its results are all synced when it returns)."""
    return {path: len([ln for ln in path.read_text().splitlines() if ln.strip()])
            for path in study_result_files(study_dir)}


def result_lines(study_dir: Path) -> set[str]:
    """Every result line in the study's Tune result files now. Tune copies a restored trial's
    ``result.json`` from the study directory into the new driver's staging directory before
    appending to it: these lines are there, but that driver did not report them."""
    return {ln for path in study_result_files(study_dir)
            for ln in path.read_text().splitlines() if ln.strip()}


def trial_results(files: list[Path], since: dict[Path, int] | None = None, *,
                  earlier: set[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every result each trial reported in ``files``; with ``since`` (a :func:`snapshot`), only
    those after it; with ``earlier`` (:func:`result_lines` before a driver started), none of
    those. A result in several files (a staging copy and its sync) counts once."""
    out: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set(earlier or ())
    for path in files:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        for line in lines[(since or {}).get(path, 0):]:
            if line in seen:
                continue
            seen.add(line)
            result = json.loads(line)
            tid = result.get("klstudy_trial_id")
            if tid and "step" in result:
                out.setdefault(tid, []).append(result)
    return out


def trained_steps(files: list[Path], since: dict[Path, int] | None = None, *,
                  earlier: set[str] | None = None) -> dict[str, Counter]:
    """{trial: {step: how many times it was trained and reported}}; a result replayed from a
    final checkpoint (re-reported without training) is not training."""
    return {tid: Counter(r["step"] for r in results if not r.get("replayed"))
            for tid, results in trial_results(files, since, earlier=earlier).items()}


def assert_not_trained_again(files: list[Path], trial_ids: set[str], *,
                             since: dict[Path, int] | None = None,
                             earlier: set[str] | None = None) -> None:
    """These trials (finished before a driver started) trained nothing in ``files`` (that
    driver's results: after ``since``, or other than the ``earlier`` lines)."""
    assert trial_ids, "no finished trial to check"
    steps = trained_steps(files, since, earlier=earlier)
    again = {tid: sorted(s for s, n in steps.get(tid, Counter()).items() if n > 0)
             for tid in trial_ids}
    again = {tid: s for tid, s in again.items() if s}
    assert not again, f"finished trials trained again at steps {again}"
