"""The grid's run order (study._grid): a permutation, balanced, no family first."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from study._grid import interleaved_points

AXIS = st.lists(st.integers(0, 50), min_size=1, max_size=5, unique=True)


def space_of(ms: list[int], rs: list[int], ramps: int) -> dict[str, list]:
    return {"n_cycles": [m + 1 for m in ms], "ratio": [r / 50 for r in rs],
            "ramp": ["linear", "sigmoid", "cosine"][:ramps], "beta_max": [1.0]}


@given(AXIS, AXIS, st.integers(1, 3), st.lists(st.integers(0, 9), min_size=1, max_size=3,
                                              unique=True))
def test_every_grid_point_and_seed_runs_exactly_once(ms, rs, ramps, seeds) -> None:
    space = space_of(ms, rs, ramps)
    points = interleaved_points(space, seeds)
    got = Counter(tuple(p[k] for k in (*space, "seed")) for p in points)
    want = Counter(itertools.product(*space.values(), seeds))
    assert got == want


@given(AXIS, AXIS, st.integers(1, 3), st.lists(st.integers(0, 9), min_size=1, max_size=3,
                                              unique=True))
def test_seeds_are_outermost_and_each_round_visits_every_m(ms, rs, ramps, seeds) -> None:
    space = space_of(ms, rs, ramps)
    points = interleaved_points(space, seeds)
    per_seed = len(points) // len(seeds)
    assert [p["seed"] for p in points] == [s for s in seeds for _ in range(per_seed)]
    n_m = len(space["n_cycles"])
    for start in range(0, len(points), n_m):
        assert [p["n_cycles"] for p in points[start:start + n_m]] == space["n_cycles"]


@given(AXIS, AXIS)
def test_consecutive_trials_differ_in_m_and_within_a_round_in_r(ms, rs) -> None:
    space = space_of(ms, rs, 1)
    points = interleaved_points(space, [0])
    n_m = len(ms)
    for i, (a, b) in enumerate(itertools.pairwise(points)):
        if n_m > 1:
            assert a["n_cycles"] != b["n_cycles"]
        if len(rs) > 1 and (i + 1) % n_m:  # a and b in the same round
            assert a["ratio"] != b["ratio"]


def test_the_first_trials_span_m_and_r() -> None:
    """The median pruner's startup trials are the first to complete: they must not all be M=1."""
    space = {"n_cycles": [1, 2, 4, 8], "ratio": [0.25, 0.5, 0.75, 1.0], "ramp": ["linear"],
             "beta_max": [1.0]}
    first = interleaved_points(space, [0, 1, 2])[:4]
    assert {p["n_cycles"] for p in first} == {1, 2, 4, 8}
    assert {p["ratio"] for p in first} == {0.25, 0.5, 0.75, 1.0}
