"""The tabular record of a study: one row per (trial, evaluation step, split).

This is the contract between the writers (the study driver's Parquet files, MLflow metric
names) and the reader (``analysis``). Both sides import it from here.

Study directory layout (written by ``study``, read by ``analysis``):

- ``evaluations/part-*.parquet`` — :data:`EVAL_COLUMNS` rows, appended as the study runs.
- ``latents/part-*.parquet`` — :data:`LATENT_COLUMNS`, posterior means of 2-D models.
- ``trials.parquet`` — :data:`TRIAL_COLUMNS`, one row per trial with its current status.

MLflow metric names are ``f"{split}/{metric}"`` (e.g. ``valid/elbo``) with ``step`` = the
optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

from workers._config import TrialConfig
from workers._trainer import Evaluation

CONFIG_COLUMNS: tuple[str, ...] = ("model", "data", "n_cycles", "ratio", "ramp", "beta_max", "seed",
                                   "total_steps", "lr_schedule")
# The model-agnostic remedies (DESIGN §8), configuration keys too: β's ramp start, the free-bits
# floor λ (nats per latent dimension) and the learning rate's own cycles (resolved: M when the
# trial has none of its own). Kept apart from CONFIG_COLUMNS, which older studies' MLflow runs
# all carry as params.
REMEDY_COLUMNS: tuple[str, ...] = ("beta_min", "free_bits", "lr_n_cycles")
METRIC_COLUMNS: tuple[str, ...] = ("beta", "lr", "loss", "rec", "kl", "elbo", "nll_elbo", "ppl",
                                   "au", "mi", "iw_nll", "iw_ppl")
EVAL_COLUMNS: tuple[str, ...] = ("study", "trial_id", *CONFIG_COLUMNS, *REMEDY_COLUMNS, "step",
                                 "split", "final", "at_beta_max", *METRIC_COLUMNS)
LATENT_COLUMNS: tuple[str, ...] = ("study", "trial_id", "step", "index", "z0", "z1")
TRIAL_COLUMNS: tuple[str, ...] = ("study", "trial_id", *CONFIG_COLUMNS, *REMEDY_COLUMNS,
                                  "status", "last_step", "pruned_at_step", "error",
                                  "mlflow_run_id", "node_ip")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
STATUSES: tuple[str, ...] = ("pending", "running", "completed", "pruned", "error")


def config_columns(config: TrialConfig) -> dict[str, Any]:
    """The configuration columns of a trial's rows (as its MLflow params,
    :meth:`TrialConfig.to_params`: ``lr_n_cycles`` resolved)."""
    values = {name: getattr(config, name) for name in CONFIG_COLUMNS}
    return values | {"beta_min": config.beta_min, "free_bits": config.free_bits,
                     "lr_n_cycles": config.lr_cycles}


def evaluation_rows(study: str, config: TrialConfig, ev: Evaluation) -> list[dict[str, Any]]:
    """One row per split of an evaluation; metrics a split lacks are NaN."""
    base = {"study": study, "trial_id": config.trial_id, **config_columns(config), "step": ev.step,
            "final": ev.final, "at_beta_max": ev.at_beta_max}
    rows = []
    for split, metrics in (("train", ev.train), ("valid", ev.valid), ("test", ev.test)):
        if metrics is None:
            continue
        values = {name: float(metrics.get(name, math.nan)) for name in METRIC_COLUMNS}
        if split != "train":  # β and lr belong to the step, repeat them for convenience
            values["beta"], values["lr"] = ev.train["beta"], ev.train["lr"]
        rows.append({**base, "split": split, **values})
    return rows


def latent_rows(study: str, trial_id: str, ev: Evaluation) -> list[dict[str, Any]]:
    return [
        {"study": study, "trial_id": trial_id, "step": ev.step, "index": i, "z0": z0, "z1": z1}
        for i, (z0, z1) in enumerate(ev.latents or ())
    ]


def mlflow_metrics(ev: Evaluation) -> dict[str, float]:
    """``{"valid/elbo": …}`` for MLflow (finite values only)."""
    return {k: v for k, v in ev.flat().items() if math.isfinite(v)}
