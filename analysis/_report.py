"""``klstudy report``: one self-contained HTML file (figures embedded) plus the PNGs beside it.

The report opens offline from a file: inline CSS, PNGs as base64 data URIs, no scripts and no
external resources (``analysis._html``). The study objective (``spec.objective`` in study.json,
default validation ELBO, max) drives the summary, the order and colours of the heatmaps, the
curves' and latents' choice of configurations, and the "vs best" column of the config table.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis import _figures as figs
from analysis import _pruning_view as prune
from analysis._heatmap import METRIC_STYLES, NOISE_NOTE, heatmap_figure
from analysis._html import Section, bullet_list, esc, html_table, note, page
from analysis._load import StudyData, best_rows, final_rows, load_study
from analysis._mlflow_load import open_client
from analysis._noise import Objective, objective_of
from analysis._rd import rate_distortion_figure
from analysis._stats import config_table, paired_vs_monotonic, paired_vs_monotonic_pooled
from analysis._summary import (
    CLAIM_METRICS,
    REPORT_METRICS,
    pooled_labels,
    summary_lines,
    with_objective,
)
from analysis._tables import config_view, paired_view
from analysis._trial_table import read_results
from analysis._verdict import Analysis, analyse_trials
from analysis._verdict_report import (
    summary_section,
    tests_section,
    trials_for_analysis,
    write_summary,
)

_log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FIGURE_DPI = 110
_PNG_COMPRESS_LEVEL = 1  # zlib level: 1 encodes ~4x faster than the default 6, files ~30% larger
HEATMAP_METRICS: tuple[str, ...] = ("elbo", "kl", "rec", "mi", "au")  # the objective's first
PRUNING_MAX_ROWS = 40  # trials in the pruning timeline before completed ones are left out
_FIGURE_GLOBS = ("heatmap-*.png", "rate-distortion.png", "curves.png", "latents.png",
                 "pruning.png")


_LATENT_DIMS = {"toy": 2, "lstm_text": 32}  # workers' MODEL_DEFAULTS


@dataclass(frozen=True)
class ReportResult:
    html_path: Path
    figure_paths: list[Path]
    partial: bool
    summary_path: Path | None = None
    analysis: Analysis | None = None


@dataclass(frozen=True)
class VerdictOptions:
    """The report's statistics options (``klstudy report --kl-threshold/--elbo-margin``)."""

    kl_threshold: float = 0.1  # nats: a trial uses z when its final validation KL ≥ this
    elbo_margin: float | None = None  # nats per example; None: 2% of monotonic |ELBO|
    alpha: float = 0.05


@dataclass(frozen=True)
class _Png:
    name: str
    data: bytes
    caption: str  # plain text


def build_report(study_dir: str | os.PathLike[str], *,
                 out_dir: str | os.PathLike[str] | None = None, tracking_uri: str | None = None,
                 log_to_mlflow: bool = True,
                 options: VerdictOptions | None = None,
                 objective: Objective | None = None) -> ReportResult:
    """Write ``report.html`` and one PNG per figure, replacing an earlier report.

    Args:
        study_dir: the study directory (``study.json`` and the Parquet records).
        out_dir: where to write; default ``<study_dir>/report``.
        tracking_uri: overrides the tracking URI of ``study.json`` (reading and artifact logging).
        log_to_mlflow: also log the HTML and PNGs as artifacts (``report/``) of the study's
            parent run. When the run or its store is missing or unreachable a warning is logged
            and the report is still written.
        options: the verdict's KL threshold, ELBO margin and alpha (``summary.json``).
        objective: overrides the study's objective (``spec.objective``).

    Returns:
        The HTML path, the PNG paths and whether the study was still unfinished.

    Raises:
        ReportError: when the study directory cannot be read (from ``load_study``) or its
            objective is unknown.
    """
    data = load_study(study_dir, tracking_uri=tracking_uri)
    objective = objective or objective_of(data.meta)
    out = Path(out_dir) if out_dir is not None else Path(study_dir) / "report"
    return _write(data, objective, out, options or VerdictOptions(),
                  log=(tracking_uri, log_to_mlflow))


def build_results_report(table_path: str | os.PathLike[str], *,
                         out_dir: str | os.PathLike[str] | None = None,
                         objective: Objective | None = None,
                         options: VerdictOptions | None = None) -> ReportResult:
    """The same report and ``summary.json`` from a CSV or Parquet table, one row per trial
    (a sweep run elsewhere): verdict, tests, heatmaps, rate–distortion, configuration and
    paired tables; no curves, latents or pruning timeline (the table has no history).

    Raises:
        ReportError: the table is missing, unreadable or malformed (column and line named).
    """
    path = Path(table_path)
    table = read_results(path)
    objective = objective or Objective("rec", "min")
    out = Path(out_dir) if out_dir is not None else path.with_name(path.stem + "-report")
    trials = table.assign(trial_id=[f"row{i}" for i in range(len(table))])
    data = StudyData(evaluations=pd.DataFrame(), trials=trials, latents=pd.DataFrame(),
                     meta={"name": path.stem, "status": "finished", "n_trials": len(table)},
                     source="table")  # type: ignore[arg-type]
    return _write(data, objective, out, options or VerdictOptions(), log=(None, False),
                  finals=table.assign(trial_id=trials["trial_id"]))


def _latent_dim(meta: dict) -> int | None:
    model = (meta.get("spec") or {}).get("model") or {}
    dim = model.get("latent_dim") or _LATENT_DIMS.get(model.get("kind"))
    return int(dim) if dim else None


def _write(data: StudyData, objective: Objective, out: Path, options: VerdictOptions, *,
           log: tuple[str | None, bool], finals: pd.DataFrame | None = None) -> ReportResult:
    out.mkdir(parents=True, exist_ok=True)
    if finals is None:
        finals = final_rows(data) if not data.evaluations.empty else pd.DataFrame()
    verdict = None
    if not finals.empty and (finals["status"] == "completed").any():
        verdict = analyse_trials(
            trials_for_analysis(finals), objective=objective.metric,
            objective_mode=objective.mode, kl_threshold=options.kl_threshold,
            alpha=options.alpha, elbo_margin=options.elbo_margin,
            latent_dim=_latent_dim(data.meta))
    pngs: list[_Png] = []
    sections = _sections(data, objective, pngs, finals=finals, verdict=verdict)
    figure_paths = [out / png.name for png in pngs]
    for path in _stale_figures(out, keep=figure_paths):
        path.unlink()
    for png, path in zip(pngs, figure_paths, strict=True):
        _write_atomic(path, png.data)
    html_path = out / REPORT_FILE
    _write_atomic(html_path, page(data, sections, objective_label=objective.label).encode())
    summary_path = write_summary(out, verdict) if verdict is not None else None
    if verdict is None:
        (out / "summary.json").unlink(missing_ok=True)  # a stale verdict must not survive
    _log.info("report written to %s (%d figures)", html_path, len(figure_paths))
    tracking_uri, log_to_mlflow = log
    if log_to_mlflow:
        extra = [summary_path] if summary_path else []
        _log_artifacts(data.meta, tracking_uri, [html_path, *extra, *figure_paths])
    return ReportResult(html_path=html_path, figure_paths=figure_paths, partial=data.partial,
                        summary_path=summary_path, analysis=verdict)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _stale_figures(out: Path, *, keep: Sequence[Path]) -> list[Path]:
    found = {p for pattern in _FIGURE_GLOBS for p in out.glob(pattern)}
    return sorted(found - set(keep))


# --- sections --------------------------------------------------------------------------------
def _sections(data: StudyData, objective: Objective, pngs: list[_Png], *,
              finals: pd.DataFrame, verdict: Analysis | None) -> list[Section]:
    if finals.empty:
        return [Section("results", "Results", [note("No evaluations recorded yet.")]),
                _pruning_section(data, pngs)]
    metrics = with_objective(REPORT_METRICS, objective)
    table = config_table(finals, metrics)
    has_history = not data.evaluations.empty
    best = best_rows(data, metric=objective.metric, mode=objective.mode) if has_history else None
    paired_metrics = with_objective(CLAIM_METRICS, objective)
    paired = paired_vs_monotonic(finals, metrics=paired_metrics)
    head = ([summary_section(verdict)] if verdict is not None else [Section(
        "summary", "Summary", [bullet_list(summary_lines(finals, objective=objective))])])
    return [
        *head,
        _rd_section(table, pngs),
        _heatmap_section(table, config_table(best, metrics) if best is not None else None,
                         objective, pngs, verdict=verdict),
        *([tests_section(verdict)] if verdict is not None else []),
        *([_curves_section(data, table, objective, pngs),
           _latent_section(data, table, objective, pngs)] if has_history else []),
        Section("configs", "Configurations: final validation metrics (mean ± 95% CI over seeds)",
                [_config_note(objective), html_table(config_view(table, objective, metrics))]),
        Section("paired", "Cyclical vs monotonic per configuration (descriptive, uncorrected)",
                [_PAIRED_NOTE, html_table(paired_view(paired, paired_metrics))]),
        *_pooled_sections(finals, paired_metrics),
        *([_pruning_section(data, pngs)] if has_history else []),
    ]


def _figure(pngs: list[_Png], name: str, draw: Callable[[], object], caption: str) -> str:
    """Draw one figure into ``pngs`` and return its HTML; a failed drawing becomes a note."""
    try:
        fig = draw()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=FIGURE_DPI,  # type: ignore[attr-defined]
                    pil_kwargs={"compress_level": _PNG_COMPRESS_LEVEL})
    except Exception as err:  # one bad figure must not cost the whole report
        _log.warning("figure %s could not be drawn: %s", name, err, exc_info=True)
        return note(f"{name}: could not be drawn ({err}).")
    pngs.append(_Png(name, buffer.getvalue(), caption))
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f"<figure><img src=\"{uri}\" alt=\"{esc(caption)}\">"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _has_values(table: pd.DataFrame, metric: str) -> bool:
    column = f"{metric}_mean"
    return column in table.columns and bool(table[column].notna().any())


_RD_CAPTION = (
    "Rate–distortion plane (Alemi et al. 2018): each configuration at its mean final validation "
    "KL (rate, x) and Rec (distortion, y) over completed seeds, error bars = 95% CIs over seeds "
    "(none with one seed). −ELBO = Rec + KL, so every dashed diagonal is a line of equal ELBO: "
    "the paper's claim for cyclical annealing — similar ELBO, lower Rec, higher KL — is a move "
    "down and to the right along a diagonal. Circles: monotonic (M = 1); triangles: cyclical "
    "(M > 1); squares: constant β (R = 0).")


def _rd_section(table: pd.DataFrame, pngs: list[_Png]) -> Section:
    section = Section("rate-distortion", "Rate–distortion: Rec vs KL")
    if not (_has_values(table, "kl") and _has_values(table, "rec")):
        section.parts.append(note("No configuration with a final KL and Rec yet."))
        return section
    section.parts.append(_figure(pngs, "rate-distortion.png",
                                 lambda: rate_distortion_figure(table), _RD_CAPTION))
    return section


_HEATMAP_NOTE = (
    "<p>Cells: mean over the completed seeds with the 95% CI half-width (or n=1); “k pruned”: k "
    "of the configuration's seeds were pruned (pruned and failed trials are counted, never "
    "averaged). Grey hatched: every trial was pruned; light grey: trials, none completed yet; "
    "blank: no trial. <b>Bright (yellow) is the better end of every scale</b> — higher ELBO, MI "
    "and active units, lower Rec; for KL, bright means higher KL, i.e. more use of the latent "
    "code; for the study objective, the end its mode names. <b>Seed noise:</b> ★ marks the "
    "brightest cell (the best mean); every cell outlined in white and black is not "
    "distinguishable from it — Welch's t-test over the seed values of the two cells gives "
    "p ≥ 0.05 (cells with a single seed are not tested; the test is unpaired, so the paired "
    "cyclical-vs-monotonic table below can be sharper). The colour range spans at least one "
    "typical seed CI (2 × the median CI half-width, centred on the data), so differences "
    "smaller than the noise are painted in nearly one colour. Final: each trial's last "
    "evaluation.</p>")


def _heatmap_metrics(objective: Objective) -> list[str]:
    return [objective.metric, *(m for m in HEATMAP_METRICS if m != objective.metric)]


def _heatmaps(table: pd.DataFrame, kind: str, objective: Objective,
              pngs: list[_Png]) -> list[str]:
    parts = []
    for metric in _heatmap_metrics(objective):
        if not _has_values(table, metric):
            continue
        is_objective = metric == objective.metric
        mode = objective.mode if is_objective else None
        label = METRIC_STYLES[metric].label if metric in METRIC_STYLES else metric
        title = f"{kind} validation {label}" + (f" (objective, {mode})" if is_objective else "")
        parts.append(_figure(
            pngs, f"heatmap-{kind}-{metric}.png",
            lambda m=metric, t=title, o=mode: heatmap_figure(table, m, title=t, mode=o),
            f"{title}, per ramp (rows) and β_max (columns). {NOISE_NOTE}."))
    return parts


def _heatmap_section(table: pd.DataFrame, best_table: pd.DataFrame | None,
                     objective: Objective, pngs: list[_Png], *,
                     verdict: Analysis | None = None) -> Section:
    uses = _uses_z_heatmap(verdict, pngs) if verdict is not None else []
    final = _heatmaps(table, "final", objective, pngs)
    parts = [_HEATMAP_NOTE, *uses, *final]
    if best_table is not None:
        best = _heatmaps(best_table, "best", objective, pngs)
        parts.append("<details><summary>Best-evaluation heatmaps: each trial at its evaluation "
                     f"with the best {esc(objective.label)} ({len(best)} figures)</summary>"
                     f"{''.join(best)}</details>")
    return Section("heatmaps", "Heatmaps over M × R", parts)


def _uses_z_heatmap(verdict: Analysis, pngs: list[_Png]) -> list[str]:
    from analysis._heatmap import uses_z_figure

    threshold = verdict.settings.get("kl_threshold", 0.1)
    caption = (f"Share of seeds whose trial uses z (final validation KL ≥ {threshold:g} nats) "
               "per configuration: k/n in each cell, colour = the share on a fixed 0–1 scale, "
               "so equal counts are equal colours. Bold outline: the configurations in the "
               "best set by the objective (drawn only when the best set leaves some out).")
    return [_figure(pngs, "heatmap-final-uses_z.png", lambda: uses_z_figure(verdict.cells),
                    caption)]


def _curves_section(data: StudyData, table: pd.DataFrame, objective: Objective,
                    pngs: list[_Png]) -> Section:
    specs = figs.pick_curve_configs(table, metric=objective.metric, mode=objective.mode)
    section = Section("curves", "Learning curves")
    if not specs:
        section.parts.append(note("No configuration with a final value yet."))
        return section
    caption = ("Validation ELBO, Rec, KL and β against the optimizer step: mean over seeds, band "
               "= lowest to highest seed; dotted lines = cycle boundaries; hollow diamonds = "
               "the final evaluation, on the whole validation set (the intermediate ones use a "
               "fixed-seed subset of 250 sentences where it is larger, so the two levels are "
               "not comparable). Lines (the best of "
               f"each family by {objective.label}): " + "; ".join(s.label for s in specs))
    section.parts.append(_figure(pngs, "curves.png",
                                 lambda: figs.curves_figure(data.evaluations, specs), caption))
    return section


def _latent_section(data: StudyData, table: pd.DataFrame, objective: Objective,
                    pngs: list[_Png]) -> Section:
    section = Section("latents", "Latent space (2-D posterior means)")
    rows = []
    for spec in figs.pick_curve_configs(table, metric=objective.metric, mode=objective.mode):
        own = figs.config_rows(data.trials, spec)
        own = own[own["trial_id"].isin(set(data.latents["trial_id"]))]
        if not own.empty:  # a completed trial when there is one, then the lowest seed
            own = own.assign(_done=own["status"] != "completed")
            first = own.sort_values(["_done", "seed", "trial_id"]).iloc[0]
            kind = spec.label.split(":")[0]
            rows.append((f"{kind}\nM={spec.n_cycles} R={spec.ratio:g} s{int(first['seed'])}",
                         str(first["trial_id"])))
    if data.latents.empty or not rows:
        section.parts.append(note("No 2-D latents recorded (only 2-D models record them)."))
        return section
    caption = ("Posterior means E[z|x] of the validation sentences through training, coloured by "
               "sentence index; dashed circle = the prior's 1σ. Rows: "
               + "; ".join(f"{label.splitlines()[0]} = trial {tid}" for label, tid in rows))
    section.parts.append(_figure(pngs, "latents.png",
                                 lambda: figs.latent_figure(data.latents, rows), caption))
    return section


def _config_note(objective: Objective) -> str:
    return (f"<p>“vs best”: each configuration against the one with the best mean "
            f"{esc(objective.label)} (the study objective) by Welch's t-test over seeds: "
            "“within noise” p ≥ 0.05, “differs” p &lt; 0.05; “untested” when either has a "
            "single seed.</p>")


_PAIRED_NOTE = ("<p>Each cyclical configuration (M &gt; 1) against the monotonic one (M = 1) at "
                "the same R, ramp and β_max, paired by seed over completed trials: mean "
                "difference cyclical − monotonic ± its 95% CI and the paired t-test p. Lower "
                "Rec, higher ELBO are better; higher KL means more use of the latent code. "
                "The paper's claim for cyclical annealing: similar ELBO, lower Rec, higher "
                "KL.</p>")


def _pooled_sections(finals: pd.DataFrame, metrics: Sequence[str]) -> list[Section]:
    """Cyclical vs monotonic per (M, R), pooled over ramps, β_max and lr schedules; only when
    the study has more than one of them (otherwise the table above says it all)."""
    labels = pooled_labels(finals)
    if labels is None:
        return []
    over, same = labels
    pooled = paired_vs_monotonic_pooled(finals, metrics=metrics)
    return [Section("pooled", f"Cyclical vs monotonic at each M and R, pooled over {over}", [
        f"<p>Each pair: one seed of one configuration at M &gt; 1 and R against the same seed, "
        f"{esc(same)} at M = 1 and the same R (completed trials only); mean difference "
        "cyclical − monotonic ± its 95% CI and the paired t-test p over all pairs of the "
        "cell. It answers “does larger M help at this R?” with every ramp's seeds behind it; "
        "the table above has the same comparison per configuration.</p>",
        html_table(paired_view(pooled, metrics))])]


def _pruning_section(data: StudyData, pngs: list[_Png]) -> Section:
    section = Section("pruning", "Pruning")
    trials = data.trials
    if trials.empty:
        section.parts.append(note("No trials recorded yet."))
        return section
    counts = trials["status"].value_counts()
    lines = [prune.settings_line(data.meta), prune.steps_line(trials, partial=data.partial),
             ", ".join(f"{status}: {int(counts.get(status, 0))}" for status in
                       ("completed", "pruned", "error", "running", "pending")
                       if counts.get(status, 0)),
             prune.family_line(trials)]
    section.parts.append(bullet_list([line for line in lines if line]))
    section.parts.append("<p>Pruned trials per configuration (rows M, columns R): “k of n "
                         "pruned, at step (share of T)”; with more than "
                         f"{prune.MAX_LISTED_STEPS}, the median share of T and the range.</p>")
    section.parts.append(html_table(prune.pruned_table(trials)))
    if len(trials) <= PRUNING_MAX_ROWS or not trials["status"].eq("completed").all():
        section.parts.append(_figure(
            pngs, "pruning.png", lambda: figs.pruning_figure(trials, max_rows=PRUNING_MAX_ROWS),
            "Each trial's planned length (outline) and how far it ran (filled, by status); "
            f"× = the step it was pruned at. Above {PRUNING_MAX_ROWS} trials, only those that "
            "did not complete are drawn."))
    stopped = trials[trials["status"].isin(["pruned", "error"])]
    if not stopped.empty:
        view = pd.DataFrame({
            "trial": stopped["trial_id"], "configuration": stopped.apply(figs.trial_label, axis=1),
            "status": stopped["status"], "pruned at step": stopped["pruned_at_step"],
            "last step": stopped["last_step"], "error": stopped["error"]})
        section.parts.append("<details><summary>Pruned and failed trials "
                             f"({len(view)})</summary>"
                             f"{html_table(view.sort_values(['status', 'trial']))}</details>")
    return section


# --- MLflow ----------------------------------------------------------------------------------
def _log_artifacts(meta: dict, tracking_uri: str | None, paths: Sequence[Path]) -> bool:
    run_id, uri = meta.get("parent_run_id"), tracking_uri or meta.get("tracking_uri")
    if not run_id or not uri:
        _log.warning("report not logged to MLflow: study.json has no parent_run_id/tracking_uri")
        return False
    try:
        client = open_client(uri)  # checks first: a missing store is not created, a dead server
        for path in paths:  # costs seconds rather than MLflow's retry backoff
            client.log_artifact(run_id, str(path), artifact_path="report")
    except Exception as err:  # tracking trouble never fails the report
        _log.warning("report not logged to MLflow run %s at %s: %s", run_id, uri, err)
        return False
    _log.info("report logged to MLflow run %s (%d files)", run_id, len(paths))
    return True
