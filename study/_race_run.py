"""Running a race (``search.kind: race``, ``study._race``) inside a study directory.

The driver (``study._driver``) asks :func:`round_configs` for the trials of the round that is
due — recomputed from what ``trials.parquet`` and the evaluation parts already hold, so a resumed
study continues mid-round with exactly the trials that have not finished — and runs them as one
grid of Tune trials (one Tune experiment per round, under ``race/``). :func:`fit_race` repeats
that until the race is done. ``race.json`` (written after every look) is what ``klstudy status``
and the report's race section read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow.parquet as pq

from study._race import Race, RaceSettings, RaceState, race_json, race_section_markdown
from study._race_status import RACE_FILE, progress_line
from study._store import StudyDir

if TYPE_CHECKING:
    from study._spec import StudySpec
    from workers import TrialConfig

log = logging.getLogger(__name__)
progress_log = logging.getLogger("klstudy.progress")
RACE_KEYS = ("n_cycles", "ratio", "ramp", "beta_max", "lr_schedule", "beta_min", "free_bits")
_RESULT_COLUMNS = ("rec", "kl", "elbo", "mi", "au", "iw_nll", "ppl")


def race_of(spec: StudySpec) -> Race:
    s = spec.search.race()
    configs, seen = [], set()
    for c in spec.grid_configs():
        key = tuple(getattr(c, k) for k in RACE_KEYS)
        if key not in seen:
            seen.add(key)
            configs.append(dict(zip(RACE_KEYS, key, strict=True)))
    settings = RaceSettings(min_seeds=s["min_seeds"], max_seeds=s["max_seeds"],
                            seeds_per_round=s["seeds_per_round"], alpha=s["alpha"],
                            drop_alpha=s["drop_alpha"], objective=spec.objective.metric)
    return Race(configs, spec.grid_seeds(), settings)


def study_results(root: Path) -> pd.DataFrame:
    """One row per recorded trial: config keys, seed, status and its final validation metrics
    (NaN until it has a final evaluation)."""
    trials_file = root / "trials.parquet"
    if not trials_file.is_file():
        return pd.DataFrame(columns=[*RACE_KEYS, "seed", "status", "trial_id", *_RESULT_COLUMNS])
    trials = pq.read_table(trials_file).to_pandas()
    from study._store import read_parts

    finals: dict[str, dict[str, float]] = {}
    columns = ["trial_id", "split", "final", *_RESULT_COLUMNS]
    for table in read_parts(root / "evaluations", None):
        present = [c for c in columns if c in table.column_names]
        for row in table.select(present).to_pylist():
            if row.get("split") == "valid" and row.get("final"):
                finals[row["trial_id"]] = {c: row.get(c) for c in _RESULT_COLUMNS}
    metrics = pd.DataFrame([{"trial_id": t, **m} for t, m in finals.items()],
                           columns=["trial_id", *_RESULT_COLUMNS])
    out = trials.drop(columns=[c for c in _RESULT_COLUMNS if c in trials.columns])
    out = out.merge(metrics, on="trial_id", how="left")
    # a completed trial without a final row yet (parts being written) is not finished for us
    done = out["status"].eq("completed") & out["kl"].notna()
    out.loc[out["status"].eq("completed") & ~done, "status"] = "running"
    return out


def race_state(spec: StudySpec, sd: StudyDir) -> tuple[Race, RaceState]:
    race = race_of(spec)
    return race, race.replay(study_results(sd.root))


def write_race_json(sd: StudyDir, race: Race, state: RaceState) -> dict[str, Any]:
    data = race_json(race, state, total_grid_trials=len(race.configs) * len(race.seeds))
    tmp = sd.root / (RACE_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, sd.root / RACE_FILE)
    (sd.root / "race.md").write_text(race_section_markdown(data))
    return data


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def round_configs(spec: StudySpec, sd: StudyDir) -> tuple[int, list[TrialConfig]] | None:
    """(round number, the trials of the due round that have not finished), or None when the
    race is done. Writes ``race.json`` and logs the race's progress line."""
    race, state = race_state(spec, sd)
    data = write_race_json(sd, race, state)
    progress_log.info(progress_line(data))
    if state.done:
        return None
    pending = {(tuple(c), int(s)) for c, s in state.pending}
    configs = [c for c in spec.grid_configs()
               if (tuple(getattr(c, k) for k in RACE_KEYS), c.seed) in pending]
    return state.round, configs


def fit_race(sd: StudyDir, spec: StudySpec, make_tuner: Any) -> str:
    """Run rounds until the race is done; "finished", or "interrupted" when a round ended with
    trials unfinished (Ctrl-C)."""
    last: tuple[int, int] | None = None
    while True:
        tuner = make_tuner()
        if tuner is None:
            race, state = race_state(spec, sd)
            sd.update_meta(n_trials=state.trials_used, race_round=state.round)
            return "finished"
        tuner.fit()
        race, state = race_state(spec, sd)
        now = (state.round, len(state.pending))
        if not state.done and now == last:
            return "interrupted"  # the same round came back with the same trials unfinished
        if not state.done and state.pending and _round_was_cut(sd, state):
            return "interrupted"
        last = now


def _round_was_cut(sd: StudyDir, state: RaceState) -> bool:
    """True when trials of the round just run are still pending or running (a stop, not a
    finished round)."""
    results = study_results(sd.root)
    running = results[results["status"].isin(["running", "pending"])]
    return bool(len(running))


def race_tags(round_number: int) -> dict[str, str]:
    """MLflow tags every trial of a round gets (``workers._trainable`` sets them)."""
    return {"race_round": str(round_number)}
