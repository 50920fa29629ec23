"""The verdict in the report: the summary section, the table of every test, ``summary.json``."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from analysis._html import Section, bullet_list, esc, html_table
from analysis._trial_table import METRICS
from analysis._verdict import Analysis

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
TRIAL_COLUMNS = ("n_cycles", "ratio", "ramp", "beta_max", "seed", "status", "lr_schedule",
                 "beta_min", "free_bits", "lr_n_cycles", *METRICS)


def trials_for_analysis(finals: pd.DataFrame) -> pd.DataFrame:
    """A study's final rows as the one-row-per-trial table :func:`analyse_trials` reads.

    A trial marked completed without a finite final Rec, KL or ELBO (a NaN evaluation) is
    counted as an error rather than failing the whole report.
    """
    table = finals[[c for c in TRIAL_COLUMNS if c in finals.columns]].copy()
    finite = np.isfinite(table[["rec", "kl", "elbo"]].astype(float)).all(axis=1)
    broken = (table["status"] == "completed") & ~finite
    if broken.any():
        log.warning("%d completed trial(s) without a finite final rec/kl/elbo: counted as "
                    "errors", int(broken.sum()))
        table.loc[broken, "status"] = "error"
    return table


def write_summary(out_dir: Path, analysis: Analysis) -> Path:
    path = out_dir / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(analysis.to_json(), indent=1, ensure_ascii=False,
                              allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


_SUMMARY_NOTE = (
    "<p><b>How to read this.</b> The question is fixed in advance: does cyclical annealing "
    "(M &gt; 1) keep the latent code in use more often than monotonic (M = 1)? A trial uses z "
    "when its final validation KL is at least the threshold. The seed is the unit of "
    "replication (it fixes initialisation and data order for every configuration), so the test "
    "is over per-seed differences, with the exact sign-flip test: per-seed outcomes are nearly "
    "all-or-none, so no normal approximation is assumed, and its smallest p-value 2/2^n says "
    "in advance how many seeds can reject. The secondary questions are tested only after the "
    "primary one rejects and are Holm-corrected as a family; the best set is every "
    "configuration a familywise comparison with the best cannot separate from it. "
    "<code>summary.json</code> beside this file has the same numbers; "
    "docs/report.md explains each method.</p>")


def summary_section(analysis: Analysis) -> Section:
    verdict = (f"<p class='verdict'><b>verdict: <code>{esc(analysis.verdict)}</code></b> "
               f"(uses z: cyclical {analysis.uses_z['cyclical'][0]}/"
               f"{analysis.uses_z['cyclical'][1]}, monotonic "
               f"{analysis.uses_z['monotonic'][0]}/{analysis.uses_z['monotonic'][1]} trials)</p>")
    return Section("summary", "Summary", [verdict, bullet_list(analysis.summary), _SUMMARY_NOTE])


def _p(p: float) -> str:
    return "—" if not math.isfinite(p) else f"{p:.3g}"


def tests_view(analysis: Analysis) -> pd.DataFrame:
    rows = [{"family": t["family"], "test": t["name"], "method": t["method"], "n": t["n"],
             "statistic": f"{t['statistic']:+.3g}" if math.isfinite(t["statistic"]) else "—",
             "p raw": _p(t["p_raw"]), "p adjusted": _p(t["p_adj"]),
             "rejected": "yes" if t.get("rejected") else "no"} for t in analysis.tests]
    return pd.DataFrame(rows, columns=["family", "test", "method", "n", "statistic", "p raw",
                                       "p adjusted", "rejected"])


def tests_section(analysis: Analysis) -> Section:
    intro = ("<p>Every test behind the summary. <b>primary</b>: the one pre-stated question, "
             "uncorrected (α {alpha:g}); <b>secondary</b>: Holm over the family, and each "
             "adjusted p is at least the primary p (they count only after it rejects); "
             "<b>best_set</b>: best − configuration by the objective, p adjusted by the "
             "sign-flip max-T over all comparisons with the best. n = seeds. Statistic: the "
             "mean per-seed difference (sign-flip tests), the smaller |t| of the two one-sided "
             "tests (TOST), or the paired t (best set).</p>").format(
                 alpha=analysis.settings.get("alpha", 0.05))
    view = tests_view(analysis)
    best = view[view["family"] == "best_set"]
    parts = [intro, html_table(view[view["family"] != "best_set"])]
    if not best.empty:
        parts.append(f"<details><summary>Comparisons with the best ({len(best)})</summary>"
                     f"{html_table(best)}</details>")
    return Section("tests", "Tests (method, n, raw and adjusted p, family)", parts)
