"""The verdict in words: the raw fact first, then what the seeds can and cannot show, the
gated secondary family, the best set and the trial counts."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

_NAMES = {"elbo": "ELBO", "rec": "Rec", "kl": "KL", "mi": "MI", "au": "AU", "ppl": "PPL",
          "iw_nll": "IW-NLL"}


def _p(p: float) -> str:
    return "—" if not math.isfinite(p) else f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def _signed(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def _one_per_seed(table: pd.DataFrame) -> bool:
    """Each arm has one configuration (R > 0), so its trials are its seeds."""
    done = ((table["status"] == "completed") & (table["ratio"] > 0)).to_numpy()
    arm = table["n_cycles"].to_numpy()[done] > 1
    key = table["seed"].to_numpy()[done] * 2 + arm
    return bool(done.any()) and len(np.unique(key)) == len(key)


def fact_line(uses_z: dict[str, list[int]], primary: dict[str, Any], settings: dict[str, Any],
              families: dict[str, Any], table: pd.DataFrame) -> str:
    (kc, nc), (km, nm) = uses_z["cyclical"], uses_z["monotonic"]
    rule = f"final validation KL ≥ {settings['kl_threshold']:g} nats"
    if _one_per_seed(table):
        fact = (f"Cyclical (M > 1) used z in {kc} of {nc} seeds, monotonic (M = 1) in {km} of "
                f"{nm} ({rule})")
    else:
        per_seed = "; ".join(
            f"{name} in {f['seeds_with_z']} of {f['n_seeds']} seeds at least once"
            for name, f in families.items())
        extra = f"; {per_seed}" if per_seed else ""
        fact = (f"Cyclical (M > 1) used z in {kc} of {nc} trials, monotonic (M = 1) in {km} of "
                f"{nm} ({rule}{extra})")
    n, need, alpha = primary["n_seeds"], primary["min_seeds_to_reject"], primary["alpha"]
    if n == 0:
        return (fact + ": no seed has completed trials at both M = 1 and M > 1 with the same "
                "R, ramp and β_max, so the seeds cannot show a difference.")
    if n < need:
        smallest = 2.0 / 2 ** n
        return (fact + f". {n} seed{'s' if n > 1 else ''} cannot reach p ≤ {alpha:g} with the "
                f"exact sign-flip test (its smallest p is 2/2^{n} = {smallest:.3g}): run at "
                f"least {need} seeds for a verdict.")
    return (fact + f". {n} seeds can show a difference at p ≤ {alpha:g} only when nearly "
            f"every seed agrees (exact sign-flip test, smallest p = {2.0 / 2 ** n:.2g}).")


def verdict_line(verdict: str, primary: dict[str, Any]) -> str:
    n = primary["n_seeds"]
    if n == 0:
        return f"Verdict: {verdict} (nothing to test)."
    ci = ""
    if math.isfinite(primary.get("ci_low", math.nan)):
        ci = (f", 95% bootstrap interval over seeds [{_signed(primary['ci_low'])}, "
              f"{_signed(primary['ci_high'])}]")
    return (f"Verdict: {verdict} — per-seed share of trials using z, cyclical − monotonic "
            f"(matched on R, ramp, β_max, lr schedule): mean {_signed(primary['estimate'])}"
            f"{ci}; exact two-sided sign-flip test over {n} seeds, p = {_p(primary['p'])} "
            f"(α {primary['alpha']:g}).")


def secondary_line(tests: list[dict[str, Any]], primary_rejected: bool, margin: float,
                   default_margin: bool) -> str:
    family = [t for t in tests if t["family"] == "secondary"]
    how = " (default: 2% of monotonic |ELBO|)" if default_margin else ""
    if not family:
        return "Secondary questions: nothing to test (no matched cyclical/monotonic seeds)."
    parts = []
    for t in family:
        est = t.get("estimate", t["statistic"])
        parts.append(f"{t['name']}: {_signed(float(est), 3)}, p {_p(t['p_raw'])} → "
                     f"adjusted {_p(t['p_adj'])}{' ✓' if t['rejected'] else ''}")
    head = (f"Secondary family ({len(family)} tests; ELBO margin ±{margin:.3g} nats{how}; Holm, "
            "gated by the primary)")
    if not primary_rejected:
        head += (": not claimed, because the primary test did not reject — raw p-values "
                 "for planning only")
    return head + ": " + "; ".join(parts) + "."


def best_line(best_set: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    if not best_set:
        name = _NAMES.get(settings["objective"], settings["objective"])
        return f"Best set by validation {name}: no completed trial with a value."
    if settings["n_configurations"] == 0:
        return "Best set: no configuration."
    n_configs = settings["n_configurations"]
    name = _NAMES.get(settings["objective"], settings["objective"])
    best = next(b for b in best_set if b["best"])
    label = (f"M={best['n_cycles']} R={best['ratio']:g} {best['ramp']} "
             f"β_max={best['beta_max']:g}")
    untested = sum(b["untested"] for b in best_set)
    extra = f", {untested} of them untested (fewer than 2 paired seeds)" if untested else ""
    return (f"Best set by validation {name} ({settings['objective_mode']}): "
            f"{len(best_set)} of {n_configs} configurations cannot be told from the best "
            f"({label}) by a sign-flip max-T comparison with the best over seeds at "
            f"familywise α {settings['alpha']:g}{extra}.")


def counts_line(table: pd.DataFrame) -> str:
    values, counts = np.unique(table["status"].to_numpy(dtype=str), return_counts=True)
    status = dict(zip(values, counts, strict=True))
    return (f"{len(table)} trials: {int(status.get('completed', 0))} completed, "
            f"{int(status.get('pruned', 0))} pruned, {int(status.get('error', 0))} failed; "
            "only completed trials enter the numbers, R = 0 (constant β) stays out of the "
            "cyclical-vs-monotonic question.")


def summary_text(*, verdict: str, uses_z: dict[str, list[int]], primary: dict[str, Any],
                 tests: list[dict[str, Any]], best_set: list[dict[str, Any]],
                 settings: dict[str, Any], families: dict[str, Any],
                 table: pd.DataFrame) -> list[str]:
    rejected = bool(tests and tests[0]["rejected"])
    return [fact_line(uses_z, primary, settings, families, table),
            verdict_line(verdict, primary),
            secondary_line(tests, rejected, settings["elbo_margin"],
                           settings["elbo_margin_default"]),
            best_line(best_set, settings), counts_line(table)]
