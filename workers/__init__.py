"""klstudy's trial side: the β schedule, data, the sentence VAE, metrics and the trainer.

Models and data sets come from factories (DESIGN §8: ``build(info, **params)``,
``load(**params)``), the built-in ones included (``workers._plugins``).

Imports neither ``study`` nor ``analysis``; Ray appears only in ``workers._trainable``, MLflow
only there and in the spool (``workers._spool*``), imported lazily.
"""

from __future__ import annotations

from workers._config import MODEL_DEFAULTS, PRECISIONS, ConfigError, PluginError, TrialConfig
from workers._contract import ContractCheck, check_contract
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
from workers._models import (
    ModelShape,
    SentenceVAE,
    build_sentence_vae,
    gaussian_kl,
    log_normal,
    reparameterize,
)
from workers._plugin_data import MappingData, TrialData, as_trial_data, to_device
from workers._plugins import (
    BUILTIN_DATA,
    BUILTIN_MODELS,
    build_trial_model,
    import_factory,
    load_trial_data,
)
from workers._records import (
    CONFIG_COLUMNS,
    EVAL_COLUMNS,
    LATENT_COLUMNS,
    METRIC_COLUMNS,
    REMEDY_COLUMNS,
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
    kl_term,
    load_trial_corpus,
    train_trial,
)

__all__ = [
    "BUILTIN_DATA",
    "BUILTIN_MODELS",
    "ContractCheck",
    "MappingData",
    "PluginError",
    "REMEDY_COLUMNS",
    "TrialData",
    "as_trial_data",
    "build_sentence_vae",
    "build_trial_model",
    "check_contract",
    "import_factory",
    "kl_term",
    "load_trial_data",
    "to_device",
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
