"""A spec's user factories, checked before anything starts (DESIGN §8).

``klstudy validate``, ``run`` and ``train --spec`` run one batch on CPU
(:func:`workers.check_contract`); ``submit`` only checks that the factories import on the
submitting machine (the data may live on the cluster). Every failure is one
:class:`SpecError` naming the spec key: ``model.factory``, ``model.params``, ``data.factory``,
``data.params``, ``objective.metric``.
"""

from __future__ import annotations

from study._spec import StudySpec
from study._spec_yaml import SpecError


def check_factories(spec: StudySpec, *, one_batch: bool = True) -> str | None:
    """Check a spec's ``python`` factories; returns a one-line summary (None: no factories).

    Args:
        spec: a validated spec.
        one_batch: build data and model and run one batch on CPU; else only import them.

    Raises:
        SpecError: the first way the factories break the contract.
    """
    if not spec.uses_factories():
        return None
    from workers import DataError, PluginError, check_contract, import_factory
    from workers._plugins import data_factory, model_factory

    config = spec.base_config()
    try:
        if not one_batch:
            for (ref, _), key in ((data_factory(config), "data.factory"),
                                  (model_factory(config), "model.factory")):
                import_factory(ref, code_dir=config.code_dir, key=key)
            return "factories import"
        check = check_contract(config)
    except PluginError as exc:
        raise SpecError(exc.key, exc.message) from None
    except DataError as exc:
        raise SpecError("data", str(exc)) from None
    if spec.objective.metric == "ppl" and not check.has_tokens:
        raise SpecError("objective.metric", "'ppl' needs token counts: the data factory's "
                        "info['n_tokens'] ({'valid': N, 'test': N})", "ppl")
    return check.summary()
