"""The report's plain-language summary: the best configuration by the study objective, whether
anything differs beyond seed noise, and cyclical vs monotonic on Rec, KL and ELBO side by side
(the paper's claim is "similar ELBO, lower Rec, higher KL").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis._noise import (
    ALPHA,
    BEST,
    DIFFERS,
    METRIC_NAMES,
    TIED,
    UNTESTED,
    Objective,
    versus_best,
)
from analysis._stats import (
    CONFIG_KEYS,
    DEFAULT_LR_SCHEDULE,
    config_table,
    lr_schedules,
    paired_vs_constant_lr,
    paired_vs_monotonic,
    paired_vs_monotonic_pooled,
    with_lr_schedule,
)

REPORT_METRICS: tuple[str, ...] = ("elbo", "rec", "kl", "mi", "au")
CLAIM_METRICS: tuple[str, ...] = ("rec", "kl", "elbo")  # the paper's claim is about these


def with_objective(metrics: Sequence[str], objective: Objective) -> tuple[str, ...]:
    """``metrics`` plus the objective's metric when it is not among them."""
    return tuple(metrics) + (() if objective.metric in metrics else (objective.metric,))


def _decimals(half: float) -> int:
    """Decimals that show two significant digits of the CI (2 when there is none)."""
    if not math.isfinite(half) or half <= 0:
        return 2
    return int(min(6, max(0, 1 - math.floor(math.log10(half)))))


def pm(mean: float, half: float, *, signed: bool = False) -> str:
    """``−2.41 ± 0.05``: the mean to two significant digits of its CI half-width."""
    d = _decimals(half)
    text = f"{mean:+.{d}f}" if signed else f"{mean:.{d}f}"
    if math.isfinite(half):
        text += f" ± {half:.{d}f}"
    return text.replace("-", "−")


def config_text(row: pd.Series | dict) -> str:
    lr = row.get("lr_schedule", "constant")
    lr_text = f", lr {lr}" if isinstance(lr, str) and lr != "constant" else ""
    return (f"M={row['n_cycles']}, R={row['ratio']:g} ({row['ramp']}, "
            f"β_max={row['beta_max']:g}{lr_text})")


def _seeds(n: int) -> str:
    return f"over {n} seeds" if n > 1 else "1 seed: too few seeds for a CI"


def best_line(table: pd.DataFrame, objective: Objective) -> str:
    """The best configuration by the objective (finite means only), or that none stands out."""
    m = objective.metric
    scored = table[np.isfinite(table[f"{m}_mean"].astype(float)) & (table[f"{m}_n"] > 0)]
    if scored.empty:
        return f"No completed trial with a finite {objective.label} yet: no best configuration."
    verdict = versus_best(scored, m, objective.mode)["verdict"]
    best = scored.loc[verdict[verdict == BEST].index[0]]
    n, value = int(best[f"{m}_n"]), pm(best[f"{m}_mean"], best[f"{m}_ci"])
    extreme = "highest" if objective.mode == "max" else "lowest"
    where = f"{config_text(best)}: {value} ({_seeds(n)})"
    if (scored[f"{m}_n"] < 2).all():
        return (f"Only one seed per configuration, so seed noise cannot be judged: the "
                f"{extreme} {objective.label} is {where}.")
    counts = verdict.value_counts()
    tied, differs, untested = (int(counts.get(k, 0)) for k in (TIED, DIFFERS, UNTESTED))
    skipped = f"; {untested} with a single seed not tested" if untested else ""
    if tied and not differs:
        return (f"No configuration differs beyond seed noise in {objective.label}: all "
                f"{tied + 1} tested configurations are within seed noise (Welch t-test over "
                f"seeds, p ≥ {ALPHA:g}) of the {extreme} mean, {where}{skipped}.")
    if len(scored) == 1:
        return f"Best configuration for {objective.label}: {where} (the only one with a value)."
    others = "other is" if tied == 1 else "others are"
    return (f"Best configuration by the objective, {objective.label}: {where}; {tied} {others} "
            f"within seed noise of it (Welch t-test over seeds, p ≥ {ALPHA:g}), {differs} "
            f"differ{'s' if differs == 1 else ''}{skipped}.")


def _direction(row: pd.Series) -> str:
    low, high = row["ci_low"], row["ci_high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return "untested"
    return "lower" if high < 0 else "higher" if low > 0 else "no clear difference"


def _claim_line(same: pd.DataFrame) -> str | None:
    """Rec lower, KL higher, ELBO similar? Each judged by its paired 95% CI."""
    by_metric = {r["metric"]: r for _, r in same.iterrows()}
    if not all(k in by_metric for k in CLAIM_METRICS):
        return None
    rec, kl, elbo = (_direction(by_metric[k]) for k in CLAIM_METRICS)
    elbo_word = "similar (CI includes 0)" if elbo == "no clear difference" else elbo
    holds = rec == "lower" and kl == "higher" and elbo != "lower"
    verdict = "holds here" if holds else "is not shown here"
    return (f"The paper's claim (similar ELBO, lower Rec, higher KL) {verdict}: cyclical has "
            f"Rec {rec}, KL {kl}, ELBO {elbo_word} (95% CIs of the paired differences).")


def _top_cyclical(table: pd.DataFrame, paired: pd.DataFrame, objective: Objective) -> pd.Series:
    """The cyclical configuration best by the objective, preferring those with ≥ 2 pairs."""
    m = objective.metric
    rows = paired[paired["metric"] == m].merge(table, on=list(CONFIG_KEYS))
    sign = 1.0 if objective.mode == "max" else -1.0
    score = (sign * rows[f"{m}_mean"].astype(float)).fillna(-np.inf)
    rows = rows.assign(_testable=rows["n_pairs"] >= 2, _score=score)
    return rows.sort_values(["_testable", "_score"], ascending=False, kind="stable").iloc[0]


def comparison_lines(table: pd.DataFrame, paired: pd.DataFrame,
                     objective: Objective) -> list[str]:
    """Cyclical vs monotonic at the cyclical configuration best by the objective: Rec, KL and
    ELBO differences (and the objective's) with CIs and paired-t p, then the claim's verdict."""
    if paired.empty:
        return ["No cyclical-vs-monotonic comparison: the study needs completed trials at M=1 "
                "and M>1 with the same R, ramp and β_max."]
    top = _top_cyclical(table, paired, objective)
    same = paired[(paired[list(CONFIG_KEYS)] == top[list(CONFIG_KEYS)]).all(axis=1)]
    lr = top.get("lr_schedule", "constant")
    lr_text = f", lr {lr}" if isinstance(lr, str) and lr != "constant" else ""
    head = (f"Cyclical vs monotonic (M={top['n_cycles']} vs M=1, R={top['ratio']:g}, "
            f"{top['ramp']}, β_max={top['beta_max']:g}{lr_text}; the best cyclical "
            f"configuration by {objective.label})")
    n = int(top["n_pairs"])
    if n < 2:
        return [f"{head}: too few seeds for a claim (n={n})"]
    order = {k: i for i, k in enumerate(with_objective(CLAIM_METRICS, objective))}
    same = same.assign(_order=same["metric"].map(order)).sort_values("_order")
    parts = []
    for _, r in same.iterrows():
        p = r["p_value"]
        p_text = f" (p={p:.2g})" if math.isfinite(p) else ""
        parts.append(f"{METRIC_NAMES.get(r['metric'], r['metric'])} "
                     f"{pm(r['mean_diff'], r['ci'], signed=True)}{p_text}")
    lines = [f"{head}: {', '.join(parts)}, cyclical − monotonic, paired over {n} seeds"]
    claim = _claim_line(same)
    return lines + ([claim] if claim else [])


def _diff_parts(rows: pd.DataFrame) -> str:
    by_metric = {r["metric"]: r for _, r in rows.iterrows()}
    parts = []
    for metric in CLAIM_METRICS:
        r = by_metric.get(metric)
        if r is None or int(r["n_pairs"]) < 2:
            continue
        p = r["p_value"]
        p_text = f" (p={p:.2g})" if math.isfinite(p) else ""
        parts.append(f"{METRIC_NAMES.get(metric, metric)} "
                     f"{pm(r['mean_diff'], r['ci'], signed=True)}{p_text}")
    return ", ".join(parts) if parts else "too few seeds"


def _at(paired: pd.DataFrame, **where: object) -> pd.DataFrame:
    mask = np.ones(len(paired), dtype=bool)
    for key, value in where.items():
        mask &= (paired[key] == value).to_numpy()
    return paired[mask]


def _directions(rows: pd.DataFrame) -> str:
    by_metric = {r["metric"]: r for _, r in rows.iterrows() if int(r["n_pairs"]) >= 2}
    return ", ".join(f"{METRIC_NAMES.get(m, m)} {_direction(by_metric[m])}"
                     for m in CLAIM_METRICS if m in by_metric) or "too few seeds"


def lr_schedule_lines(finals: pd.DataFrame) -> list[str]:
    """The paper's Table 4 question, when the study varies the learning-rate schedule: at the
    R, ramp and β_max of the best-tested cyclical configuration, the effect of cyclical β alone
    (constant η), of each non-constant η alone (M = 1) and of η with cyclical β, paired by
    seed. Empty when the study has one learning-rate schedule."""
    schedules = sorted(set(lr_schedules(finals)) - {DEFAULT_LR_SCHEDULE})
    if not schedules or DEFAULT_LR_SCHEDULE not in set(lr_schedules(finals)):
        return []
    by_lr = paired_vs_constant_lr(finals, metrics=CLAIM_METRICS)
    by_beta = _at(paired_vs_monotonic(finals, metrics=CLAIM_METRICS),
                  lr_schedule=DEFAULT_LR_SCHEDULE)
    testable = by_beta[by_beta["n_pairs"] >= 2]
    if testable.empty:
        return ["Learning-rate schedule (paper Table 4): too few paired seeds for a comparison."]
    kl = testable[testable["metric"] == "kl"].sort_values("mean_diff", ascending=False)
    top = (kl if not kl.empty else testable).iloc[0]
    where = {"ratio": top["ratio"], "ramp": top["ramp"], "beta_max": top["beta_max"]}
    setting = f"R={top['ratio']:g}, {top['ramp']}, β_max={top['beta_max']:g}"
    beta_alone = _at(by_beta, n_cycles=top["n_cycles"], **where)
    lines = [f"Learning-rate schedule (paper Table 4; {setting}, paired by seed): cyclical β "
             f"alone (M={top['n_cycles']} vs M=1, constant η): {_diff_parts(beta_alone)}"]
    verdicts = [f"cyclical β alone: {_directions(beta_alone)}"]
    for lr in schedules:
        eta_alone = _at(by_lr, n_cycles=1, lr_schedule=lr, **where)
        with_beta = _at(by_lr, n_cycles=top["n_cycles"], lr_schedule=lr, **where)
        lines.append(f"{lr} η − constant η, with monotonic β (M=1): {_diff_parts(eta_alone)}; "
                     f"with cyclical β (M={top['n_cycles']}): {_diff_parts(with_beta)}")
        verdicts.append(f"{lr} η alone: {_directions(eta_alone)}")
    lines.append("Which schedule moves Rec, KL and ELBO (95% CIs of the paired differences): "
                 + "; ".join(verdicts) + ".")
    return lines


# The config axes pooled over besides M and R: (plural, singular) names.
_POOLED_NAMES: dict[str, tuple[str, str]] = {"ramp": ("ramps", "ramp"),
                                             "beta_max": ("β_max", "β_max"),
                                             "lr_schedule": ("lr schedules", "lr schedule")}


def pooled_labels(finals: pd.DataFrame) -> tuple[str, str] | None:
    """What :func:`analysis._stats.paired_vs_monotonic_pooled` pools over — the config axes
    besides M and R with more than one value among the β schedules (R > 0) — as ("ramps and
    β_max", "ramp, β_max"); None when there is nothing to pool."""
    scheduled = with_lr_schedule(finals[finals["ratio"] > 0])
    axes = [k for k in _POOLED_NAMES if scheduled[k].nunique() > 1]
    if not axes:
        return None
    return (" and ".join(_POOLED_NAMES[a][0] for a in axes),
            ", ".join(_POOLED_NAMES[a][1] for a in axes))


def _count_text(directions: list[str], good: str, bad: str) -> str:
    return (f"{good} in {directions.count(good)}"
            + (f" ({bad} in {directions.count(bad)})" if directions.count(bad) else ""))


def pooled_lines(finals: pd.DataFrame) -> list[str]:
    """Cyclical vs monotonic at each (M, R), pooled over the other axes when the study has more
    than one ramp, β_max or lr schedule: in how many (M, R) cells Rec is lower, KL higher and
    ELBO lower by the 95% CIs of the pooled paired differences, and at each R the M with the
    largest KL gain. Empty when nothing is pooled."""
    labels = pooled_labels(finals)
    if labels is None:
        return []
    over, same = labels
    pooled = paired_vs_monotonic_pooled(finals, metrics=CLAIM_METRICS)
    testable = pooled[pooled["n_pairs"] >= 2]
    if testable.empty:
        return [f"Cyclical vs monotonic pooled over {over}: too few paired seeds."]
    by_metric = {m: testable[testable["metric"] == m] for m in CLAIM_METRICS}
    directions = {m: [_direction(r) for _, r in rows.iterrows()] for m, rows in by_metric.items()}
    n_cells, pairs = len(by_metric["kl"]), testable["n_pairs"]
    span = f"{pairs.min()}" if pairs.min() == pairs.max() else f"{pairs.min()}–{pairs.max()}"
    lines = [f"Cyclical vs monotonic at each M and R, pooled over {over} ({span} pairs per "
             f"cell, each against the same seed, {same} and R at M=1): of {n_cells} (M, R) "
             f"cells, Rec {_count_text(directions['rec'], 'lower', 'higher')}, KL "
             f"{_count_text(directions['kl'], 'higher', 'lower')}, ELBO "
             f"{_count_text(directions['elbo'], 'lower', 'higher')} "
             "(95% CIs of the paired differences; the others within noise)."]
    kl, rec = by_metric["kl"], by_metric["rec"].set_index(["n_cycles", "ratio"])
    parts = []
    for ratio, rows in kl.groupby("ratio", sort=True):
        top = rows.sort_values("mean_diff", ascending=False).iloc[0]
        r = rec.loc[(top["n_cycles"], ratio)]
        parts.append(f"R={ratio:g}: M={top['n_cycles']} (KL "
                     f"{pm(top['mean_diff'], top['ci'], signed=True)}, Rec "
                     f"{pm(r['mean_diff'], r['ci'], signed=True)})")
    lines.append("The M with the largest pooled KL gain at each R: " + "; ".join(parts) + ".")
    return lines


def counts_line(finals: pd.DataFrame) -> str:
    status = finals["status"].value_counts()
    text = (f"{len(finals)} trials: {status.get('completed', 0)} completed, "
            f"{status.get('pruned', 0)} pruned, {status.get('error', 0)} failed")
    unfinished = int(status.get("running", 0) + status.get("pending", 0))
    return text + (f", {unfinished} still running or pending" if unfinished else "")


def summary_lines(finals: pd.DataFrame, *, objective: Objective | None = None) -> list[str]:
    """A few plain-language lines for the top of the report.

    Args:
        finals: one row per trial (``analysis.final_rows``).
        objective: the study objective (default validation ELBO, max).

    Returns:
        The best configuration by the objective with its CI and seed count — or "no
        configuration differs beyond seed noise" when every tested one is within seed noise of
        the best (Welch t-test, p ≥ 0.05), or that one seed cannot show noise; the comparison
        of the cyclical configuration best by the objective with its monotonic baseline (Rec,
        KL, ELBO and the objective, paired by seed, "too few seeds for a claim" below 2 pairs)
        and whether the paper's claim holds there; with several ramps, β_max or lr schedules,
        the same comparison at each (M, R) pooled over them; when the study varies the
        learning-rate schedule, the paper's Table 4 question (cyclical β alone vs cyclical η
        alone); the trial counts.
    """
    if finals.empty:
        return ["No trials yet."]
    objective = objective or Objective()
    table = config_table(finals, with_objective(REPORT_METRICS, objective))
    paired = paired_vs_monotonic(finals, metrics=with_objective(CLAIM_METRICS, objective))
    return [best_line(table, objective), *comparison_lines(table, paired, objective),
            *pooled_lines(finals), *lr_schedule_lines(finals), counts_line(finals)]
