"""What the spec models say outside their JSON schema, read from their source.

Used by ``docs/gen_spec_reference.py``: the comments written next to each field, the messages the
field and model validators raise (one or two calls deep into the helpers they use, a helper's
parameters bound to the caller's strings), and the ranges that ``AfterValidator`` closures check.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import textwrap
import tokenize
import typing
from typing import Any

from pydantic import BaseModel


# --- comments next to fields --------------------------------------------------------------------
def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name → the comments next to its declaration, from every class of the MRO that
    declares fields (the nearest class wins)."""
    found: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        if not klass.__dict__.get("__annotations__"):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        found.update(_comments_in_class_source(source))
    return found


def _comments_in_class_source(source: str) -> dict[str, str]:
    comments: dict[int, str] = {}  # line → comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if not text.startswith(("noqa", "type:", "fmt:")):
                comments[tok.start[0]] = text
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    tree = ast.parse(source)
    klass = tree.body[0]
    assert isinstance(klass, ast.ClassDef)
    out: dict[str, str] = {}
    for stmt in klass.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        line = stmt.lineno - 1
        while line in comments and line not in code_lines:  # the comment block just above
            above.insert(0, comments[line])
            line -= 1
        same = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                if n in comments]
        text = " ".join(above + same).strip()
        if text:
            out[stmt.target.id] = text
    return out


# --- validation messages from validators' source ------------------------------------------------
def _message_text(node: ast.AST, names: dict[str, ast.AST]) -> str | None:
    """The text of a message expression: a string, an f-string (values → "…"), a name bound to
    one earlier in the function, or such strings joined with ``+``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
                continue
            inner = value.value if isinstance(value, ast.FormattedValue) else None
            known = (_message_text(names[inner.id], {}) if isinstance(inner, ast.Name)
                     and inner.id in names and value.format_spec is None
                     and value.conversion == -1 else None)
            parts.append("…" if known is None else known)
        return re.sub(r"(…)+", "…", "".join(parts))
    if isinstance(node, ast.Name) and node.id in names:
        return _message_text(names[node.id], {})
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _message_text(node.left, names), _message_text(node.right, names)
        if left is not None and right is not None:
            return left + right
    return None


def raised_messages(func: Any, depth: int = 0, seen: set[int] | None = None,
                     bound: dict[str, ast.AST] | None = None) -> list[tuple[str | None, str]]:
    """(at, message) of every error a function raises, following calls into the helpers of
    the same package (two calls deep); a helper's parameters bound to the caller's strings."""
    func = getattr(func, "__func__", func)
    seen = set() if seen is None else seen
    if id(func) in seen or not inspect.isfunction(func):
        return []
    seen.add(id(func))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return []
    names: dict[str, ast.AST] = dict(bound or {})
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
                node.targets[0], ast.Name):
            names[node.targets[0].id] = node.value
    out: list[tuple[str | None, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            message = _message_text(node.exc.args[0], names)
            if message is None:
                continue
            at = next((_message_text(k.value, names) for k in node.exc.keywords
                       if k.arg == "at"), None)
            out.append((at, message))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and depth < 2):
            helper = func.__globals__.get(node.func.id)
            module = getattr(helper, "__module__", "") or ""
            if inspect.isfunction(helper) and module.split(".")[0] == func.__module__.split(
                    ".")[0]:
                params = list(inspect.signature(helper).parameters)
                binding = {p: names.get(a.id, a) if isinstance(a, ast.Name) else a
                           for p, a in zip(params, node.args, strict=False)}
                binding.update({k.arg: k.value for k in node.keywords if k.arg})
                out.extend(raised_messages(helper, depth + 1, seen, binding))
    return out


def after_validator_rules(annotation: Any, metadata: list[Any], prefix: str = ""
                           ) -> list[str]:
    """Rules of the AfterValidators attached to a type, nested ones ("each value: …") too."""
    rules: list[str] = []
    for meta in metadata:
        func = getattr(meta, "func", None)
        if func is None or type(meta).__name__ != "AfterValidator":
            continue
        rules.extend(prefix + rule for rule in validator_rules(func))
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        rules.extend(after_validator_rules(inner, list(extra), prefix))
    elif origin is not None:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        nested = prefix or ("each value: " if origin in (tuple, list, set, frozenset) else "")
        for arg in args:
            rules.extend(after_validator_rules(arg, [], nested))
    return rules


def validator_rules(func: Any) -> list[str]:
    """What one validator function demands: a range read from its closure, else its messages."""
    closure = dict(zip(func.__code__.co_freevars,
                       (c.cell_contents for c in func.__closure__ or ()), strict=True))
    if {"lo", "hi"} <= closure.keys():
        lo_b = "(" if closure.get("lo_open") else "["
        hi_b = ")" if closure.get("hi_open") else "]"
        return [f"in {lo_b}{closure['lo']:g}, {closure['hi']:g}{hi_b}"]
    return [f'"{message}"' for _, message in raised_messages(func)]
