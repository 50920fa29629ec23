"""klstudy's trial side: the β schedule, data, the sentence VAE, metrics and the trainer.

Imports neither ``study`` nor ``analysis``; Ray appears only in ``workers._trainable``, MLflow
only there and in the spool (``workers._spool*``), imported lazily.
"""

from __future__ import annotations

from workers._config import MODEL_DEFAULTS, PRECISIONS, ConfigError, TrialConfig
from workers._data import (
    PTB_COUNTS,
    Batch,
    Corpus,
    DataError,
    SplitTensors,
    Vocab,
    fixed_subset,
    load_corpus,
    make_batch,
)
from workers._device import configure_runtime
from workers._metrics import (
    active_units,
    aggregate_mutual_information,
    evaluate,
    importance_weighted_nll,
    mutual_information,
)
from workers._models import ModelShape, SentenceVAE, gaussian_kl, log_normal, reparameterize
from workers._records import (
    CONFIG_COLUMNS,
    EVAL_COLUMNS,
    LATENT_COLUMNS,
    METRIC_COLUMNS,
    STATUSES,
    TRIAL_COLUMNS,
    config_columns,
    evaluation_rows,
    latent_rows,
    mlflow_metrics,
)
from workers._schedules import (
    LR_SCHEDULES,
    RAMPS,
    at_beta_max,
    beta_at,
    cycle_position,
    fixing_stage_eval,
    is_cycle_end,
    is_evaluation_step,
    last_evaluation_of_cycle,
    lr_at,
    ramp_value,
)
from workers._spool import DEFAULT_MAX_BYTES as SPOOL_MAX_BYTES
from workers._spool import Spool, drain_spools, trial_key
from workers._trainer import (
    CheckpointError,
    Evaluation,
    NonFiniteLossError,
    TrialResult,
    build_model,
    load_trial_corpus,
    train_trial,
)

__all__ = [
    "CONFIG_COLUMNS",
    "EVAL_COLUMNS",
    "LATENT_COLUMNS",
    "METRIC_COLUMNS",
    "STATUSES",
    "SPOOL_MAX_BYTES",
    "Spool",
    "drain_spools",
    "trial_key",
    "TRIAL_COLUMNS",
    "config_columns",
    "evaluation_rows",
    "latent_rows",
    "mlflow_metrics",
    "LR_SCHEDULES",
    "MODEL_DEFAULTS",
    "PRECISIONS",
    "PTB_COUNTS",
    "RAMPS",
    "Batch",
    "CheckpointError",
    "ConfigError",
    "Corpus",
    "DataError",
    "Evaluation",
    "ModelShape",
    "NonFiniteLossError",
    "SentenceVAE",
    "SplitTensors",
    "TrialConfig",
    "TrialResult",
    "Vocab",
    "active_units",
    "aggregate_mutual_information",
    "at_beta_max",
    "beta_at",
    "build_model",
    "configure_runtime",
    "cycle_position",
    "evaluate",
    "fixing_stage_eval",
    "fixed_subset",
    "gaussian_kl",
    "importance_weighted_nll",
    "is_cycle_end",
    "is_evaluation_step",
    "last_evaluation_of_cycle",
    "load_corpus",
    "load_trial_corpus",
    "log_normal",
    "lr_at",
    "make_batch",
    "mutual_information",
    "ramp_value",
    "reparameterize",
    "train_trial",
]
