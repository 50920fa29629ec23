"""Reading a spec file: YAML text → plain data, with errors that name the file, line and column.

Two details differ from plain PyYAML: ``1e-3`` reads as a float (YAML 1.2; PyYAML's YAML 1.1
makes it a string) and a key repeated in one mapping is an error instead of the last one winning.
Keys must be scalars (a list or mapping as a key is an error, not a traceback).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_NO_VALUE: Any = object()


class SpecError(ValueError):
    """A spec problem: ``path`` (``schedule.ratio[1]``), ``message``, the offending ``value``.

    ``str(exc)`` is ``"{path}: {message}, got {value!r}"``, or ``"{path}: {message}"`` when no
    value is meaningful (a missing or unknown key); ``value`` is then None.
    """

    def __init__(self, path: str, message: str, value: Any = _NO_VALUE) -> None:
        shown = "" if value is _NO_VALUE else f", got {value!r}"
        super().__init__(f"{path}: {message}{shown}")
        self.path = path
        self.message = message
        self.value = None if value is _NO_VALUE else value


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 exponent floats (``1e-3``) and errors on repeated keys."""


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"keys must be plain scalars, got a {type(key).__name__}",
                key_node.start_mark,
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return dict(loader.construct_pairs(node, deep=True))


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: Path) -> Any:
    """The parsed content of a spec file.

    Raises:
        SpecError: the file is missing or unreadable (path ``spec``), is not valid YAML (path
            ``FILE:LINE:COLUMN``), or is empty.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("spec", "no such file", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
        raise SpecError("spec", f"cannot read ({reason})", str(path)) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise SpecError(where, f"invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        raise SpecError("spec", "empty file", str(path))
    return data
