"""Optuna side of a study: the pruner factory and the Tune-trial ↔ Optuna-trial mirror.

Every Tune trial has an Optuna "twin" in an RDB storage (sqlite in the study directory by
default, or the spec's URL), found by the user attribute ``tune_trial_id`` (klstudy's own,
restore-stable trial id). Twins are created lazily, never in ``on_trial_add`` (Tune re-adds
every trial on restore), and looked up across all states.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from study._pruners import (
    REFERENCES,
    PeerHalvingPruner,
    PeerPercentilePruner,
    n_hyperband_brackets,
)

log = logging.getLogger(__name__)

TRIAL_ID_ATTR = "tune_trial_id"


def make_pruner(
    kind: str,
    *,
    n_startup_trials: int = 5,
    n_warmup_steps: int = 0,
    percentile: float = 25.0,
    patience: int = 2,
    min_resource_steps: int = 1,
    max_resource_steps: int = 1,
    reduction_factor: int = 3,
    reference: str = "reached",
) -> optuna.pruners.BasePruner:
    """The Optuna pruner named by the spec (``pruning.pruner``); steps are optimizer steps.

    ``reference``: whose values at a step the trial is compared with: ``reached``, every other
    trial that got there (``study._pruners``), ``same_seed``, those of them run with the
    trial's seed, or ``completed``, Optuna's own pruners (median/percentile: completed trials
    only; successive halving/hyperband: each trial's first value at or after a rung).
    """
    if kind == "none":
        return optuna.pruners.NopPruner()
    if reference not in REFERENCES:
        raise ValueError(f"pruning.reference: must be one of {REFERENCES}, got {reference!r}")
    # A step's median (or percentile) is taken over at least n_startup_trials trials that
    # reported at that step: phase-aware trials report only fixing-stage steps.
    references = max(1, n_startup_trials)

    def percentile_rule(q: float) -> optuna.pruners.BasePruner:
        if reference != "completed":
            return PeerPercentilePruner(q, n_startup_trials=n_startup_trials,
                                        n_warmup_steps=n_warmup_steps, n_min_trials=references,
                                        same_seed=reference == "same_seed")
        if q == 50.0:
            return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials,
                                               n_warmup_steps=n_warmup_steps,
                                               n_min_trials=references)
        return optuna.pruners.PercentilePruner(q, n_startup_trials=n_startup_trials,
                                               n_warmup_steps=n_warmup_steps,
                                               n_min_trials=references)

    if kind == "median":
        return percentile_rule(50.0)
    if kind == "percentile":
        return percentile_rule(percentile)
    if kind in ("successive_halving", "hyperband") and reference != "completed":
        n_brackets = 1 if kind == "successive_halving" else n_hyperband_brackets(
            min_resource_steps, max_resource_steps, reduction_factor)
        return PeerHalvingPruner(min_resource=min_resource_steps,
                                 reduction_factor=reduction_factor,
                                 n_startup_trials=n_startup_trials, n_min_trials=references,
                                 n_brackets=n_brackets, same_seed=reference == "same_seed")
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource_steps,
                                                      reduction_factor=reduction_factor)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource_steps,
                                              max_resource=max_resource_steps,
                                              reduction_factor=reduction_factor)
    if kind == "patient":
        return optuna.pruners.PatientPruner(percentile_rule(50.0), patience=patience)
    raise ValueError(f"pruning.pruner: unknown pruner {kind!r}")


class OptunaMirror:
    """Lazily opened handle on the study's Optuna storage; picklable (drops the live study)."""

    def __init__(
        self,
        storage_url: str,
        study_name: str,
        *,
        pruner_kwargs: dict[str, Any] | None = None,
        sampler_seed: int | None = None,
        search_space: dict[str, list[Any]] | None = None,
        direction: str = "maximize",
        secrets_dir: str | None = None,
    ) -> None:
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        self.direction = direction
        self.secrets_dir = secrets_dir  # where a redacted storage URL's credentials are kept
        self.storage_url = storage_url
        self.study_name = study_name
        self.pruner_kwargs = dict(pruner_kwargs or {"kind": "none"})
        self.sampler_seed = sampler_seed
        self.search_space = {k: list(v) for k, v in (search_space or {}).items()}
        self._study: optuna.Study | None = None
        self._numbers: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_study"] = None
        state["_numbers"] = {}
        return state

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            from workers._secrets import reveal

            storage = reveal(self.storage_url, study_dir=getattr(self, "secrets_dir", None),
                             key="pruning_storage")
            self._study = optuna.create_study(
                storage=storage,
                study_name=self.study_name,
                direction=getattr(self, "direction", "maximize"),  # the objective's mode
                pruner=make_pruner(**self.pruner_kwargs),
                sampler=optuna.samplers.TPESampler(seed=self.sampler_seed),
                load_if_exists=True,
            )
        return self._study

    # --- twins -------------------------------------------------------------------------
    def find(self, trial_id: str) -> FrozenTrial | None:
        number = self._numbers.get(trial_id)
        if number is None:
            for t in self.study.get_trials(deepcopy=False):
                self._numbers.setdefault(t.user_attrs.get(TRIAL_ID_ATTR, ""), t.number)
            number = self._numbers.get(trial_id)
        if number is None:
            return None
        return self.study.get_trials(deepcopy=False)[number]

    def ensure(self, trial_id: str, params: dict[str, Any], *, seed: int) -> FrozenTrial:
        """The twin of ``trial_id``, created RUNNING with ``params`` when it does not exist yet."""
        found = self.find(trial_id)
        if found is not None:
            return found
        if not self._waiting_with(params):
            self.study.enqueue_trial(params, skip_if_exists=False)
        trial = self.study.ask()
        self._suggest(trial)
        self._label(trial, trial_id, seed)
        return self.study.get_trials(deepcopy=False)[trial.number]

    def _waiting_with(self, params: dict[str, Any]) -> bool:
        """True when ``ask`` would hand out a twin with ``params`` already: the first WAITING
        trial (Optuna pops them in order) is an unlabelled one with these params, left by a
        driver killed between enqueueing a twin and asking for it."""
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:
            return False
        first = waiting[0]
        return (TRIAL_ID_ATTR not in first.user_attrs
                and first.system_attrs.get("fixed_params") == params)

    def ask_new(self, name: Callable[[dict[str, Any]], str], *,
                seed: int) -> tuple[str, dict[str, Any]]:
        """A new twin whose params the sampler (TPE) chooses; its id is ``name(params)``."""
        trial = self.study.ask()
        params = self._suggest(trial)
        trial_id = name(params)
        self._label(trial, trial_id, seed)
        return trial_id, params

    def _label(self, trial: optuna.Trial, trial_id: str, seed: int) -> None:
        trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
        trial.set_user_attr("seed", seed)  # seeds are replicates, not a searched parameter
        self._numbers[trial_id] = trial.number

    def _suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {name: trial.suggest_categorical(name, choices)
                for name, choices in self.search_space.items()}

    def live(self, frozen: FrozenTrial) -> optuna.Trial:
        return optuna.Trial(self.study, frozen._trial_id)  # re-attach a RUNNING twin

    def report(self, frozen: FrozenTrial, value: float, step: int) -> bool:
        """Report an intermediate value; True when the pruner says prune."""
        trial = self.live(frozen)
        if step not in frozen.intermediate_values:
            trial.report(value, step)
        return trial.should_prune()

    def finish(self, trial_id: str, state: TrialState, value: float | None = None) -> None:
        """Tell the twin's final state, once; a finished twin is left as it is."""
        frozen = self.find(trial_id)
        if frozen is None or frozen.state.is_finished():
            return
        if state == TrialState.COMPLETE and value is None:
            state = TrialState.FAIL
        self.study.tell(frozen.number, value if state == TrialState.COMPLETE else None,
                        state=state)

    def state_of(self, trial_id: str) -> TrialState | None:
        frozen = self.find(trial_id)
        return None if frozen is None else frozen.state
