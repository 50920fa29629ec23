"""pydantic's ``ValidationError`` → SpecErrors that name the key and the value.

Every problem of a spec is reported at once (``SpecError.problems``: one per key, unknown keys
first, as they often explain the others); ``str()`` of the error raised is the first problem.
An unknown key close to a known one gets a "did you mean" hint.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from study._spec_yaml import _NO_VALUE, SpecError

_MESSAGES = {
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "tuple_type": "must be a list",
    "too_short": "must not be empty",
    "invalid_key": "keys must be strings",
}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _dotted(loc: tuple[int | str, ...], at: str = "") -> str:
    """``("schedule", "ratio", 1)`` → ``schedule.ratio[1]``, then ``at`` (``[2]``, ``path``)."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    if at:
        path += at if at.startswith("[") or not path else f".{at}"
    return "spec" + path if not path or path.startswith("[") else path


def _suggestion(loc: tuple[int | str, ...], root: type[BaseModel]) -> str:
    """`` (did you mean 'total_steps'?)`` for an unknown key close to a known one."""
    section: type[BaseModel] = root
    for part in loc[:-1]:
        annotation = section.model_fields[part].annotation if isinstance(part, str) else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        section = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def spec_error(exc: ValidationError, root: type[BaseModel]) -> SpecError:
    """The first problem as a SpecError whose ``problems`` lists every problem (one per key:
    an error pydantic reports for several branches of a union counts once), unknown keys
    first."""
    errors = exc.errors()
    first_kinds = ("extra_forbidden", "invalid_key")
    ordered = ([e for e in errors if e["type"] in first_kinds]
               + [e for e in errors if e["type"] not in first_kinds])
    problems: list[SpecError] = []
    for err in ordered:
        problem = _one(err, root)
        if all(p.path != problem.path for p in problems):
            problems.append(problem)
    # a union reports its branches: a key's own problems (`ratio[0]`) beat the whole list's
    problems = [p for p in problems if p is problems[0] or not any(
        q.path.startswith((p.path + "[", p.path + ".")) for q in problems)]
    head = problems[0]
    head.problems = problems  # type: ignore[attr-defined]
    return head


def problems_of(exc: SpecError) -> list[SpecError]:
    """Every problem an error stands for (a SpecError not made here: itself)."""
    return list(getattr(exc, "problems", None) or [exc])


def _one(err: Any, root: type[BaseModel]) -> SpecError:
    kind, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx") or {}
    if kind == "klstudy":
        return SpecError(_dotted(loc, ctx["at"]), ctx["message"], ctx.get("value", _NO_VALUE))
    if kind == "missing":
        return SpecError(_dotted(loc), "required")
    if kind == "extra_forbidden":
        return SpecError(_dotted(loc), "unknown key" + _suggestion(loc, root))
    value = list(err["input"]) if isinstance(err["input"], tuple) else err["input"]
    return SpecError(_dotted(loc), _message(err), value)


def _message(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "literal_error":
        return "must be one of " + ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
    bound = next((op for op in _BOUNDS if op in ctx), None)
    if bound is not None:
        return f"must be {_BOUNDS[bound]} {ctx[bound]:g}"
    return _MESSAGES.get(kind, err["msg"][:1].lower() + err["msg"][1:])
