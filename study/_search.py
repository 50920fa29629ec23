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
    all."""

    def __init__(self, mirror: OptunaMirror, base: TrialConfig, *, seeds: list[int], n_trials: int,
                 extra: dict[str, Any] | None = None, metric: str = "valid/elbo",
                 mode: str = "max") -> None:
        super().__init__(metric=metric, mode=mode)
        self.mirror = mirror
        self.base = base
        self.seeds = list(seeds)
        self.n_trials = n_trials
        self.extra = dict(extra or {})
        self._n_suggested = 0
        self._tune_to_ours: dict[str, str] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id in self._tune_to_ours:  # asked again for the same Tune trial
            return None
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
            json.dump({"n_suggested": self._n_suggested, "map": self._tune_to_ours}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        self._n_suggested = state["n_suggested"]
        self._tune_to_ours = state["map"]
