"""``klstudy report``: one self-contained HTML file (figures embedded) plus the PNGs beside it.

The report opens offline from a file: inline CSS, PNGs as base64 data URIs, no scripts and no
external resources. Every string that comes from the study's data goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import _figures as figs
from analysis._load import StudyData, best_rows, final_rows, load_study
from analysis._mlflow_load import open_client
from analysis._stats import config_table, paired_vs_monotonic, summary_lines

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FIGURE_DPI = 110
_PNG_COMPRESS_LEVEL = 1  # zlib level: 1 encodes ~4x faster than the default 6, files ~30% larger
HEATMAP_METRICS: tuple[str, ...] = ("elbo", "kl", "rec", "mi", "au")
PAIRED_METRICS: tuple[str, ...] = ("rec", "kl", "elbo")
PRUNING_MAX_ROWS = 40  # trials in the pruning timeline before completed ones are left out
_FIGURE_GLOBS = ("heatmap-*.png", "curves.png", "latents.png", "pruning.png")
_FINISHED = ("completed", "pruned", "error")


@dataclass(frozen=True)
class ReportResult:
    html_path: Path
    figure_paths: list[Path]
    partial: bool


@dataclass
class _Section:
    anchor: str
    title: str
    parts: list[str] = field(default_factory=list)  # HTML fragments, already escaped


@dataclass(frozen=True)
class _Png:
    name: str
    data: bytes
    caption: str  # plain text


def build_report(study_dir: str | os.PathLike[str], *,
                 out_dir: str | os.PathLike[str] | None = None, tracking_uri: str | None = None,
                 log_to_mlflow: bool = True) -> ReportResult:
    """Write ``report.html`` and one PNG per figure, replacing an earlier report.

    Args:
        study_dir: the study directory (``study.json`` and the Parquet records).
        out_dir: where to write; default ``<study_dir>/report``.
        tracking_uri: overrides the tracking URI of ``study.json`` (reading and artifact logging).
        log_to_mlflow: also log the HTML and PNGs as artifacts (``report/``) of the study's
            parent run. When the run or its store is missing or unreachable a warning is logged
            and the report is still written.

    Returns:
        The HTML path, the PNG paths and whether the study was still unfinished.

    Raises:
        ReportError: when the study directory cannot be read (from ``load_study``).
    """
    data = load_study(study_dir, tracking_uri=tracking_uri)
    out = Path(out_dir) if out_dir is not None else Path(study_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    pngs: list[_Png] = []
    sections = _sections(data, pngs)
    figure_paths = [out / png.name for png in pngs]
    for path in _stale_figures(out, keep=figure_paths):
        path.unlink()
    for png, path in zip(pngs, figure_paths, strict=True):
        _write_atomic(path, png.data)
    html_path = out / REPORT_FILE
    _write_atomic(html_path, _page(data, sections).encode("utf-8"))
    log.info("report written to %s (%d figures)", html_path, len(figure_paths))
    if log_to_mlflow:
        _log_artifacts(data.meta, tracking_uri, [html_path, *figure_paths])
    return ReportResult(html_path=html_path, figure_paths=figure_paths, partial=data.partial)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _stale_figures(out: Path, *, keep: Sequence[Path]) -> list[Path]:
    found = {p for pattern in _FIGURE_GLOBS for p in out.glob(pattern)}
    return sorted(found - set(keep))


# --- sections --------------------------------------------------------------------------------
def _sections(data: StudyData, pngs: list[_Png]) -> list[_Section]:
    finals = final_rows(data) if not data.evaluations.empty else pd.DataFrame()
    if finals.empty:
        note = "<p class='note'>No evaluations recorded yet.</p>"
        return [_Section("results", "Results", [note]), _pruning_section(data, pngs)]
    table = config_table(finals)
    best_table = config_table(best_rows(data))
    return [
        _Section("summary", "Summary", [_list(summary_lines(finals))]),
        _heatmap_section(table, best_table, pngs),
        _curves_section(data, table, pngs),
        _latent_section(data, table, pngs),
        _Section("configs", "Configurations: final validation metrics (mean ± 95% CI over seeds)",
                 [_html_table(_config_view(table))]),
        _Section("paired", "Cyclical vs monotonic (paired over seeds)", [
            _PAIRED_NOTE,
            _html_table(_paired_view(paired_vs_monotonic(finals, metrics=PAIRED_METRICS)))]),
        _pruning_section(data, pngs),
    ]


def _figure(pngs: list[_Png], name: str, draw: Callable[[], object], caption: str) -> str:
    """Draw one figure into ``pngs`` and return its HTML; a failed drawing becomes a note."""
    try:
        fig = draw()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=FIGURE_DPI,  # type: ignore[attr-defined]
                    pil_kwargs={"compress_level": _PNG_COMPRESS_LEVEL})
    except Exception as err:  # one bad figure must not cost the whole report
        log.warning("figure %s could not be drawn: %s", name, err, exc_info=True)
        return f"<p class='note'>{_e(name)}: could not be drawn ({_e(str(err))}).</p>"
    pngs.append(_Png(name, buffer.getvalue(), caption))
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f"<figure><img src=\"{uri}\" alt=\"{_e(caption)}\">"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _has_values(table: pd.DataFrame, metric: str) -> bool:
    column = f"{metric}_mean"
    return column in table.columns and bool(table[column].notna().any())


_HEATMAP_NOTE = (
    "<p>Cells: mean over the completed seeds with the 95% CI half-width (or n=1); “k pruned”: k "
    "of the configuration's seeds were pruned (pruned and failed trials are counted, never "
    "averaged). Grey hatched: every trial was pruned; light grey: trials, none completed yet; "
    "blank: no trial. <b>Bright (yellow) is the better end of every scale</b> — higher ELBO, MI "
    "and active units, lower Rec; for KL, bright means higher KL, i.e. more use of the latent "
    "code. Final: each trial's last evaluation.</p>")


def _heatmaps(table: pd.DataFrame, kind: str, pngs: list[_Png]) -> list[str]:
    parts = []
    for metric in HEATMAP_METRICS:
        if _has_values(table, metric):
            title = f"{kind} validation {figs.METRIC_STYLES[metric].label}"
            parts.append(_figure(pngs, f"heatmap-{kind}-{metric}.png",
                                 lambda m=metric, t=title: figs.heatmap_figure(table, m, title=t),
                                 f"{title}, per ramp (rows) and β_max (columns)"))
    return parts


def _heatmap_section(table: pd.DataFrame, best_table: pd.DataFrame,
                     pngs: list[_Png]) -> _Section:
    final = _heatmaps(table, "final", pngs)
    best = _heatmaps(best_table, "best", pngs)
    return _Section("heatmaps", "Heatmaps over M × R", [
        _HEATMAP_NOTE, *final,
        "<details><summary>Best-evaluation heatmaps: each trial at its evaluation with the "
        f"highest validation ELBO ({len(best)} figures)</summary>{''.join(best)}</details>"])


def _curves_section(data: StudyData, table: pd.DataFrame, pngs: list[_Png]) -> _Section:
    specs = figs.pick_curve_configs(table)
    section = _Section("curves", "Learning curves")
    if not specs:
        section.parts.append("<p class='note'>No configuration with a final value yet.</p>")
        return section
    caption = ("Validation ELBO, Rec, KL and β against the optimizer step: mean over seeds, band "
               "= lowest to highest seed; dotted lines = cycle boundaries. Lines: "
               + "; ".join(s.label for s in specs))
    section.parts.append(_figure(pngs, "curves.png",
                                 lambda: figs.curves_figure(data.evaluations, specs), caption))
    return section


def _latent_section(data: StudyData, table: pd.DataFrame, pngs: list[_Png]) -> _Section:
    section = _Section("latents", "Latent space (2-D posterior means)")
    rows = []
    for spec in figs.pick_curve_configs(table):
        own = figs.config_rows(data.trials, spec)
        own = own[own["trial_id"].isin(set(data.latents["trial_id"]))]
        if not own.empty:  # a completed trial when there is one, then the lowest seed
            own = own.assign(_done=own["status"] != "completed")
            first = own.sort_values(["_done", "seed", "trial_id"]).iloc[0]
            kind = spec.label.split(":")[0]
            rows.append((f"{kind}\nM={spec.n_cycles} R={spec.ratio:g} s{int(first['seed'])}",
                         str(first["trial_id"])))
    if data.latents.empty or not rows:
        section.parts.append("<p class='note'>No 2-D latents recorded (only 2-D models "
                             "record them).</p>")
        return section
    caption = ("Posterior means E[z|x] of the validation sentences through training, coloured by "
               "sentence index; dashed circle = the prior's 1σ. Rows: "
               + "; ".join(f"{label.splitlines()[0]} = trial {tid}" for label, tid in rows))
    section.parts.append(_figure(pngs, "latents.png",
                                 lambda: figs.latent_figure(data.latents, rows), caption))
    return section


def _pruning_section(data: StudyData, pngs: list[_Png]) -> _Section:
    section = _Section("pruning", "Pruning")
    trials = data.trials
    if trials.empty:
        section.parts.append("<p class='note'>No trials recorded yet.</p>")
        return section
    counts = trials["status"].value_counts()
    section.parts.append(_list([f"{status}: {int(counts.get(status, 0))}"
                                for status in ("completed", "pruned", "error", "running",
                                               "pending") if counts.get(status, 0)]))
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
        section.parts.append(_html_table(view.sort_values(["status", "trial"])))
    return section


# --- HTML ------------------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _list(lines: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>"


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if value is pd.NA or value is pd.NaT:
        return "—"
    return _e(value)


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p class='note'>No rows.</p>"
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False, name=None))
    return (f"<div class='scroll'><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _mean_ci(row: pd.Series, metric: str) -> str:
    mean, ci = row.get(f"{metric}_mean"), row.get(f"{metric}_ci")
    n = int(row.get(f"{metric}_n", 0) or 0)
    if mean is None or not np.isfinite(mean) or n == 0:
        return "—"
    return f"{mean:.4g} ± {ci:.2g}" if n > 1 and np.isfinite(ci) else f"{mean:.4g} (n=1)"


def _config_view(table: pd.DataFrame) -> pd.DataFrame:
    view = pd.DataFrame({"M": table["n_cycles"], "R": table["ratio"], "ramp": table["ramp"],
                         "β_max": table["beta_max"], "trials": table.get("n_seeds"),
                         "completed": table.get("n_completed"), "pruned": table.get("n_pruned"),
                         "errors": table.get("n_error")})
    for metric in ("elbo", "rec", "kl", "mi", "au"):
        if f"{metric}_mean" in table.columns:
            view[metric.upper()] = table.apply(_mean_ci, axis=1, metric=metric)
    return view.sort_values(["ramp", "β_max", "M", "R"])


_PAIRED_NOTE = ("<p>Each cyclical configuration (M &gt; 1) against the monotonic one (M = 1) at "
                "the same R, ramp and β_max, paired by seed over completed trials: mean "
                "difference cyclical − monotonic ± its 95% CI and the paired t-test p. Lower "
                "Rec, higher ELBO are better; higher KL means more use of the latent code.</p>")


def _paired_cell(row: pd.Series) -> str:
    mean, ci, p = row["mean_diff"], row["ci"], row["p_value"]
    if not np.isfinite(mean):
        return "—"
    text = f"{mean:+.3g}" + (f" ± {ci:.2g}" if np.isfinite(ci) else "")
    return text + (f" (p={p:.2g})" if np.isfinite(p) else "")


def _paired_view(paired: pd.DataFrame) -> pd.DataFrame:
    """One row per cyclical configuration; per metric "diff ± CI (p)"."""
    keys = ["n_cycles", "ratio", "ramp", "beta_max"]
    if paired.empty:
        return paired
    cells = paired.assign(cell=paired.apply(_paired_cell, axis=1))
    wide = cells.pivot_table(index=keys, columns="metric", values="cell", aggfunc="first")
    pairs = paired.groupby(keys)["n_pairs"].max()
    notes = paired.groupby(keys)["note"].agg(lambda s: "; ".join(sorted({n for n in s if n})))
    view = pd.DataFrame({"pairs": pairs, **{f"{m.upper()} cyc − mono": wide[m]
                                            for m in PAIRED_METRICS if m in wide.columns},
                         "note": notes}).reset_index()
    return view.rename(columns={"n_cycles": "M", "ratio": "R", "beta_max": "β_max"})


def _progress(data: StudyData) -> tuple[int, int]:
    trials = data.trials
    done = int(trials["status"].isin(_FINISHED).sum()) if not trials.empty else 0
    return done, int(data.meta.get("n_trials") or len(trials))


def _banner(data: StudyData) -> str:
    if not data.partial:
        return ""
    status = str(data.meta.get("status", "running"))
    what = {"running": "study still running", "interrupted": "study interrupted",
            "failed": "study failed"}.get(status, "not all trials finished")
    done, total = _progress(data)
    return (f"<div class='banner'>PARTIAL REPORT — {_e(what)} "
            f"({done} of {total} trials finished)</div>")


def _header(data: StudyData) -> str:
    meta = data.meta
    name = meta.get("name", "study")
    facts = [("status", meta.get("status", "unknown")), ("trials", meta.get("n_trials", "?")),
             ("started", meta.get("started_at", "—")),
             ("finished", meta.get("finished_at") or "—"),
             ("records", data.source), ("tracking URI", meta.get("tracking_uri") or "—"),
             ("generated", datetime.now(timezone.utc).isoformat(timespec="seconds"))]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    spec = json.dumps(meta.get("spec", {}), indent=2, sort_keys=True, default=str)
    return (f"<h1>klstudy report: {_e(name)} <span class='status'>{_e(meta.get('status', ''))}"
            f"</span></h1>{_banner(data)}<dl>{dl}</dl>"
            f"<details><summary>spec</summary><pre>{_e(spec)}</pre></details>")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1500px;padding:1em 2em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.3em}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.status{font-size:.55em;vertical-align:middle;background:#eee;border-radius:4px;padding:.15em .5em}
.banner{background:#fff3cd;border:2px solid #e0a800;color:#7a5b00;font-weight:bold;font-size:1.2em;
padding:.6em 1em;margin:.6em 0;border-radius:4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;margin:.5em 0}
dt{color:#666}dd{margin:0}nav a{margin-right:1em}figure{margin:.8em 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
details>summary{cursor:pointer;margin:.6em 0;color:#245}
table{border-collapse:collapse;font-size:.85em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f4f4f4}tbody tr:nth-child(even){background:#fafafa}.scroll{overflow-x:auto}
.note{color:#777;font-style:italic}pre{background:#f7f7f7;padding:.6em;overflow-x:auto}
"""


def _page(data: StudyData, sections: list[_Section]) -> str:
    nav = "".join(f"<a href='#{s.anchor}'>{_e(s.title.split(':')[0])}</a>" for s in sections)
    body = "".join(f"<section id='{s.anchor}'><h2>{_e(s.title)}</h2>{''.join(s.parts)}"
                   "</section>" for s in sections)
    title = _e(f"klstudy report: {data.meta.get('name', 'study')}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_CSS}</style></head><body>{_header(data)}<nav>{nav}</nav>{body}"
            "</body></html>\n")


# --- MLflow ----------------------------------------------------------------------------------
def _log_artifacts(meta: dict, tracking_uri: str | None, paths: Sequence[Path]) -> bool:
    run_id, uri = meta.get("parent_run_id"), tracking_uri or meta.get("tracking_uri")
    if not run_id or not uri:
        log.warning("report not logged to MLflow: study.json has no parent_run_id/tracking_uri")
        return False
    try:
        client = open_client(uri)  # checks first: a missing store is not created, a dead server
        for path in paths:  # costs seconds rather than MLflow's retry backoff
            client.log_artifact(run_id, str(path), artifact_path="report")
    except Exception as err:  # tracking trouble never fails the report
        log.warning("report not logged to MLflow run %s at %s: %s", run_id, uri, err)
        return False
    log.info("report logged to MLflow run %s (%d files)", run_id, len(paths))
    return True
