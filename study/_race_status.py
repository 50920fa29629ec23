"""The race's progress line, for the driver and ``klstudy status`` (reads race.json only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RACE_FILE = "race.json"


def progress_line(data: dict[str, Any]) -> str:
    left = len(data["best_set"])
    n = len(data["configs"])
    head = (f"race round {data['round']}/{len(data['looks'])} (<= {data['looks'][-1]} seeds): "
            f"{left} of {n} configurations left, {data['trials_used']} trials spent of "
            f"{data['grid_trials']} in the full grid")
    verdict = data["verdict"] or "open"
    if data["done"]:
        return f"{head}; race done ({data['stop_reason']}), verdict {verdict}"
    return f"{head}; verdict {verdict}"


def race_status_line(root: str | Path) -> str | None:
    """``klstudy status``'s race line, from race.json (None outside a race)."""
    path = Path(root) / RACE_FILE
    if not path.is_file():
        return None
    try:
        return progress_line(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError) as exc:
        return f"race: {path} is unreadable ({exc})"
