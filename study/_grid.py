"""The order in which a grid's trials run: interleaved, so that no family goes first.

Tune starts grid trials in list order, and Optuna's median/percentile pruners judge a trial
against the trials *completed* so far. Run in spec order (M outermost), the first completed
trials — the pruner's startup trials and its reference — would all be M = 1 (monotonic), and
every cyclical trial would then be judged against monotonic ones only. The run order here:

- seeds outermost: every configuration of seed s runs before any of seed s + 1, so the first
  pass over the grid is complete and balanced;
- within a seed, a Latin-square walk over M × (R, other axes): round j takes, for each M in
  turn, the point ``o = (i_M + j) mod n_O`` of the other axes, R fastest. Each round visits
  every M once, consecutive trials differ in M (and, within a round, in R), and after ``n_O``
  rounds every point has been visited once.
"""

from __future__ import annotations

import itertools
from typing import Any


def interleaved_points(space: dict[str, list[Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """Every grid point × seed once, in run order (see the module docstring).

    Args:
        space: the axes in spec order; ``n_cycles`` and ``ratio`` must be among them.
        seeds: the seeds, each a replicate of the whole grid.

    Returns:
        One ``{axis: value, ..., "seed": s}`` per trial.
    """
    names = list(space)
    ms = space["n_cycles"]
    others = [n for n in names if n != "n_cycles"]
    # R fastest, then the other axes in spec order: product() varies its last factor fastest.
    slow_first = [n for n in others if n != "ratio"] + ["ratio"]
    other_points = list(itertools.product(*(space[n] for n in slow_first)))
    n_o = len(other_points)
    order: list[dict[str, Any]] = []
    for seed in seeds:
        for j in range(n_o):
            for i_m, m in enumerate(ms):
                values = dict(zip(slow_first, other_points[(i_m + j) % n_o], strict=True))
                order.append({**{n: (m if n == "n_cycles" else values[n]) for n in names},
                              "seed": seed})
    return order
