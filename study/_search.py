"""Model-based search (Optuna TPE) over the spec's schedule grid, as a Ray Tune searcher.

The searcher asks the *same* Optuna study the pruning scheduler reports to, so TPE sees every
pruned and completed trial. Seeds are replicates, cycled over the spec's seed list.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ray.tune.search import Searcher

from study._optuna_bridge import OptunaMirror
from workers import TrialConfig


def tpe_trial_id(index: int, params: dict[str, Any], seed: int) -> str:
    lr = {"cyclical_cosine": "-lrcos", "constant": "-lrconst"}.get(
        params.get("lr_schedule", ""), "")
    extra = "".join(f"-{tag}{params[name]}" for name, tag in
                    (("beta_min", "bmin"), ("lr_n_cycles", "lrc"), ("free_bits", "fb"))
                    if name in params)
    return (f"tpe{index:04d}-M{params['n_cycles']}-R{params['ratio']}-{params['ramp']}"
            f"-b{params['beta_max']}{lr}{extra}-s{seed}")


class OptunaTPESearcher(Searcher):
    """Suggests ``{"trial": TrialConfig dict}`` configs from the TPE sampler, ``n_trials`` in
    all.

    Args:
        start_index: trials the study already asked TPE for (a restarted Tune experiment: its
            history goes on, the next trial is ``tpe{start_index:04d}``).
        requeue: configs of earlier trials that did not finish, suggested again first (same
            ids, same Optuna twins) without counting against ``n_trials`` a second time.
    """

    def __init__(self, mirror: OptunaMirror, base: TrialConfig, *, seeds: list[int], n_trials: int,
                 extra: dict[str, Any] | None = None, metric: str = "valid/elbo",
                 mode: str = "max", start_index: int = 0,
                 requeue: list[TrialConfig] | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self.mirror = mirror
        self.base = base
        self.seeds = list(seeds)
        self.n_trials = n_trials
        self.extra = dict(extra or {})
        self._n_suggested = start_index
        self._requeue = [c.to_dict() for c in requeue or []]
        self._tune_to_ours: dict[str, str] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id in self._tune_to_ours:  # asked again for the same Tune trial
            return None
        if self._requeue:
            config_dict = self._requeue.pop(0)
            self._tune_to_ours[trial_id] = config_dict["trial_id"]
            return {"trial": config_dict, **self.extra}
        if self._n_suggested >= self.n_trials:
            return Searcher.FINISHED
        index = self._n_suggested
        seed = self.seeds[index % len(self.seeds)]
        ours, params = self.mirror.ask_new(lambda p: tpe_trial_id(index, p, seed), seed=seed)
        self._n_suggested += 1
        self._tune_to_ours[trial_id] = ours
        config = dataclasses.replace(self.base, seed=seed, trial_id=ours, **params)
        return {"trial": config.to_dict(), **self.extra}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass  # the pruning scheduler tells Optuna the outcome (it sees pruned trials too)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"n_suggested": self._n_suggested, "map": self._tune_to_ours,
                       "requeue": self._requeue}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        self._n_suggested = state["n_suggested"]
        self._tune_to_ours = state["map"]
        self._requeue = state.get("requeue", [])  # saved by an older klstudy: none


def tpe_index(trial_id: str) -> int | None:
    """The index of a TPE trial id (``tpe0007-…`` → 7), else None."""
    head = trial_id.split("-", 1)[0]
    return int(head[3:]) if head.startswith("tpe") and head[3:].isdigit() else None


def tpe_history(mirror: OptunaMirror, rows: list[dict[str, Any]], base: TrialConfig,
                finished: set[str]) -> tuple[int, list[TrialConfig]]:
    """(trials asked so far, configs of the asked ones not in ``finished``) of a TPE study.

    Asked trials are the Optuna twins with a TPE trial id (every ask makes one, also for a
    trial that never started) and the rows of ``trials.parquet`` (``rows``, for an Optuna
    storage lost and replaced with ``--allow-new-optuna``).
    """
    space = list(mirror.search_space)
    asked: dict[str, TrialConfig] = {}
    for row in rows:
        if tpe_index(row["trial_id"]) is not None:
            params = {k: row[k] for k in space if row.get(k) is not None}
            asked[row["trial_id"]] = dataclasses.replace(
                base, seed=int(row["seed"]), trial_id=row["trial_id"], **params)
    for twin in mirror.study.get_trials(deepcopy=False):
        ours = twin.user_attrs.get("tune_trial_id", "")
        if tpe_index(ours) is not None and ours not in asked and set(space) <= set(twin.params):
            asked[ours] = dataclasses.replace(base, seed=int(twin.user_attrs["seed"]),
                                              trial_id=ours, **twin.params)
    n_asked = 1 + max((tpe_index(t) or 0 for t in asked), default=-1)
    requeue = sorted((c for t, c in asked.items() if t not in finished),
                     key=lambda c: tpe_index(c.trial_id) or 0)
    return n_asked, requeue
