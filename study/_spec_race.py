"""The race options of ``search`` (``{kind: race, min_seeds: 3, max_seeds: 12, alpha: 0.05}``,
``study._race``): their validation, kept out of ``study._spec`` so that the spec's one hook is
small. The race runs the first ``max_seeds`` seeds of ``seeds``, in their order."""

from __future__ import annotations

from typing import Any

RACE_FIELDS = ("min_seeds", "max_seeds", "seeds_per_round", "alpha", "drop_alpha")
RACE_DEFAULTS: dict[str, Any] = {"min_seeds": 3, "max_seeds": 12, "seeds_per_round": 1,
                                 "alpha": 0.05}


def race_problem(search: Any) -> tuple[str, str, Any] | None:
    """(field, message, value) of the first problem with the race options, or None.

    Outside a race the options must be absent; in one, 2 <= min_seeds <= max_seeds,
    seeds_per_round >= 1, 0 < alpha < 0.5 and 0 < drop_alpha <= alpha (range checks of single
    fields come first, from the field types)."""
    given = {f: getattr(search, f) for f in RACE_FIELDS if getattr(search, f) is not None}
    if search.kind != "race":
        for name, value in given.items():
            return name, "only used when search.kind is 'race'", value
        return None
    s = {**RACE_DEFAULTS, **given}
    if s["min_seeds"] < 2:
        return "min_seeds", "must be >= 2 (a paired test needs two seeds)", s["min_seeds"]
    if s["max_seeds"] < s["min_seeds"]:
        return "max_seeds", f"must be >= search.min_seeds ({s['min_seeds']})", s["max_seeds"]
    if not 0 < s["alpha"] < 0.5:
        return "alpha", "must be in (0, 0.5)", s["alpha"]
    if s.get("drop_alpha") is not None and not 0 < s["drop_alpha"] <= s["alpha"]:
        return "drop_alpha", f"must be in (0, search.alpha ({s['alpha']:g})]", s["drop_alpha"]
    return None


def race_seed_problem(search: Any, seeds: tuple[int, ...]) -> tuple[str, Any] | None:
    """(message, value) when ``seeds`` cannot feed the race's max_seeds."""
    if search.kind != "race":
        return None
    n = search.max_seeds or RACE_DEFAULTS["max_seeds"]
    if len(seeds) < n:
        return (f"a race with search.max_seeds {n} needs at least {n} seeds "
                f"(list them: seeds: [0, 1, …, {n - 1}])", list(seeds))
    return None


def race_options(search: Any) -> dict[str, Any]:
    """The resolved options (defaults filled; drop_alpha defaults to alpha)."""
    s = {**RACE_DEFAULTS, **{f: getattr(search, f) for f in RACE_FIELDS
                             if getattr(search, f) is not None}}
    s.setdefault("drop_alpha", s["alpha"])
    return s
