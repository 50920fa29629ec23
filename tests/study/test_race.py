"""The racing search over seeds (study._race): drops, references, stopping, resuming mid-round,
its spec options, the stand-in statistics; one slow run on embedded Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from study._race import Race, RaceSettings, analyse_trials, look_schedule, race_json
from study._spec import parse_spec
from study._spec_yaml import SpecError

KEYS = ["n_cycles", "ratio", "ramp", "beta_max"]


def clear_grid(n_seeds: int = 8) -> pd.DataFrame:
    """M {1, 2, 4} x R {0.5, 1}: only M 4 R 0.5 uses z (in every seed); the rest collapse."""
    rng = np.random.default_rng(0)
    rows = []
    for m in (1, 2, 4):
        for r in (0.5, 1.0):
            for s in range(n_seeds):
                uses = m == 4 and r == 0.5
                kl = 0.5 if uses else 1e-4
                rec = (1.8 if uses else 2.305) + rng.normal(0, 0.003)
                rows.append({"n_cycles": m, "ratio": r, "ramp": "linear", "beta_max": 1.0,
                             "seed": s, "rec": rec, "kl": kl, "elbo": -rec - kl})
    return pd.DataFrame(rows)


def race_over(grid: pd.DataFrame, **settings) -> Race:
    configs = grid[KEYS].drop_duplicates().to_dict("records")
    return Race(configs, sorted(grid["seed"].unique()), RaceSettings(**settings))


def test_a_race_drops_the_worse_configurations_and_keeps_their_references_running() -> None:
    grid = clear_grid()
    race = race_over(grid, min_seeds=3, max_seeds=8)
    state = race.replay(grid)
    rec = state.records  # {configuration tuple (M, R, ramp, β_max): its record}
    best = (4, 0.5, "linear", 1.0)
    assert state.candidates == [best]
    for m, r in ((2, 0.5), (2, 1.0), (4, 1.0)):  # left at the first look that can tell
        left = rec[(m, r, "linear", 1.0)]
        assert left.left_round == 3 and left.left_at_seeds == 5 and left.n_seeds == 5
        assert left.left_p_adj is not None and left.left_p_adj <= 0.05
    ref = rec[(1, 0.5, "linear", 1.0)]  # M 4 R 0.5's monotonic reference runs to the end
    assert ref.n_seeds == rec[best].n_seeds == state.claimed_at
    assert rec[(1, 1.0, "linear", 1.0)].n_seeds == 5  # nobody left needs it
    assert state.trials_used < len(grid)


def test_a_race_stops_when_best_set_and_verdict_are_settled() -> None:
    grid = clear_grid()
    race = race_over(grid, min_seeds=3, max_seeds=8)
    state = race.replay(grid)
    assert state.done and state.stop_reason == "best set and verdict settled"
    # every seed agrees: the group-sequential test claims at 6 seeds, the first count at
    # which the exact test can reach 5% (Bonferroni over the looks that can claim, 7-8
    # seeds at 0.025 each, needed 7)
    assert state.final_verdict() == "cyclical_better" and state.claimed_at == 6
    assert state.round == 4 and state.looks[state.round - 1] == 6  # before max_seeds 8
    assert state.rounds[-1]["alpha_spent"] <= 0.05


def test_references_stop_once_the_verdict_is_settled() -> None:
    """M 4 R 0.5 and M 4 R 1 use z in every seed: the best set keeps both to max_seeds, but
    their monotonic references are not needed after the claim at 6 seeds."""
    grid = clear_grid(n_seeds=10)
    tie = (grid["n_cycles"] == 4) & (grid["ratio"] == 1.0)
    best = (grid["n_cycles"] == 4) & (grid["ratio"] == 0.5)
    grid.loc[tie, "kl"], grid.loc[tie, "rec"] = 0.5, grid.loc[best, "rec"].to_numpy()
    state = race_over(grid, min_seeds=3, max_seeds=10).replay(grid)
    rec = state.records
    assert state.claimed_at == 6 and state.stop_reason == "max_seeds reached"
    assert sorted(state.candidates) == [(4, 0.5, "linear", 1.0), (4, 1.0, "linear", 1.0)]
    assert rec[(4, 0.5, "linear", 1.0)].n_seeds == rec[(4, 1.0, "linear", 1.0)].n_seeds == 10
    assert rec[(1, 0.5, "linear", 1.0)].n_seeds == rec[(1, 1.0, "linear", 1.0)].n_seeds == 6
    assert state.trials_used == 2 * 10 + 2 * 6 + 2 * 5  # M 2 left at 5 seeds


def test_a_smaller_drop_alpha_keeps_configurations_longer() -> None:
    """At drop_alpha 0.01 a one-sided sign-flip max-T needs 7 seeds (1/2^7 <= 0.01) to drop,
    not 5: the worse configurations leave later and the race costs more trials."""
    grid = clear_grid(n_seeds=10)
    default = race_over(grid, min_seeds=3, max_seeds=10).replay(grid)
    strict = race_over(grid, min_seeds=3, max_seeds=10, drop_alpha=0.01).replay(grid)
    worse = (2, 0.5, "linear", 1.0)
    assert default.records[worse].left_at_seeds == 5
    assert strict.records[worse].left_at_seeds == 7
    assert strict.trials_used > default.trials_used
    assert strict.candidates == default.candidates == [(4, 0.5, "linear", 1.0)]


def test_a_race_on_a_null_grid_claims_nothing_and_runs_to_max_seeds() -> None:
    grid = clear_grid()
    grid["kl"], grid["rec"] = 1e-4, 2.305 + np.random.default_rng(1).normal(0, 0.003, len(grid))
    state = race_over(grid, min_seeds=3, max_seeds=8).replay(grid)
    assert state.final_verdict() == "no_difference_shown"
    assert state.stop_reason == "max_seeds reached"


def test_a_resumed_race_runs_exactly_the_unfinished_trials_of_its_round() -> None:
    grid = clear_grid()
    race = race_over(grid, min_seeds=3, max_seeds=8)
    full = race.replay(grid)
    round_4 = [(c, 5) for c in race.running_set([(4, 0.5, "linear", 1.0)])]  # seed index 5
    assert set(round_4) == {((4, 0.5, "linear", 1.0), 5), ((1, 0.5, "linear", 1.0), 5)}
    # the store holds rounds 1-3 and one of round 4's two trials; the other is still running
    ran = grid[(grid["seed"] <= 4) | ((grid["seed"] == 5) & (grid["n_cycles"] == 4)
                                      & (grid["ratio"] == 0.5))].copy()
    ran["status"] = "completed"
    running = grid[(grid["seed"] == 5) & (grid["n_cycles"] == 1) & (grid["ratio"] == 0.5)]
    ran = pd.concat([ran, running.assign(status="running", rec=np.nan, kl=np.nan)])
    mid = race.replay(ran)
    assert not mid.done and mid.round == 4
    assert mid.pending == [((1, 0.5, "linear", 1.0), 5)]
    finished = pd.concat([ran[ran["status"] == "completed"], running.assign(status="completed")])
    later = grid[grid["seed"] >= 6]
    again = race.replay(pd.concat([finished, later]))
    assert again.trials_used == full.trials_used and again.candidates == full.candidates
    assert again.final_verdict() == full.final_verdict()


def test_a_failed_trial_counts_as_run_and_the_race_goes_on() -> None:
    grid = clear_grid().assign(status="completed")
    failed = (grid["n_cycles"] == 2) & (grid["ratio"] == 1.0) & (grid["seed"] == 0)
    grid.loc[failed, "status"] = "error"
    state = race_over(grid, min_seeds=3, max_seeds=8).replay(grid)
    assert state.done and state.final_verdict() == "cyclical_better"


def test_the_look_schedule_adds_seeds_per_round_up_to_max_seeds() -> None:
    assert look_schedule(RaceSettings(min_seeds=3, max_seeds=12)) == list(range(3, 13))
    assert look_schedule(RaceSettings(min_seeds=3, max_seeds=8, seeds_per_round=2)) == [
        3, 5, 7, 8]


def test_race_json_names_when_and_on_which_test_each_configuration_left() -> None:
    grid = clear_grid()
    race = race_over(grid, min_seeds=3, max_seeds=8)
    data = race_json(race, race.replay(grid), total_grid_trials=len(grid))
    by = {(c["config"]["n_cycles"], c["config"]["ratio"]): c for c in data["configs"]}
    assert by[(2, 0.5)]["status"] == "left after round 3"
    assert "max-T" in by[(2, 0.5)]["left_test"] and by[(2, 0.5)]["n_seeds"] == 5
    assert by[(4, 0.5)]["status"] == "best set" and data["verdict"] == "cyclical_better"
    assert data["trials_used"] == sum(c["n_seeds"] for c in data["configs"]) < len(grid)
    json.dumps(data)


# --- the statistics the race uses: the report's (analysis.analyse_trials) ------------------------
def test_the_race_uses_the_reports_statistics() -> None:
    from analysis import analyse_trials as report_analyse

    assert analyse_trials is report_analyse  # one implementation of the tests, not a stand-in


def test_verdict_and_best_set_on_a_clear_grid() -> None:
    a = analyse_trials(clear_grid())
    assert a.verdict == "cyclical_better"
    assert a.uses_z == {"cyclical": [8, 32], "monotonic": [0, 16]}
    assert [(b["n_cycles"], b["ratio"]) for b in a.best_set] == [(4, 0.5)]
    assert a.primary["n_seeds"] == 8 and a.primary["p"] == pytest.approx(2 / 256)
    few = analyse_trials(clear_grid(n_seeds=4))  # 4 seeds cannot tell anything at 5%
    assert few.verdict == "no_difference_shown" and len(few.best_set) == 6


# --- spec ---------------------------------------------------------------------------------------
SPEC = {
    "name": "race",
    "model": {"kind": "toy"},
    "data": {"kind": "toy"},
    "train": {"total_steps": 60, "batch_size": 10, "eval_every_steps": 30, "iw_samples": 0},
    "schedule": {"n_cycles": [1, 2], "ratio": [0.5], "ramp": ["linear"], "beta_max": [1.0]},
    "seeds": [0, 1, 2, 3],
    "search": {"kind": "race", "min_seeds": 2, "max_seeds": 3},
    "pruning": {"pruner": "none"},
    "resources": {"cpus_per_trial": 1},
}


def test_a_race_spec_resolves_its_options_and_grid() -> None:
    spec = parse_spec(SPEC)
    assert spec.search.race() == {"min_seeds": 2, "max_seeds": 3, "seeds_per_round": 1,
                                  "alpha": 0.05, "drop_alpha": 0.05}
    stricter = parse_spec({**SPEC, "search": {**SPEC["search"], "drop_alpha": 0.01}})
    assert stricter.search.race()["drop_alpha"] == 0.01
    assert spec.grid_seeds() == [0, 1, 2] and spec.n_trials() == 6
    assert {c.seed for c in spec.grid_configs()} == {0, 1, 2}


@pytest.mark.parametrize(("search", "seeds", "message"), [
    ({"kind": "race", "min_seeds": 1}, None, "search.min_seeds: must be >= 2"),
    ({"kind": "race", "min_seeds": 3, "max_seeds": 2}, None,
     "search.max_seeds: must be >= search.min_seeds (3), got 2"),
    ({"kind": "race", "alpha": 0.7}, None, "search.alpha: must be in (0, 0.5), got 0.7"),
    ({"kind": "race", "alpha": 0}, None, "search.alpha: must be in (0, 1)"),
    ({"kind": "race", "alpha": 0.05, "drop_alpha": 0.1}, None,
     "search.drop_alpha: must be in (0, search.alpha (0.05)], got 0.1"),
    ({"kind": "grid", "drop_alpha": 0.01}, None,
     "search.drop_alpha: only used when search.kind is 'race', got 0.01"),
    ({"kind": "grid", "max_seeds": 5}, None,
     "search.max_seeds: only used when search.kind is 'race', got 5"),
    ({"kind": "race"}, [0, 1, 2], "seeds: a race with search.max_seeds 12 needs at least 12"),
    ({"kind": "race", "n_trials": 5}, None, "search.n_trials: only used when search.kind is"),
])
def test_bad_race_options_name_the_key_and_value(search, seeds, message) -> None:
    spec = {**SPEC, "search": search, **({"seeds": seeds} if seeds else {})}
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert str(err.value).startswith(message), str(err.value)


# --- one race on embedded Ray, killed mid-round and resumed ------------------------------------
def _wait_for(check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.5)


def _round_of(study_dir: Path) -> int:
    try:
        return json.loads((study_dir / "race.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_race_killed_mid_round_resumes_and_tags_its_rounds(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    spec_file = tmp_path / "race.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    study_dir = tmp_path / "race"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cli = [sys.executable, "-m", "study.cli"]
    proc = subprocess.Popen([*cli, "run", str(spec_file), "--study-dir", str(study_dir)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:  # round 2 has started: round 1's 4 trials are done, 2 more are due
        _wait_for(lambda: _round_of(study_dir) == 2, timeout_s=400)
        time.sleep(3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = subprocess.run([*cli, "resume", str(study_dir)], env=env, timeout=500,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "race round 2/2" in resumed.stderr + resumed.stdout
    race = json.loads((study_dir / "race.json").read_text())
    assert race["done"] and race["stop_reason"] == "max_seeds reached"
    trials = pd.read_parquet(study_dir / "trials.parquet")
    assert len(trials) == 6 and set(trials["status"]) == {"completed"}
    assert sorted(trials["seed"].tolist()) == [0, 0, 1, 1, 2, 2]
    evals = pd.read_parquet(study_dir / "evaluations")
    assert not evals.duplicated(["trial_id", "step", "split"]).any()
    meta = json.loads((study_dir / "study.json").read_text())
    assert meta["status"] == "finished" and meta["n_trials"] == 6
    runs = MlflowClient(meta["tracking_uri"]).search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
    rounds = {r.data.tags["klstudy.trial_id"]: r.data.tags.get("race_round") for r in runs}
    assert len(rounds) == 6
    assert sorted(rounds.values()) == ["1", "1", "1", "1", "2", "2"]
    status = subprocess.run([*cli, "status", str(study_dir)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert "race round 2/2" in status.stdout and "verdict no_difference_shown" in status.stdout


def test_the_report_gets_a_race_section_from_race_json(tmp_path: Path) -> None:
    from study._race_report import add_race_section

    grid = clear_grid()
    race = race_over(grid, min_seeds=3, max_seeds=8)
    (tmp_path / "race.json").write_text(json.dumps(race_json(race, race.replay(grid))))
    page = tmp_path / "report" / "report.html"
    page.parent.mkdir()
    page.write_text("<html><body><h1>report</h1></body></html>")
    md = add_race_section(tmp_path, page)
    text = page.read_text()
    assert md is not None and md.read_text().startswith("## Race")
    assert text.index('<section id="race">') < text.index("</body>")
    assert "left after round 3" in text and "n_cycles=2 ratio=0.5" in text
    add_race_section(tmp_path, page)  # once only
    assert page.read_text().count('<section id="race">') == 1
    assert add_race_section(tmp_path / "report", page) is None  # no race.json: no section


def test_validate_says_a_race_runs_at_most_the_grid(tmp_path: Path) -> None:
    spec_file = tmp_path / "race.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    out = subprocess.run([sys.executable, "-m", "study.cli", "validate", str(spec_file)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "a race of at most 6 trials (2 n_cycles x 1 ratio x 1 ramp x 1 beta_max x 2 to 3 " \
           "seeds)" in out.stdout


def test_the_racing_bench_replays_one_replica_of_each_synthetic_grid() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import racing

    effect = racing.synthetic_grid(np.random.default_rng(0), effect=True)
    assert len(effect) == 48 * 12 and (effect.query("n_cycles == 1")["kl"] < 0.1).all()
    assert (effect.query("n_cycles == 8 and ramp == 'linear'")["kl"] >= 0.1).mean() > 0.4
    out = racing.replicate(("synthetic effect", 0, {"synthetic": True, "effect": True,
                                                    "min_seeds": 3}))
    assert out["full_verdict"] == "cyclical_better"
    assert set(out) >= {"race", "wilcoxon", "median"}
    assert 0 < out["race"]["trials"] < 576 and out["race"]["best_kept"]
    assert out["median"]["trials"] < 576  # the pruner pruned something


def test_a_race_prunes_nothing_unless_a_pruner_is_named() -> None:
    bare = {k: v for k, v in SPEC.items() if k != "pruning"}
    assert parse_spec(bare).pruning.pruner == "none"  # every trial of a race runs to its end
    assert parse_spec({**bare, "pruning": {"patience": 3}}).pruning.pruner == "none"
    named = parse_spec({**bare, "pruning": {"pruner": "median"}})
    assert named.pruning.pruner == "median"  # the explicit option
    assert parse_spec({**bare, "search": {"kind": "grid"}}).pruning.pruner == "median"
