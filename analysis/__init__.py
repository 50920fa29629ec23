"""klstudy's analysis side: reads study stores and writes reports; never imports ray.

Data flows one way: the study driver writes Parquet and MLflow; this package reads either
(``load_study``), computes statistics over seeds and writes the M-vs-R sensitivity report.
"""

from __future__ import annotations

from analysis._figures import (
    CurveSpec,
    curves_figure,
    cycle_boundaries,
    latent_figure,
    pick_curve_configs,
    pruning_figure,
)
from analysis._heatmap import METRIC_STYLES, heatmap_figure
from analysis._load import ReportError, StudyData, best_rows, final_rows, load_study
from analysis._mlflow_load import load_from_mlflow
from analysis._noise import Objective, colour_limits, objective_of, versus_best
from analysis._rd import rate_distortion_figure
from analysis._signflip import pocock_spending, sequential_sign_flip
from analysis._report import ReportResult, build_report
from analysis._stats import config_table, mean_ci, paired_vs_monotonic
from analysis._summary import summary_lines
from analysis._synthetic import write_synthetic_study
from analysis._trial_table import normalise_trials, read_results
from analysis._ui import experiment_url, serve_ui, stop_ui, ui_command, ui_url, wait_for_health
from analysis._verdict import VERDICTS, Analysis, analyse_trials

__all__ = [
    "METRIC_STYLES",
    "VERDICTS",
    "Analysis",
    "CurveSpec",
    "Objective",
    "ReportError",
    "ReportResult",
    "StudyData",
    "best_rows",
    "build_report",
    "colour_limits",
    "analyse_trials",
    "config_table",
    "curves_figure",
    "cycle_boundaries",
    "experiment_url",
    "final_rows",
    "heatmap_figure",
    "latent_figure",
    "load_from_mlflow",
    "load_study",
    "mean_ci",
    "normalise_trials",
    "objective_of",
    "paired_vs_monotonic",
    "pick_curve_configs",
    "pocock_spending",
    "pruning_figure",
    "rate_distortion_figure",
    "read_results",
    "sequential_sign_flip",
    "serve_ui",
    "stop_ui",
    "summary_lines",
    "ui_command",
    "ui_url",
    "versus_best",
    "wait_for_health",
    "write_synthetic_study",
]
