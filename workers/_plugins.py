"""Models and data sets from factories: the one way every trial builds them (DESIGN §8).

A factory is ``"module:function"``. A user's (kind ``python``) is imported with the study's
``code_dir`` (the spec's directory) first on ``sys.path``, so a module next to the spec is
found before an installed one; where that directory does not exist (a worker on another node)
the module must be importable as installed or shipped with the job (``klstudy submit`` ships
it in the job's runtime environment). The built-in kinds are factories too
(:data:`BUILTIN_MODELS`, :data:`BUILTIN_DATA`), called through the same code with the trial
config's flat fields as their params:

- ``load(**params)`` → the contract's mapping (or an object that batches itself, as the
  built-in corpora do) → :class:`workers._plugin_data.TrialData`;
- ``build(info, **params)`` → an ``nn.Module`` with ``encode(batch) -> (mu, logvar)`` and
  ``reconstruction_nll(batch, z) -> [N]``.

Every way a factory can break the contract raises :class:`PluginError` naming the spec key.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from workers._config import MODEL_DEFAULTS, ConfigError, PluginError, TrialConfig
from workers._data import DataError
from workers._plugin_data import TrialData, as_trial_data

BUILTIN_MODELS: dict[str, str] = {"toy": "workers._models:build_sentence_vae",
                                  "lstm_text": "workers._models:build_sentence_vae"}
BUILTIN_DATA: dict[str, str] = {"toy": "workers._data:load_toy", "ptb": "workers._data:load_ptb",
                                "text": "workers._data:load_text"}
MODEL_METHODS = ("encode", "reconstruction_nll")
# The built-in data kinds' params: the trial config field → the loader's keyword
_BUILTIN_DATA_FIELDS = {"data_path": "path", "max_length": "max_length",
                        "max_train_sentences": "max_train_sentences", "max_vocab": "max_vocab"}


def model_factory(config: TrialConfig) -> tuple[str, dict[str, Any]]:
    """The model factory of a resolved config and its keyword params."""
    if config.model_factory is not None:
        return config.model_factory, dict(config.model_params or {})
    sizes = {k: getattr(config, k) for k in MODEL_DEFAULTS[config.model]}
    return BUILTIN_MODELS[config.model], sizes


def data_factory(config: TrialConfig) -> tuple[str, dict[str, Any]]:
    """The data factory of a config and its keyword params."""
    if config.data_factory is not None:
        return config.data_factory, dict(config.data_params or {})
    params = {key: getattr(config, field) for field, key in _BUILTIN_DATA_FIELDS.items()
              if getattr(config, field) is not None}
    return BUILTIN_DATA[config.data], params


def load_trial_data(config: TrialConfig) -> TrialData:
    """Call the config's data factory: ``load(**params)``, checked.

    Raises:
        PluginError: the factory cannot be imported or called, raises, or returns something
            the contract does not allow (``data.factory`` / ``data.params``).
        DataError: a built-in corpus is missing or malformed.
    """
    ref, params = data_factory(config)
    load = import_factory(ref, code_dir=config.code_dir, key="data.factory")
    _check_call(load, (), params, key="data", signature="load(**params)")
    try:
        loaded = load(**params)
    except (PluginError, DataError, ConfigError):
        raise
    except Exception as exc:
        raise PluginError("data.factory", f"load(**data.params) raised {_describe(exc)}") from exc
    return as_trial_data(loaded, key="data.factory")


def build_trial_model(config: TrialConfig, data: TrialData) -> nn.Module:
    """Call the config's model factory: ``build(data.info, **params)``, checked.

    Raises:
        PluginError: the factory cannot be imported or called, raises, or returns no
            ``nn.Module`` with ``encode`` and ``reconstruction_nll`` (``model.factory`` /
            ``model.params``).
    """
    ref, params = model_factory(config)
    build = import_factory(ref, code_dir=config.code_dir, key="model.factory")
    info = data.info
    _check_call(build, (info,), params, key="model", signature="build(info, **params)")
    try:
        model = build(info, **params)
    except (PluginError, ConfigError):
        raise
    except Exception as exc:
        raise PluginError("model.factory",
                          f"build(info, **model.params) raised {_describe(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise PluginError("model.factory", "build(info, **params) must return a torch.nn.Module "
                          f"with encode and reconstruction_nll, got {type(model).__name__}")
    for name in MODEL_METHODS:
        if not callable(getattr(model, name, None)):
            raise PluginError("model.factory", f"the model ({type(model).__name__}) has no "
                              f"method {name}(...); the contract needs encode(batch) -> (mu, "
                              "logvar) and reconstruction_nll(batch, z) -> [N]")
    return model


def import_factory(ref: str, *, code_dir: str | None, key: str) -> Callable[..., Any]:
    """The callable ``ref`` (``module:function``) names, ``code_dir`` first on the path.

    Raises:
        PluginError: naming ``key``: a malformed reference, a module that is not found or
            fails to import, a missing attribute, or something that is not callable.
    """
    module_name, sep, attr_path = ref.partition(":")
    if not sep or not module_name or not attr_path:
        raise PluginError(key, f"must be 'module:function', got {ref!r}")
    module = _import(module_name, code_dir=code_dir, key=key)
    target: Any = module
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            where = getattr(module, "__file__", None) or module_name
            raise PluginError(key, f"module {module_name!r} ({where}) has no attribute "
                              f"{attr_path!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise PluginError(key, f"{ref!r} is not callable (a {type(target).__name__}); it must "
                          "be the factory function")
    return target


def _import(module_name: str, *, code_dir: str | None, key: str) -> Any:
    directory = Path(code_dir) if code_dir else None
    if directory is not None and directory.is_dir():
        _put_first(str(directory))
        _forget_if_shadowed(module_name, directory)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            if directory is None:
                looked = "the installed packages"
            elif directory.is_dir():
                looked = f"{directory} (code_dir) first, then the installed packages"
            else:
                looked = f"the installed packages (code_dir {directory} does not exist here)"
            raise PluginError(key, f"module {module_name!r} not found (looked in {looked})") \
                from None
        raise PluginError(key, f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise PluginError(key, f"importing {module_name!r} raised {_describe(exc)}") from exc


def _put_first(path: str) -> None:
    if sys.path[:1] != [path]:
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


def _forget_if_shadowed(module_name: str, directory: Path) -> None:
    """A module of that name imported earlier from elsewhere (another study's code_dir in the
    same process) is dropped, with its submodules, when ``directory`` holds one."""
    top = module_name.split(".")[0]
    here = [directory / f"{top}.py", directory / top / "__init__.py"]
    if top not in sys.modules or not any(p.is_file() for p in here):
        return
    cached = getattr(sys.modules[top], "__file__", None)
    if cached is not None and Path(cached).resolve() in {p.resolve() for p in here}:
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def _check_call(fn: Callable[..., Any], args: tuple[Any, ...], params: Mapping[str, Any], *,
                key: str, signature: str) -> None:
    """The params must fit the factory's signature (named ``<key>.params`` when not)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: let the call tell
        return
    try:
        sig.bind(*args, **params)
    except TypeError as exc:
        raise PluginError(f"{key}.params", f"{signature} does not accept {dict(params)!r} "
                          f"({exc})") from None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
