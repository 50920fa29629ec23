"""HTML building blocks of the report: escaping, lists, tables, header, banner, the page.

The page is self-contained: inline CSS, no scripts, no external resources. Every string that
comes from the study's data goes through :func:`esc`.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from analysis._load import StudyData

_FINISHED = ("completed", "pruned", "error")


@dataclass
class Section:
    anchor: str
    title: str
    parts: list[str] = field(default_factory=list)  # HTML fragments, already escaped


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def bullet_list(lines: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>"


def note(text: str) -> str:
    return f"<p class='note'>{esc(text)}</p>"


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if value is pd.NA or value is pd.NaT:
        return "—"
    return esc(value)


def html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return note("No rows.")
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False, name=None))
    return (f"<div class='scroll'><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _progress(data: StudyData) -> tuple[int, int]:
    trials = data.trials
    done = int(trials["status"].isin(_FINISHED).sum()) if not trials.empty else 0
    return done, int(data.meta.get("n_trials") or len(trials))


def banner(data: StudyData) -> str:
    if not data.partial:
        return ""
    status = str(data.meta.get("status", "running"))
    what = {"running": "study still running", "interrupted": "study interrupted",
            "failed": "study failed"}.get(status, "not all trials finished")
    done, total = _progress(data)
    return (f"<div class='banner'>PARTIAL REPORT — {esc(what)} "
            f"({done} of {total} trials finished)</div>")


def header(data: StudyData, objective_label: str) -> str:
    meta = data.meta
    name = meta.get("name", "study")
    facts = [("status", meta.get("status", "unknown")), ("trials", meta.get("n_trials", "?")),
             ("objective", objective_label),
             ("started", meta.get("started_at", "—")),
             ("finished", meta.get("finished_at") or "—"),
             ("records", data.source), ("tracking URI", meta.get("tracking_uri") or "—"),
             ("generated", datetime.now(timezone.utc).isoformat(timespec="seconds"))]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    spec = json.dumps(meta.get("spec", {}), indent=2, sort_keys=True, default=str)
    return (f"<h1>klstudy report: {esc(name)} <span class='status'>"
            f"{esc(meta.get('status', ''))}</span></h1>{banner(data)}<dl>{dl}</dl>"
            f"<details><summary>spec</summary><pre>{esc(spec)}</pre></details>")


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


def page(data: StudyData, sections: list[Section], *, objective_label: str) -> str:
    nav = "".join(f"<a href='#{s.anchor}'>{esc(s.title.split(':')[0])}</a>" for s in sections)
    body = "".join(f"<section id='{s.anchor}'><h2>{esc(s.title)}</h2>{''.join(s.parts)}"
                   "</section>" for s in sections)
    title = esc(f"klstudy report: {data.meta.get('name', 'study')}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_CSS}</style></head><body>{header(data, objective_label)}<nav>{nav}</nav>"
            f"{body}</body></html>\n")
