"""A racing search over seeds: spend seeds where the answer is still open (issue 19).

A race runs the grid's configurations in *rounds of seeds*, every trial to its end (no pruning):

- round 1 runs the first ``min_seeds`` seeds of every configuration; each later round runs the
  next ``seeds_per_round`` seeds of the configurations still in the race, and of the monotonic
  reference (M = 1, same other axes) of every cyclical configuration still in the race, so the
  verdict can always be computed;
- after each round (a *look*) ``analyse_trials`` — the same statistics the report uses — is
  asked for the best set of the configurations still in the race, on the seeds they all have,
  at ``drop_alpha`` (default ``alpha``; ``alpha`` at the last look, as the full grid's best
  set); those not in it leave the race (a reference keeps running for the configurations it
  serves). A smaller ``drop_alpha`` drops later: more trials, the full grid's best set more
  often;
- the **verdict** (the primary seed-level test of the report: the exact two-sided sign-flip
  test over seeds of the per-seed difference in the share of trials using z) is a
  *group-sequential* test: at every look its per-seed differences, in the order the seeds ran,
  go to ``analysis.sequential_sign_flip``, which spends ``alpha`` over the looks by the
  Pocock-type function and claims when the running mean crosses that look's exact boundary. So
  the chance of a false claim over all looks is at most ``alpha``, and a clear effect is claimed
  as soon as the exact test can show it (6 seeds of 10, 7 of 12 or 20);
- **settled**: the best set is settled when one configuration is left in it (no more seeds can
  shrink it); the verdict is settled when it has been claimed, or when no claim is possible any
  more (even if every remaining seed to ``max_seeds`` showed the largest possible difference in
  either direction, no later look would cross). Once the verdict is settled the monotonic
  references stop, but for those still in the best set. The race stops when both are settled,
  or after the round that reaches ``max_seeds``.

The decisions are a pure function of the finished trials' final metrics: :meth:`Race.replay`
recomputes every round from them, which is how a resumed study finds its round (nothing else is
stored) and how ``bench/racing.py`` replays finished grids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis import (
    VERDICTS,
    analyse_trials,  # the report's statistics: the race tests what it reports
    sequential_sign_flip,
)

Config = tuple[Any, ...]
FINISHED = ("completed", "pruned", "error")
_CYCLICAL_BETTER, _MONOTONIC_BETTER, _NO_DIFFERENCE = VERDICTS


@dataclass(frozen=True)
class RaceSettings:
    min_seeds: int = 3
    max_seeds: int = 12
    seeds_per_round: int = 1
    alpha: float = 0.05
    drop_alpha: float | None = None  # level of the drops before the last look (None: alpha)
    objective: str = "rec"
    kl_threshold: float = 0.1

    def drop_level(self, *, last: bool) -> float:
        """The level of the drops at a look: ``alpha`` at the last one (as the full grid's best
        set), ``drop_alpha`` (default ``alpha``) before it."""
        return self.alpha if last or self.drop_alpha is None else self.drop_alpha


def look_schedule(s: RaceSettings) -> list[int]:
    """The seed counts after each round: min_seeds, +seeds_per_round, …, max_seeds."""
    looks = [min(s.min_seeds, s.max_seeds)]
    while looks[-1] < s.max_seeds:
        looks.append(min(looks[-1] + s.seeds_per_round, s.max_seeds))
    return looks


@dataclass
class ConfigRecord:
    config: dict[str, Any]
    n_seeds: int = 0
    left_round: int | None = None  # the round after which it left the race
    left_at_seeds: int | None = None
    left_test: str | None = None
    left_p_adj: float | None = None
    reference_only: bool = False  # left the best set, kept running as a monotonic reference


@dataclass
class RaceState:
    """Where a race stands after :meth:`Race.replay`."""

    round: int  # the round running now (or the last one, when done)
    n_rounds_planned: int
    looks: list[int]
    done: bool
    pending: list[tuple[Config, int]]  # (configuration, seed) still to run in this round
    running: list[Config]  # configurations this round runs
    candidates: list[Config]  # configurations still in the race (the best set so far)
    verdict: str | None  # claimed verdict (None while open)
    verdict_settled: bool
    claimed_at: int | None  # seeds at the claim
    records: dict[Config, ConfigRecord] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None

    @property
    def trials_used(self) -> int:
        return sum(r.n_seeds for r in self.records.values())

    def final_verdict(self) -> str:
        return self.verdict or _NO_DIFFERENCE


class Race:
    """The race over ``configs`` (dicts of config keys, one per grid point) and ``seeds``."""

    def __init__(self, configs: Sequence[dict[str, Any]], seeds: Sequence[int],
                 settings: RaceSettings, *,
                 analyse: Callable[..., Any] | None = None) -> None:
        if not configs:
            raise ValueError("a race needs at least one configuration")
        self.keys = list(configs[0])
        self.configs = [tuple(c[k] for k in self.keys) for c in configs]
        self.seeds = list(seeds)[: settings.max_seeds]
        self.settings = settings
        self.analyse = analyse or analyse_trials
        self.looks = [n for n in look_schedule(settings) if n <= len(self.seeds)] or [
            len(self.seeds)]
        if self.looks[-1] < len(self.seeds):
            self.looks.append(len(self.seeds))
        m = self.keys.index("n_cycles")
        present = set(self.configs)
        self.reference: dict[Config, Config | None] = {}
        for c in self.configs:
            ref = (*c[:m], 1, *c[m + 1:])
            self.reference[c] = ref if c[m] > 1 and ref in present else None

    # --- helpers --------------------------------------------------------------------------
    def as_dict(self, c: Config) -> dict[str, Any]:
        return dict(zip(self.keys, c, strict=True))

    def running_set(self, candidates: Sequence[Config], *,
                    references: bool = True) -> list[Config]:
        """The candidates and (while the verdict is open) the monotonic references they need,
        in grid order."""
        want = set(candidates)
        if references:
            want |= {self.reference[c] for c in candidates if self.reference[c]}
        return [c for c in self.configs if c in want]

    def _index(self, results: pd.DataFrame) -> tuple[dict[tuple[Config, int], str], pd.DataFrame]:
        df = results.copy()
        if "status" not in df.columns:
            df["status"] = "completed"
        df["status"] = df["status"].fillna("completed")
        for k in self.keys:
            if k not in df.columns:
                raise ValueError(f"results lack the configuration column {k!r}")
        keys = list(zip(*(df[k] for k in self.keys), strict=True))
        df["_config"] = keys
        status = {(c, int(s)): st for c, s, st in zip(keys, df["seed"], df["status"], strict=True)
                  if st in FINISHED}
        return status, df

    # --- the race ---------------------------------------------------------------------------
    def replay(self, results: pd.DataFrame) -> RaceState:
        """Every round the finished trials in ``results`` allow, and what comes next.

        ``results``: one row per trial with the configuration keys, ``seed``, ``status``
        (default completed) and the final ``rec``, ``kl``, ``elbo`` (and the objective).
        Trials the race did not ask for are ignored.
        """
        finished, df = self._index(results)
        candidates = list(self.configs)
        records = {c: ConfigRecord(self.as_dict(c)) for c in self.configs}
        verdict: str | None = None
        verdict_settled = False
        claimed_at: int | None = None
        rounds: list[dict[str, Any]] = []
        used: set[tuple[Config, int]] = set()
        prev_n = 0
        for k, n in enumerate(self.looks, start=1):
            running = self.running_set(candidates, references=not verdict_settled)
            needed = [(c, seed) for c in running for seed in self.seeds[prev_n:n]]
            missing = [x for x in needed if x not in finished]

            def state(done: bool, reason: str | None = None) -> RaceState:
                return RaceState(k, len(self.looks), self.looks,  # noqa: B023
                                 done, [] if done else missing,  # noqa: B023
                                 running, list(candidates), verdict,  # noqa: B023
                                 verdict_settled, claimed_at, records, rounds,  # noqa: B023
                                 reason)  # called in the iteration that defines it

            if missing:
                return state(False)
            used.update(needed)
            for c in running:
                records[c].n_seeds = n
            ran = df[[(c, int(sd)) in used for c, sd in zip(df["_config"], df["seed"],
                                                            strict=True)]]
            seeds_now = set(self.seeds[:n])
            in_race = ran[ran["_config"].isin(set(candidates)) & ran["seed"].isin(seeds_now)]
            look: dict[str, Any] = {"round": k, "n_seeds": n, "running": len(running),
                                    "candidates_before": len(candidates)}
            level = self.settings.drop_level(last=n == self.looks[-1])
            candidates = self._drop(in_race, candidates, records, k, n, level)
            for c in running:
                records[c].reference_only = c not in candidates
            look["candidates_after"] = len(candidates)
            if not verdict_settled:
                verdict, verdict_settled, claimed_at, look_p, bound, spent = (
                    self._verdict_look(ran, k))
                look.update(primary_p=look_p, boundary=bound, alpha_spent=spent)
            look["verdict"] = verdict
            rounds.append(look)
            best_settled = len(candidates) <= 1
            if best_settled and verdict_settled:
                return state(True, "best set and verdict settled")
            if n == self.looks[-1]:
                return state(True, "max_seeds reached")
            prev_n = n
        raise AssertionError("unreachable: the last look ends the race")

    def _drop(self, in_race: pd.DataFrame, candidates: list[Config],
              records: dict[Config, ConfigRecord], k: int, n: int,
              level: float) -> list[Config]:
        if len(candidates) <= 1:
            return candidates
        a = self.analyse(in_race.drop(columns=["_config"]), objective=self.settings.objective,
                         kl_threshold=self.settings.kl_threshold, alpha=level)
        best = {c for c in candidates if any(self._matches(c, b) for b in a.best_set)}
        keep = [c for c in candidates if c in best]
        if not keep:  # the analysis kept none of them (e.g. no usable rows): nothing leaves
            return candidates
        tests = [t for t in a.tests if t.get("family") == "best_set"]
        for c in candidates:
            if c not in best:
                t = next((t for t in tests if self._matches(c, t.get("config", t))), None)
                t = t or next((t for t in tests if self._named(c, str(t.get("name", "")))), {})
                r = records[c]
                r.left_round, r.left_at_seeds = k, n
                r.left_test = t.get("method", "best set")
                r.left_p_adj = t.get("p_adj")
        return keep

    def _matches(self, c: Config, record: dict[str, Any]) -> bool:
        """Whether an analysis record (a best-set entry, a test) names configuration ``c``:
        every configuration key the record has equals c's (keys it lacks are not compared)."""
        shared = [(v, record[k]) for k, v in zip(self.keys, c, strict=True) if k in record]
        return bool(shared) and all(
            v == w or (isinstance(v, float) and isinstance(w, float) and math.isclose(v, w))
            for v, w in shared)

    def _named(self, c: Config, name: str) -> bool:
        """Whether a test's name ends with c's label as ``analysis`` writes it
        (``M=2 R=0.5 linear β_max=1``): its test records need not carry the keys."""
        d = self.as_dict(c)
        try:
            label = f"M={d['n_cycles']} R={d['ratio']:g} {d['ramp']} β_max={d['beta_max']:g}"
        except (KeyError, TypeError, ValueError):
            return False
        return name.endswith(label)

    def _verdict_look(self, ran: pd.DataFrame, k: int) -> tuple[
            str | None, bool, int | None, float, float | None, float | None]:
        """(verdict or None, settled, seeds at claim, the fixed-sample primary p at this look,
        this look's boundary on the |mean| difference, the alpha spent so far)."""
        s = self.settings
        a = self.analyse(ran.drop(columns=["_config"]), objective=s.objective,
                         kl_threshold=s.kl_threshold, alpha=s.alpha)
        p = float(a.primary.get("p", math.nan))
        per_seed = dict(zip(a.primary.get("seeds", []),
                            a.primary.get("per_seed", {}).get("difference", []), strict=True))
        ordered = [s_ for s_ in self.seeds if s_ in per_seed]  # the order the seeds ran
        diffs = [float(per_seed[s_]) for s_ in ordered]
        looks = _counts(self.seeds, ordered, self.looks[:k])
        if not looks:
            return None, False, None, p, None, None  # no paired seed yet
        final = self.looks[-1]
        first, bounds, spent = sequential_sign_flip(diffs, looks, final, s.alpha)
        n = self.looks[k - 1]
        if first is not None:
            mean = sum(diffs[: looks[-1]]) / looks[-1]
            verdict = _CYCLICAL_BETTER if mean > 0 else _MONOTONIC_BETTER
            return verdict, True, n, p, bounds[-1], spent[-1]
        if k == len(self.looks):
            return None, True, None, p, bounds[-1], spent[-1]  # no look left
        future = self.looks[k:]  # could the most extreme remaining seeds still cross?
        all_looks = looks + [looks[-1] + m - n for m in future]
        for direction in (1.0, -1.0):
            extreme = diffs[: looks[-1]] + [direction] * (final - n)
            if sequential_sign_flip(extreme, all_looks, final, s.alpha)[0] is not None:
                return None, False, None, p, bounds[-1], spent[-1]
        return None, True, None, p, bounds[-1], spent[-1]  # futile: no_difference_shown


def _counts(seeds: Sequence[int], paired: Sequence[int], looks: Sequence[int]) -> list[int]:
    """How many of the first ``look`` seeds have a paired difference, per look (the looks of
    the sequential test: strictly increasing, empty looks left out)."""
    have = set(paired)
    out: list[int] = []
    for m in looks:
        c = sum(1 for s in seeds[:m] if s in have)
        if c and (not out or c > out[-1]):
            out.append(c)
    return out


def race_json(race: Race, state: RaceState, *, final_analysis: Any | None = None,
              total_grid_trials: int | None = None) -> dict[str, Any]:
    """What ``race.json`` holds (the report's race section reads it)."""
    s = race.settings
    configs = []
    for c in race.configs:
        r = state.records[c]
        status = ("best set" if c in state.candidates else
                  "reference" if r.reference_only and r.left_round is None else
                  f"left after round {r.left_round}" if r.left_round else "in race")
        configs.append({"config": r.config, "n_seeds": r.n_seeds, "status": status,
                        "left_round": r.left_round, "left_at_seeds": r.left_at_seeds,
                        "left_test": r.left_test, "left_p_adj": r.left_p_adj,
                        "kept_as_reference": bool(r.reference_only and r.left_round
                                                  and r.n_seeds > (r.left_at_seeds or 0))})
    out = {"settings": {"min_seeds": s.min_seeds, "max_seeds": s.max_seeds,
                        "seeds_per_round": s.seeds_per_round, "alpha": s.alpha,
                        "drop_alpha": s.drop_level(last=False),
                        "objective": s.objective, "kl_threshold": s.kl_threshold},
           "looks": state.looks, "verdict_test": "group-sequential exact sign-flip, "
           "Pocock-type alpha spending", "round": state.round,
           "done": state.done, "stop_reason": state.stop_reason,
           "verdict": state.final_verdict() if state.done else state.verdict,
           "verdict_settled": state.verdict_settled, "claimed_at_seeds": state.claimed_at,
           "best_set": [race.as_dict(c) for c in state.candidates],
           "trials_used": state.trials_used, "grid_trials": total_grid_trials,
           "rounds": state.rounds, "configs": configs}
    if final_analysis is not None:
        out["analysis_of_race_trials"] = {"verdict": final_analysis.verdict,
                                          "uses_z": final_analysis.uses_z,
                                          "primary_p": final_analysis.primary.get("p")}
    return out


def race_section_markdown(data: dict[str, Any]) -> str:
    """The report's race section from ``race.json``: seeds per configuration, when each left
    and on which test."""
    s = data["settings"]
    lines = [
        "## Race",
        "",
        f"Racing over seeds: min_seeds {s['min_seeds']}, max_seeds {s['max_seeds']}, "
        f"{s['seeds_per_round']} seed(s) per round, alpha {s['alpha']}, drops before max_seeds "
        f"at {s.get('drop_alpha', s['alpha'])}; the verdict is a "
        "group-sequential exact sign-flip test over the looks (Pocock-type alpha spending: "
        "a false claim over all looks has chance at most alpha).",
        f"Stopped: {data['stop_reason'] or 'still running'} after round {data['round']}; "
        f"{data['trials_used']} trials"
        + (f" of the full grid's {data['grid_trials']}" if data.get("grid_trials") else "")
        + f"; verdict {data['verdict'] or 'open'}"
        + (f" (claimed at {data['claimed_at_seeds']} seeds)" if data["claimed_at_seeds"] else ""),
        "",
        "| configuration | seeds | status | left on (test, adjusted p) |",
        "|---|---|---|---|",
    ]
    for c in data["configs"]:
        label = " ".join(f"{k}={v}" for k, v in c["config"].items())
        test = (f"{c['left_test']} at {c['left_at_seeds']} seeds, p_adj "
                f"{c['left_p_adj']:.3g}" if c["left_round"] and c["left_p_adj"] is not None
                else "")
        status = c["status"] + (" (kept as reference)" if c["kept_as_reference"] else "")
        lines.append(f"| {label} | {c['n_seeds']} | {status} | {test} |")
    return "\n".join(lines) + "\n"
