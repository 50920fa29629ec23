"""A user's data set as the trainer sees it (DESIGN §8): batches, evaluation passes, counts.

A data factory ``load(**params)`` returns a mapping with ``train``, ``valid`` and ``test``
(sequences of examples or map-style torch Datasets: ``len`` and ``[i]``), an optional
``collate`` (a list of examples → a batch; default ``torch.utils.data.default_collate``) and
an optional ``info`` dict, handed to the model factory. :class:`MappingData` turns that mapping
into what the trainer needs (:class:`TrialData`), with the batching rules of klstudy's own
corpora:

- the training batch of step t is a pure function of ``(seed, t)``: epoch e is a fresh
  permutation (``torch.randperm`` seeded ``seed · 1,000,003 + e``), cut into batches of
  ``batch_size`` in that order (the last one of an epoch may be smaller); no sampler state,
  so resume needs nothing but the step;
- evaluation batches are the split in index order, or the fixed-seed subset of
  :func:`workers._data.fixed_subset` (the same examples in every trial and evaluation);
- perplexity needs token counts: ``info["n_tokens"]`` = ``{"valid": N, "test": N, ...}``
  (predicted tokens of each whole split); on an evaluation subset the count is scaled by the
  subset's share of the split (the split's mean tokens per example). Without it, ``ppl`` is NaN.

The built-in corpora (:class:`workers._data.Corpus`) batch themselves: a data factory may return
such a :class:`TrialData` object instead of the mapping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from workers._config import PluginError
from workers._data import SPLITS, fixed_subset

DATA_KEYS = ("train", "valid", "test", "collate", "info")


@runtime_checkable
class TrialData(Protocol):
    """What the trainer needs from a data set (``Corpus`` and :class:`MappingData` have it)."""

    @property
    def info(self) -> dict[str, Any]: ...

    def n_examples(self, split: str) -> int: ...

    def n_tokens(self, split: str, max_sentences: int | None = None) -> float | None: ...

    def train_batch(self, step: int, *, batch_size: int, seed: int,
                    device: torch.device | str | None = None) -> Any: ...

    def eval_batches(self, split: str, *, batch_size: int, max_sentences: int | None = None,
                     device: torch.device | str | None = None) -> Iterator[Any]: ...


def to_device(batch: Any, device: torch.device | str) -> Any:
    """A batch on ``device``: tensors, mappings, tuples/lists (rebuilt, named tuples too) and
    objects with ``.to(device)``; anything else (strings, numbers) as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        return type(batch)(moved) if isinstance(batch, dict) else moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    move = getattr(batch, "to", None)
    return move(device) if callable(move) else batch


def as_trial_data(loaded: Any, *, key: str = "data.factory") -> TrialData:
    """What a data factory returned, as :class:`TrialData` (checked: :class:`PluginError`)."""
    if isinstance(loaded, TrialData) and not isinstance(loaded, Mapping):
        return loaded
    return MappingData(loaded, key=key)


class MappingData:
    """:class:`TrialData` over the contract's mapping (see the module docstring)."""

    def __init__(self, loaded: Any, *, key: str = "data.factory") -> None:
        if not isinstance(loaded, Mapping):
            raise PluginError(key, "load(**params) must return a mapping with train, valid, "
                              f"test[, collate][, info], got {type(loaded).__name__}")
        unknown = sorted(str(k) for k in loaded if k not in DATA_KEYS)
        if unknown:
            raise PluginError(key, f"load(**params) returned unknown key(s) {', '.join(unknown)}"
                              f" (expected {', '.join(DATA_KEYS)})")
        self.splits: dict[str, Sequence[Any]] = {}
        for split in SPLITS:
            self.splits[split] = _checked_split(loaded, split, key)
        collate = loaded.get("collate")
        if collate is None:
            from torch.utils.data import default_collate

            collate = default_collate
        if not callable(collate):
            raise PluginError(key, f"'collate' must be callable (a list of examples -> a batch), "
                              f"got {type(collate).__name__}")
        self.collate: Callable[[list[Any]], Any] = collate
        info = loaded.get("info")
        if info is not None and not isinstance(info, Mapping):
            raise PluginError(key, f"'info' must be a mapping, got {type(info).__name__}")
        self._info = dict(info or {})
        self._tokens = _checked_tokens(self._info.get("n_tokens"), key)
        self._order: tuple[tuple[int, int], list[int]] | None = None

    @property
    def info(self) -> dict[str, Any]:
        return self._info

    def n_examples(self, split: str) -> int:
        return len(self.splits[split])

    def n_tokens(self, split: str, max_sentences: int | None = None) -> float | None:
        total = self._tokens.get(split)
        if total is None:
            return None
        n = self.n_examples(split)
        chosen = n if max_sentences is None else min(n, max_sentences)
        return total if chosen == n else total * chosen / n

    def train_batch(self, step: int, *, batch_size: int, seed: int,
                    device: torch.device | str | None = None) -> Any:
        n = self.n_examples("train")
        epoch, index = divmod(step - 1, math.ceil(n / batch_size))
        order = self._epoch_order(epoch, seed)
        ids = order[index * batch_size:(index + 1) * batch_size]
        return self._batch("train", ids, device)

    def eval_batches(self, split: str, *, batch_size: int, max_sentences: int | None = None,
                     device: torch.device | str | None = None) -> Iterator[Any]:
        chosen = fixed_subset(self.n_examples(split), max_sentences)
        for start in range(0, len(chosen), batch_size):
            yield self._batch(split, chosen[start:start + batch_size], device)

    def _batch(self, split: str, ids: Sequence[int], device: torch.device | str | None) -> Any:
        examples = self.splits[split]
        return to_device(self.collate([examples[i] for i in ids]), torch.device(device or "cpu"))

    def _epoch_order(self, epoch: int, seed: int) -> list[int]:
        if self._order is None or self._order[0] != (epoch, seed):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(self.n_examples("train"), generator=gen).tolist()
            self._order = ((epoch, seed), order)
        return self._order[1]


def _checked_split(loaded: Mapping, split: str, key: str) -> Sequence[Any]:
    if split not in loaded:
        raise PluginError(key, f"load(**params) must return '{split}' (train, valid and test "
                          "are required)")
    data = loaded[split]
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise PluginError(key, f"'{split}' must be a sequence of examples or a map-style torch "
                          f"Dataset (len and [i]), got {type(data).__name__}")
    if len(data) == 0:
        raise PluginError(key, f"'{split}' holds no examples")
    return data


def _checked_tokens(tokens: Any, key: str) -> dict[str, float]:
    if tokens is None:
        return {}
    if not isinstance(tokens, Mapping):
        raise PluginError(key, "info['n_tokens'] must map splits to token counts "
                          f"({{'valid': N, 'test': N}}), got {type(tokens).__name__}")
    out: dict[str, float] = {}
    for split, count in tokens.items():
        if split not in SPLITS:
            raise PluginError(key, f"info['n_tokens'] has unknown split {split!r}")
        if isinstance(count, bool) or not isinstance(count, (int, float)) or not count > 0:
            raise PluginError(key, f"info['n_tokens'][{split!r}] must be a positive number, "
                              f"got {count!r}")
        out[split] = count
    return out
