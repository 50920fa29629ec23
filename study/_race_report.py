"""The report's race section (issue 19): rendered from the study's ``race.json`` beside the
report that ``analysis`` builds — ``race.md`` and a ``<section id="race">`` appended to
``report.html`` — so the race adds to the report without touching ``analysis``."""

from __future__ import annotations

import html
import json
from pathlib import Path

from study._race import race_section_markdown
from study._race_status import RACE_FILE


def add_race_section(study_dir: Path, html_path: Path) -> Path | None:
    """Write ``race.md`` beside ``html_path`` and append the section to it; None outside a
    race."""
    source = Path(study_dir) / RACE_FILE
    if not source.is_file():
        return None
    data = json.loads(source.read_text())
    markdown = race_section_markdown(data)
    out = html_path.parent / "race.md"
    out.write_text(markdown)
    page = html_path.read_text()
    if '<section id="race">' not in page:
        section = _html(markdown)
        page = page.replace("</body>", section + "\n</body>") if "</body>" in page else (
            page + section)
        html_path.write_text(page)
    return out


def _html(markdown: str) -> str:
    """The section's markdown (a heading, paragraphs, one table) as HTML."""
    parts, rows = ['<section id="race">'], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                rows.append(cells)
            continue
        if rows:
            parts.append(_table(rows))
            rows = []
        if line.startswith("## "):
            parts.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
    if rows:
        parts.append(_table(rows))
    parts.append("</section>")
    return "\n".join(parts)


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{c}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
