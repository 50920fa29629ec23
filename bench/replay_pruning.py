"""What would a pruner have done to a study that ran every trial to the end?

A trial is deterministic given its seed, so a pruned trial's curve is exactly the prefix of its
full curve: the completed trials of a study run with ``pruning: {pruner: none}`` are replayed,
2 at a time in the driver's run order, through klstudy's real decision code
(``bench/pruning.py``'s ``Policy``: ``study._pruning.OptunaPruningScheduler`` and the policy the
driver builds from the spec, Optuna storage in memory). Printed: the trials pruned per family
(M = 1, M > 1), by seed, M and R, with the step and each one's *final* objective had it run on;
how many of the best tenth of the trials (by final objective) were pruned; the steps used.

    python bench/replay_pruning.py STUDY_DIR [--pruner median] [--option n_startup_trials=5]
        [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from _common import command_line, environment_line, markdown_table, write_output
from pruning import Policy, replay


def _curves(study_dir: Path, metrics: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The validation curve of every completed trial, one point per evaluation step."""
    trials = pd.read_parquet(study_dir / "trials.parquet")
    done = set(trials.loc[trials["status"] == "completed", "trial_id"])
    ev = pd.read_parquet(study_dir / "evaluations")
    ev = ev[(ev["split"] == "valid") & ev["trial_id"].isin(done)]
    curves = {}
    for tid, g in ev.groupby("trial_id"):
        g = g.sort_values("step").drop_duplicates("step", keep="last")
        curves[tid] = [{"step": int(r["step"]), "at_beta_max": bool(r["at_beta_max"]),
                        "final": bool(r["final"]),
                        **{f"valid/{m}": float(r[m]) for m in metrics if m in g.columns}}
                       for _, r in g.iterrows()]
    return curves


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option: expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def _shares(configs: list[Any], pruned: list[Any], key: Any) -> str:
    """``0: 3/10, 1: 5/10``: pruned of replayed trials per value of ``key``."""
    values = sorted({key(c) for c in configs})
    return ", ".join(f"{v:g}: {sum(key(c) == v for c in pruned)}/"
                     f"{sum(key(c) == v for c in configs)}" for v in values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study_dir", type=Path)
    p.add_argument("--pruner", default="median")
    p.add_argument("--option", type=_option, action="append", default=[],
                   help="another pruning option, e.g. n_startup_trials=5 (repeatable)")
    p.add_argument("--out", help="also write the markdown report to this file")
    args = p.parse_args(argv)
    from study._spec import parse_spec

    spec_dict = yaml.safe_load((args.study_dir / "spec.yaml").read_text())
    spec_dict.pop("tracking", None)
    spec_dict["pruning"] = {**(spec_dict.get("pruning") or {}), "pruner": args.pruner,
                            **dict(args.option)}
    spec = parse_spec(spec_dict)
    metric = spec.objective.metric
    curves = _curves(args.study_dir, sorted({metric, "nll_elbo", "elbo", "rec", "kl"}))
    configs = [c for c in spec.grid_configs() if c.trial_id in curves]
    if not configs:
        print(f"error: {args.study_dir}: no completed trial to replay", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        steps = replay(Policy(spec, Path(tmp)), configs, curves, 2)
    pruned = [c for c in configs if steps[c.trial_id] < c.total_steps]
    finals = {c.trial_id: curves[c.trial_id][-1][f"valid/{metric}"] for c in configs}
    kept = [finals[c.trial_id] for c in configs if c not in pruned]
    rows = [[c.trial_id, steps[c.trial_id], f"{finals[c.trial_id]:.3f}"] for c in pruned]
    fam = {f: [c for c in configs if (c.n_cycles > 1) == f] for f in (False, True)}
    ranked = sorted(configs, key=lambda c: finals[c.trial_id],
                    reverse=spec.objective.mode == "max")
    top = ranked[:max(1, len(ranked) // 10)]  # the best tenth by the final objective
    lost = [c for c in top if c in pruned]
    text = "\n".join([
        f"# Pruning replay: {spec.name}, pruner {args.pruner} {dict(args.option) or ''}", "",
        f"Command: `{command_line()}`  ",
        f"Machine: {environment_line()}", "",
        f"{len(configs)} completed trials replayed; pruned {len(pruned)}: M=1 "
        f"{sum(c in pruned for c in fam[False])}/{len(fam[False])}, M>1 "
        f"{sum(c in pruned for c in fam[True])}/{len(fam[True])}; steps used "
        f"{sum(steps.values()) / sum(c.total_steps for c in configs):.2f}. Final valid "
        f"{metric} ({spec.objective.mode}) of the kept trials: median "
        f"{statistics.median(kept):.3f}" if kept else "none kept", "",
        f"Pruned by seed: {_shares(configs, pruned, lambda c: c.seed)}; by M: "
        f"{_shares(configs, pruned, lambda c: c.n_cycles)}; by R: "
        f"{_shares(configs, pruned, lambda c: c.ratio)}.  ",
        f"Of the best tenth of the trials by their final {metric} ({len(top)}), pruned: "
        f"{len(lost)}" + (f" ({', '.join(c.trial_id for c in lost)})" if lost else "") + ".",
        "",
        markdown_table(["pruned trial", "at step", f"final {metric} had it run on"], rows)
        if rows else "Nothing pruned.",
    ])
    print(text)
    write_output(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
