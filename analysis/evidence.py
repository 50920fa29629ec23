"""Evidence tables regenerated from the committed per-trial files, never typed.

Every study under ``docs/results/<name>/`` (and the quickstart under ``docs/quickstart/``) that
commits ``trials.csv`` (one row per trial, the ``klstudy report --results`` format) is analysed
with :func:`analysis.analyse_trials`; the tables go between markers in any markdown file::

    <!-- evidence:begin NAME -->
    ...generated...
    <!-- evidence:end NAME -->

NAME is ``studies`` (one row per study: uses-z counts, per-seed estimate, sign-flip p, verdict),
``<study>-tests`` (the primary and secondary tests), ``<study>-uses_z`` (trials using z per M
and ramp), ``<study>-headline`` (one sentence), ``quickstart-seedsets`` (the quickstart
verdict on disjoint seed sets, from ``docs/quickstart/seeds.csv``; ``quickstart_<tag>-…``
from an earlier setting's ``seeds_<tag>.csv``) or ``quickstart-rates``
(per T and arm, the seeds using z with exact intervals, from the same file).

Usage: ``python -m analysis.evidence [FILE ...] [--check]`` (default ``docs/evidence.md``):
rewrites the blocks in place, or with ``--check`` exits 1 and names each block that differs.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from analysis._load import ReportError
from analysis._trial_table import read_results
from analysis._verdict import Analysis, analyse_trials

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVE = "rec"  # every committed study's spec objective (validation Rec, min)
SET_SIZE = 8  # seeds per quickstart verdict set
_BLOCK = re.compile(r"(<!-- evidence:begin (?P<name>[\w.-]+) -->\n)(?P<body>.*?)"
                    r"(<!-- evidence:end (?P=name) -->)", re.S)


def study_tables(root: Path = ROOT) -> dict[str, Path | None]:
    """Each committed study's per-trial table (None: the study commits none)."""
    out: dict[str, Path | None] = {}
    quick = root / "docs" / "quickstart" / "trials.csv"
    if quick.is_file():
        out["quickstart"] = quick
    results = root / "docs" / "results"
    for directory in sorted(p for p in results.iterdir() if p.is_dir()):
        table = directory / "trials.csv"
        out[directory.name] = table if table.is_file() else None
    return out


def _md(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _p(p: float) -> str:
    return "—" if not math.isfinite(p) else f"{p:.3g}"


def _ci(primary: dict) -> str:
    if primary.get("ci_low") is None or not math.isfinite(primary.get("ci_low", math.nan)):
        return ""
    return f" [{primary['ci_low']:+.2f}, {primary['ci_high']:+.2f}]"


def _analysis(path: Path) -> Analysis:
    return analyse_trials(read_results(path), objective=OBJECTIVE)


def studies_block(tables: dict[str, Path | None], analyses: dict[str, Analysis]) -> str:
    rows = []
    for name, path in tables.items():
        if path is None:
            rows.append([name, "—", "—", "—", "—", "—", "—", "—",
                         "no per-trial table committed: no claim"])
            continue
        a = analyses[name]
        p = a.primary
        rows.append([name, f"{path.parent.name}/{path.name}", a.settings["n_trials"],
                     p["n_seeds"], "{}/{}".format(*a.uses_z["cyclical"]),
                     "{}/{}".format(*a.uses_z["monotonic"]),
                     f"{p['estimate']:+.2f}{_ci(p)}", f"{_p(p['p'])} (needs ≥ "
                     f"{p['min_seeds_to_reject']} seeds)", f"`{a.verdict}`"])
    return _md(["study", "per-trial table", "trials", "seeds", "cyclical uses z (trials)",
                "monotonic uses z", "per-seed share difference [95% bootstrap]",
                "sign-flip p", "verdict"], rows)


def tests_block(a: Analysis) -> str:
    rows = [[t["family"], t["name"], t["n"], f"{t['statistic']:+.3g}", _p(t["p_raw"]),
             _p(t["p_adj"]), "yes" if t.get("rejected") else "no"]
            for t in a.tests if t["family"] != "best_set"]
    best = a.best_set
    tail = (f"\nBest set by validation Rec (sign-flip max-T comparison with the best, α "
            f"{a.settings['alpha']:g}): {len(best)} of {a.settings['n_configurations']} "
            "configurations.\n")
    return _md(["family", "test", "seeds", "statistic", "p raw", "p adjusted", "rejected"],
               rows) + tail


def uses_z_block(path: Path, threshold: float = 0.1) -> str:
    table = read_results(path)
    done = table[(table["status"] == "completed") & (table["ratio"] > 0)]
    z = done["kl"] >= threshold
    rows = []
    for key in ("n_cycles", "ramp"):
        for value, group in done.groupby(key, sort=True):
            used = z[group.index]
            seeds = group.loc[used, "seed"].nunique()
            label = f"M {value}" if key == "n_cycles" else f"ramp {value}"
            rows.append([label, f"{int(used.sum())}/{len(group)}",
                         f"{seeds}/{group['seed'].nunique()}"])
    return _md(["trials", f"use z (KL ≥ {threshold:g})", "seeds with any"], rows)


def headline_block(name: str, a: Analysis) -> str:
    return f"{name}: {a.summary[0]} Verdict: `{a.verdict}`.\n"


def rates_block(path: Path, threshold: float = 0.1) -> str:
    """Per T and arm: seeds whose trial used z, with the Clopper–Pearson 95% interval."""
    from statsmodels.stats.proportion import proportion_confint

    seeds = pd.read_csv(path)
    rows = []
    for (steps, m), group in seeds.groupby(["total_steps", "n_cycles"], sort=True):
        k, n = int((group["kl"] >= threshold).sum()), len(group)
        lo, hi = proportion_confint(k, n, method="beta")
        arm = "monotonic (M 1)" if m == 1 else f"cyclical (M {m})"
        rows.append([f"{steps:,}", arm, f"{k}/{n}", f"[{lo:.2f}, {hi:.2f}]",
                     f"{group['seed'].min()}–{group['seed'].max()}",
                     f"{group['wall_s'].mean():.0f}"])
    return _md(["T", "arm (R 0.5, linear)", "seeds using z", "exact 95% CI", "seeds",
                "wall s / trial (mean, shared machine)"], rows)


def seedsets_block(path: Path) -> str:
    seeds = pd.read_csv(path)
    complete_t = [t for t, g in seeds.groupby("total_steps") if g["n_cycles"].nunique() == 2]
    seeds = seeds[seeds["total_steps"].isin(complete_t)]
    complete = sorted(s for s, g in seeds.groupby(["total_steps", "seed"])
                      if g["n_cycles"].nunique() == 2)
    rows = []
    for i in range(len(complete) // SET_SIZE):
        chosen_keys = complete[i * SET_SIZE:(i + 1) * SET_SIZE]
        steps = {t for t, _ in chosen_keys}
        if len(steps) != 1:
            continue
        chosen = [s for _, s in chosen_keys]
        subset = seeds[(seeds["total_steps"] == next(iter(steps)))
                       & seeds["seed"].isin(chosen)]
        a = analyse_trials(subset, objective=OBJECTIVE)
        rows.append([f"{next(iter(steps)):,}", f"{chosen[0]}–{chosen[-1]}",
                     "{}/{}".format(*a.uses_z["cyclical"]),
                     "{}/{}".format(*a.uses_z["monotonic"]), _p(a.primary["p"]),
                     f"`{a.verdict}`", f"{subset['wall_s'].sum():.0f}"])
    return _md(["T", "seeds", "cyclical uses z", "monotonic uses z", "sign-flip p", "verdict",
                "trial wall s (sum, 2 at a time, shared machine)"], rows)


def blocks(root: Path = ROOT) -> dict[str, Callable[[], str]]:
    """Every block this command can write, by NAME (computed lazily)."""
    tables = study_tables(root)
    cache: dict[str, Analysis] = {}

    def analysis_of(name: str) -> Analysis:
        if name not in cache:
            cache[name] = _analysis(tables[name])  # type: ignore[arg-type]
        return cache[name]

    def studies() -> str:
        return studies_block(tables, {n: analysis_of(n) for n, p in tables.items() if p})

    out: dict[str, Callable[[], str]] = {"studies": studies}
    for name, path in tables.items():
        if path is None:
            continue
        out[f"{name}-tests"] = lambda n=name: tests_block(analysis_of(n))
        out[f"{name}-uses_z"] = lambda p=path: uses_z_block(p)
        out[f"{name}-headline"] = lambda n=name: headline_block(n, analysis_of(n))
    # docs/quickstart/seeds.csv: the quickstart's arms on many seeds (bench/quickstart.py);
    # seeds_<tag>.csv: an earlier setting of it, kept as blocks quickstart_<tag>-…
    for seedsets in sorted((root / "docs" / "quickstart").glob("seeds*.csv")):
        name = "quickstart" + seedsets.stem[len("seeds"):]
        out[f"{name}-seedsets"] = lambda p=seedsets: seedsets_block(p)
        out[f"{name}-rates"] = lambda p=seedsets: rates_block(p)
    return out


def fill(text: str, available: dict[str, Callable[[], str]], *, where: str = "") -> str:
    """``text`` with every evidence block regenerated.

    Raises:
        ReportError: a block names no known table.
    """
    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in available:
            raise ReportError(f"{where}: evidence block {name!r} is unknown; known: "
                              f"{', '.join(sorted(available))}")
        return match.group(1) + available[name]() + match.group(4)

    return _BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, default=[ROOT / "docs" / "evidence.md"])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when a block differs from the data")
    args = parser.parse_args(argv)
    available = blocks()
    stale = []
    try:
        for path in args.files:
            text = path.read_text()
            new = fill(text, available, where=str(path))
            if new != text:
                stale.append(str(path))
                if not args.check:
                    path.write_text(new)
    except (ReportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    verb = "differ from the committed data" if args.check else "rewritten"
    for path in stale:
        print(f"{path}: evidence blocks {verb}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
