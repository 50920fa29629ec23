"""Metrics of DESIGN §3 checked against hand computations and torch.distributions."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from workers import (
    Corpus,
    ModelShape,
    SentenceVAE,
    active_units,
    evaluate,
    gaussian_kl,
    importance_weighted_nll,
    load_corpus,
    log_normal,
    make_batch,
    mutual_information,
)

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(
    corpus: Corpus, *, dropout: float = 0.0, latent_dim: int = 2, seed: int = 0
) -> SentenceVAE:
    torch.manual_seed(seed)
    shape = ModelShape(
        len(corpus.vocab),
        emb_dim=8,
        hidden_dim=32,
        latent_dim=latent_dim,
        n_layers=2,
        dropout=dropout,
    )
    return SentenceVAE(shape)


@pytest.fixture(scope="module")
def toy() -> Corpus:
    return load_corpus("toy")


@pytest.fixture
def two_sentences(tmp_path: Path) -> Corpus:
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text("a b c\nd\n")
    return load_corpus("text", path=str(tmp_path))


def _valid(corpus: Corpus, batch_size: int = 10):
    return corpus.eval_batches("valid", batch_size=batch_size)


# --- closed forms ------------------------------------------------------------------------------
def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = torch.randn(6, 4, generator=_gen(0)), torch.randn(6, 4, generator=_gen(1))
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(gaussian_kl(mu, logvar), expected, atol=1e-5)


def test_gaussian_kl_of_the_prior_is_zero():
    assert torch.equal(gaussian_kl(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3))


def test_log_normal_matches_torch_distributions():
    z, mu, logvar = (torch.randn(6, 3, generator=_gen(s)) for s in range(3))
    expected = Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    assert torch.allclose(log_normal(z, mu, logvar), expected, atol=1e-5)


# --- active units ------------------------------------------------------------------------------
def test_active_units_counts_dimensions_with_variance_at_least_0_01():
    # Two sentences with means ±a have unbiased variance (a² + a²)/(2 − 1) = 2a² per dimension.
    a = torch.tensor([0.01, 0.0025, 0.0], dtype=torch.float64).sqrt()  # 2a² = 0.02, 0.005, 0
    means = torch.stack([a, -a])
    assert active_units(means) == 1


def test_active_units_threshold_is_inclusive():
    means = torch.tensor([[0.5], [-0.5]], dtype=torch.float64)  # variance 2 · 0.25 = 0.5
    assert active_units(means, threshold=0.5) == 1
    assert active_units(means, threshold=0.5000001) == 0


def test_active_units_divide_by_n_minus_one_on_the_toys_ten_sentences():
    # He et al. (jxhe/vae-lagging-encoder) use the unbiased variance. Ten means, five at +a and
    # five at −a: population variance a², unbiased a² · 10/9. With a² = 0.0095 the dimension is
    # active (0.010556 ≥ 0.01) though its population variance (0.0095) is below the threshold.
    a = math.sqrt(0.0095)
    means = torch.tensor([[a], [-a]] * 5, dtype=torch.float64)
    assert float(means.var(unbiased=False)) == pytest.approx(0.0095)
    assert float(means.var(unbiased=True)) == pytest.approx(0.0095 * 10 / 9)
    assert active_units(means) == 1
    assert active_units(means * math.sqrt(0.0089 / 0.0095)) == 0  # 0.0089 · 10/9 = 0.00989


def test_active_units_uses_variance_over_sentences():
    # Dimension 0 varies across sentences (var 2/3), dimension 1 is large but constant.
    means = torch.tensor([[1.0, 5.0], [0.0, 5.0], [-1.0, 5.0]])
    assert active_units(means) == 1


# --- mutual information ------------------------------------------------------------------------
def test_mutual_information_of_far_apart_posteriors_is_log_n():
    # n posteriors N(μ_i, 4·I) with μ_i ±100 apart, samples z_i = μ_i ± σ per dimension:
    #   E log q(z|x) = −½ d log 2π − ½ Σ(1 + log σ²)
    #   log q(z_i) = log N(z_i; μ_i, σ²) − log n = −½ d log 2π − ½ Σ log σ² − ½ d − log n
    # (other components contribute e^(−~1000)), so MI = log n exactly.
    mu = torch.tensor(
        [[-100.0, 0.0], [100.0, 0.0], [0.0, 100.0], [0.0, -100.0]], dtype=torch.float64
    )
    logvar = torch.full_like(mu, math.log(4.0))
    eps = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    assert mutual_information(mu, logvar, mu + 2.0 * eps) == pytest.approx(math.log(4), abs=1e-9)
    two = slice(0, 2)
    mi_two = mutual_information(mu[two], logvar[two], (mu + 2.0 * eps)[two])
    assert mi_two == pytest.approx(math.log(2), abs=1e-9)


def test_mutual_information_of_identical_posteriors_is_zero():
    # q(z) = q(z|x) for every x, and the samples sit at μ ± σ: both terms equal
    # −½d log 2π − ½Σ(1 + log σ²).
    mu = torch.full((3, 2), 0.7, dtype=torch.float64)
    logvar = torch.full((3, 2), math.log(0.25), dtype=torch.float64)
    eps = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert mutual_information(mu, logvar, mu + 0.5 * eps) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_matches_a_direct_computation():
    # He et al. 2019 with both terms over the same samples z_i ~ q(z|x_i):
    # E_i[log q(z_i|x_i)] − E_i[log (1/n) Σ_j q(z_i|x_j)].
    mu = torch.randn(7, 3, generator=_gen(0), dtype=torch.float64)
    logvar = torch.randn(7, 3, generator=_gen(1), dtype=torch.float64) * 0.5
    z = mu + torch.randn(7, 3, generator=_gen(2), dtype=torch.float64) * (0.5 * logvar).exp()
    log_q_ij = Normal(mu.unsqueeze(0), (0.5 * logvar).exp().unsqueeze(0)).log_prob(z.unsqueeze(1))
    log_q_ij = log_q_ij.sum(-1)  # [i (sample), j (posterior)]
    log_own = torch.diagonal(log_q_ij)
    log_qz = torch.logsumexp(log_q_ij, dim=1) - math.log(7)
    expected = float((log_own - log_qz).mean())
    assert expected > 0
    assert mutual_information(mu, logvar, z) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_mutual_information_of_collapsed_posteriors_is_not_seed_noise(seed):
    """The issue's collapsed runs: (nearly) identical posteriors gave MI from −0.08 to +0.07
    with the sampling seed; the true I_q is ~0 and never negative."""
    from workers._metrics import aggregate_mutual_information

    mu = 0.01 * torch.randn(10, 2, generator=_gen(100 + seed), dtype=torch.float64)
    logvar = torch.zeros(10, 2, dtype=torch.float64)
    mi = aggregate_mutual_information(mu, logvar, generator=_gen(seed))
    assert 0.0 <= mi < 1e-3


def test_mutual_information_averages_over_several_samples_per_sentence():
    # z of shape [k, n, d] is k independent draws; the estimate is the mean of the k
    # single-draw estimates (same q(z|x) terms, mixture over the same n posteriors).
    mu = torch.randn(5, 2, generator=_gen(3), dtype=torch.float64)
    logvar = torch.randn(5, 2, generator=_gen(4), dtype=torch.float64) * 0.3
    z = mu + torch.randn(3, 5, 2, generator=_gen(5), dtype=torch.float64) * (0.5 * logvar).exp()
    singles = [mutual_information(mu, logvar, z[i]) for i in range(3)]
    assert mutual_information(mu, logvar, z) == pytest.approx(sum(singles) / 3, abs=1e-9)


# --- padding and batching ----------------------------------------------------------------------
def test_padding_does_not_leak_into_a_sentence():
    # The same sentence alone and batched (either row) with a longer one. Batched float32 matmuls
    # round differently (~1e-8 here); a leak of padding would change values by O(0.1).
    torch.manual_seed(0)
    model = SentenceVAE(ModelShape(20, 8, 16, 3, 2, dropout=0.5)).eval()
    short, long = [5, 6, 7], [4, 9, 10, 11, 12, 13, 14, 8]
    z = torch.randn(1, 3, generator=_gen(0))
    other = torch.randn(1, 3, generator=_gen(1))
    with torch.no_grad():
        alone_mu, alone_logvar = model.encode(make_batch([short]))
        alone_nll = model.reconstruction_nll(make_batch([short]), z)
        for row, batch, zs in [
            (0, make_batch([short, long]), torch.cat([z, other])),
            (1, make_batch([long, short]), torch.cat([other, z])),
        ]:
            mu, logvar = model.encode(batch)
            assert torch.allclose(mu[row], alone_mu[0], atol=1e-6)
            assert torch.allclose(logvar[row], alone_logvar[0], atol=1e-6)
            assert torch.allclose(
                model.reconstruction_nll(batch, zs)[row], alone_nll[0], atol=1e-5
            )


def test_reconstruction_nll_sums_over_the_predicted_tokens():
    # With all logits 0 the decoder gives each of the V tokens probability 1/V, so
    # −log p(x|z) = |x| log V: |x| = 4 for "w w w </s>", 2 for "w </s>"; <s> and <pad> excluded.
    torch.manual_seed(0)
    model = SentenceVAE(ModelShape(200, 8, 16, 2, 1, 0.0)).eval()
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.zero_()  # logits all 0: p = 1/V exactly at every position
        nll = model.reconstruction_nll(make_batch([[10, 11, 12], [13]]), torch.zeros(2, 2))
    assert nll.tolist() == pytest.approx([4 * math.log(200), 2 * math.log(200)], rel=1e-6)


# --- evaluate ----------------------------------------------------------------------------------
def test_evaluate_perplexity_counts_words_and_end_of_sentence(two_sentences):
    # 2 sentences of 3 and 1 words: |x| = 4 + 2 = 6 predicted tokens.
    model = _model(two_sentences)
    m = evaluate(model, _valid(two_sentences), device=CPU, generator=_gen(0))
    assert two_sentences.n_predicted_tokens("valid") == 6
    assert m["ppl"] == pytest.approx(math.exp((m["rec"] + m["kl"]) * 2 / 6), rel=1e-9)


def test_evaluate_ppl_is_exp_of_total_nll_over_tokens(toy):
    m = evaluate(_model(toy), _valid(toy, batch_size=3), device=CPU, generator=_gen(0))
    n_sent, n_tok = toy.n_sentences("valid"), toy.n_predicted_tokens("valid")
    assert n_tok == 110  # 10 sentences · (10 words + </s>)
    assert m["ppl"] == pytest.approx(math.exp((m["rec"] + m["kl"]) * n_sent / n_tok), rel=1e-9)
    assert m["elbo"] == -(m["rec"] + m["kl"]) and m["nll_elbo"] == m["rec"] + m["kl"]


def test_evaluate_kl_is_the_mean_analytic_kl(toy):
    model = _model(toy).eval()
    with torch.no_grad():
        mu, logvar = model.encode(next(_valid(toy)))
    expected = float(gaussian_kl(mu, logvar).mean())
    for batch_size in (1, 4, 10):
        m = evaluate(model, _valid(toy, batch_size), device=CPU, generator=_gen(0))
        assert m["kl"] == pytest.approx(expected, rel=1e-5)


def test_evaluate_active_units_come_from_the_posterior_means(toy):
    model = _model(toy).eval()
    with torch.no_grad():
        model.to_stats.weight.zero_()
        model.to_stats.bias.zero_()  # every posterior is N(0, I): no dimension is active
    assert evaluate(model, _valid(toy), device=CPU, generator=_gen(0))["au"] == 0.0
    # Make μ_1 vary across sentences with variance 1: project the encoder's final states on
    # their first centred direction (a fresh encoder's states differ only by ~1e-4).
    states = []
    hook = model.to_stats.register_forward_hook(lambda mod, args, out: states.append(args[0]))
    with torch.no_grad():
        model.encode(next(_valid(toy)))
        hook.remove()
        centred = states[0] - states[0].mean(0)
        projection = centred @ centred[0]
        model.to_stats.weight[0] = centred[0] / projection.std(unbiased=False)
        model.to_stats.bias[0] = -float(states[0].mean(0) @ model.to_stats.weight[0])
    m = evaluate(model, _valid(toy, batch_size=3), device=CPU, generator=_gen(0))
    assert m["au"] == 1.0


def test_evaluate_uses_eval_mode_and_restores_train_mode(toy):
    model = _model(toy, dropout=0.5).train()
    first = evaluate(model, _valid(toy), device=CPU, generator=_gen(0))
    second = evaluate(model, _valid(toy), device=CPU, generator=_gen(0))
    assert first == second  # no dropout noise
    assert model.training


def test_evaluation_never_touches_the_global_rng(toy):
    # Needed for bit-for-bit resume: evaluations sample only from the generator they are given.
    model = _model(toy, dropout=0.5)
    before = torch.get_rng_state()
    evaluate(model, _valid(toy), device=CPU, generator=_gen(0))
    importance_weighted_nll(model, _valid(toy), n_samples=5, device=CPU, generator=_gen(1))
    assert torch.equal(torch.get_rng_state(), before)


# --- importance-weighted NLL -------------------------------------------------------------------
def _decoder_ignores_z(model: SentenceVAE) -> None:
    d = model.shape.emb_dim
    with torch.no_grad():
        model.z_to_h0.weight.zero_()
        model.z_to_h0.bias.zero_()
        model.decoder.weight_ih_l0[:, d:].zero_()  # the columns that read z


@pytest.mark.parametrize("n_samples", [1, 7, 60])
def test_iw_nll_is_exact_when_the_posterior_is_the_prior(toy, n_samples):
    # q(z|x) = N(0, I) = p(z) and p(x|z) = p(x): every importance weight is p(x), so
    # iw_nll = −log p(x) = rec = nll_elbo (kl = 0), for any K and any chunking.
    model = _model(toy)
    _decoder_ignores_z(model)
    with torch.no_grad():
        model.to_stats.weight.zero_()
        model.to_stats.bias.zero_()
    m = evaluate(model, _valid(toy), device=CPU, generator=_gen(0))
    iw = importance_weighted_nll(
        model, _valid(toy), n_samples=n_samples, device=CPU, generator=_gen(1), budget_bytes=1
    )  # one decoder row per pass
    assert m["kl"] == 0.0
    assert iw["iw_nll"] == pytest.approx(m["nll_elbo"], rel=1e-6)
    n_sent, n_tok = toy.n_sentences("valid"), toy.n_predicted_tokens("valid")
    assert iw["iw_ppl"] == pytest.approx(math.exp(iw["iw_nll"] * n_sent / n_tok), rel=1e-9)


def _wide_posterior_model(toy: Corpus) -> SentenceVAE:
    """q(z|x) = N(0, 9·I) for every x: KL = 2 · ½(9 − log 9 − 1) ≈ 5.80 nats above the prior."""
    model = _model(toy)
    with torch.no_grad():
        model.to_stats.weight.zero_()
        model.to_stats.bias.copy_(torch.tensor([0.0, 0.0, math.log(9.0), math.log(9.0)]))
    return model


def test_iw_bound_is_tighter_than_the_elbo(toy):
    # −ELBO − (−log p(x)) = KL(q(z|x) ‖ p(z|x)) ≥ ~5 nats for this too-wide posterior, while the
    # sampling noise of either estimate on these 10 sentences is ~0.05 nats (measured).
    model = _wide_posterior_model(toy)
    m = evaluate(model, _valid(toy), device=CPU, generator=_gen(0))
    iw = importance_weighted_nll(model, _valid(toy), n_samples=200, device=CPU, generator=_gen(1))
    assert m["kl"] == pytest.approx(9.0 - math.log(9.0) - 1.0, rel=1e-5)
    assert iw["iw_nll"] < m["nll_elbo"] - 4.0


def test_iw_nll_with_one_sample_is_an_unbiased_elbo(toy):
    # K = 1: log w = log p(x|z) + log p(z) − log q(z|x), whose expectation is the ELBO. Compare the
    # means of 30 independent estimates of each within 5 standard errors.
    model = _wide_posterior_model(toy)
    elbo = [
        evaluate(model, _valid(toy), device=CPU, generator=_gen(s))["nll_elbo"] for s in range(30)
    ]
    iw1 = [
        importance_weighted_nll(
            model, _valid(toy), n_samples=1, device=CPU, generator=_gen(100 + s)
        )["iw_nll"]
        for s in range(30)
    ]
    se = math.sqrt((statistics.variance(elbo) + statistics.variance(iw1)) / 30)
    assert abs(statistics.mean(iw1) - statistics.mean(elbo)) < 5 * se


@pytest.mark.parametrize(("batch_size", "expected"), [(10, 16), (100, 3), (256, 1), (1000, 1)])
def test_rec_uses_more_posterior_samples_only_on_tiny_batches(batch_size, expected):
    from workers._metrics import rec_samples

    assert rec_samples(batch_size) == expected


# --- MI over a shuffled aggregate, not length-sorted batches -----------------------------------
class _LengthEncoder(torch.nn.Module):
    """A stand-in VAE whose posterior mean encodes the sentence length (and nothing else)."""

    shape = ModelShape(vocab_size=8, emb_dim=1, hidden_dim=1, latent_dim=2, n_layers=1, dropout=0)

    def encode(self, batch):
        x = (batch.lengths.to(torch.float64) - 21.0) / 8.0
        mu = torch.stack([x, torch.zeros_like(x)], dim=-1)
        return mu, torch.full_like(mu, math.log(0.01))

    def reconstruction_nll(self, batch, z):
        return torch.zeros(z.shape[0], dtype=torch.float64)


def _length_corpus(n: int, seed: int = 0) -> Corpus:
    """n sentences with PTB-like lengths (gamma, mean ≈ 21 words, 1–82)."""
    from workers import Vocab

    gamma = torch.distributions.Gamma(torch.tensor(4.0), torch.tensor(1 / 5.2))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lengths = gamma.sample((n,)).round().clamp(1, 82).long().tolist()
    sents = [[4] * n_words for n_words in lengths]
    return Corpus(Vocab(("<pad>", "<unk>", "<s>", "</s>", "w")), {"valid": sents})


def test_mi_sees_what_z_says_about_length_unlike_sorted_batches():
    # The check: z encodes length. The mixture over each length-sorted batch of 256
    # (the old estimator) holds near-identical posteriors and finds little MI; the mixture over
    # the whole split is the reference; evaluate's estimate (over a fixed-seed 2,000 of the
    # 3,000 sentences here) must be close to it.
    corpus, model = _length_corpus(3000), _LengthEncoder()
    batches = list(corpus.eval_batches("valid", batch_size=256))
    mu, logvar = (torch.cat(t) for t in zip(*(model.encode(b) for b in batches), strict=True))
    sample = lambda k, m, lv, s: m + torch.randn((k, *m.shape), generator=_gen(s),  # noqa: E731
                                                 dtype=m.dtype) * (0.5 * lv).exp()
    whole = mutual_information(mu, logvar, sample(4, mu, logvar, 0))
    sorted_batches = statistics.fmean(
        mutual_information(m, lv, sample(8, m, lv, i))
        for i, (m, lv) in enumerate(model.encode(b) for b in batches)
    )
    ours = evaluate(model, corpus.eval_batches("valid", batch_size=256), device=CPU,
                    generator=_gen(1))["mi"]
    assert whole > 2.0
    assert sorted_batches < 0.7 * whole
    assert ours == pytest.approx(whole, abs=0.1)


def test_mi_does_not_depend_on_the_evaluation_batch_size():
    corpus, model = _length_corpus(600), _LengthEncoder()
    values = [evaluate(model, corpus.eval_batches("valid", batch_size=b), device=CPU,
                       generator=_gen(0))["mi"] for b in (16, 256, 600)]
    # Rec takes more samples on small batches; MI draws from its own generator, seeded first.
    assert values[0] == pytest.approx(values[1], abs=1e-9)
    assert values[1] == pytest.approx(values[2], abs=1e-9)


def test_aggregate_mi_uses_a_fixed_seed_subset_beyond_its_size(monkeypatch):
    from workers._metrics import aggregate_mutual_information

    mu = torch.randn(50, 3, generator=_gen(0), dtype=torch.float64)
    logvar = torch.zeros_like(mu)
    seen = []
    import workers._metrics as metrics

    real = metrics.mutual_information
    monkeypatch.setattr(metrics, "mutual_information",
                        lambda m, lv, z: seen.append(m.shape[0]) or real(m, lv, z))
    a = aggregate_mutual_information(mu, logvar, generator=_gen(1), max_sentences=20)
    b = aggregate_mutual_information(mu, logvar, generator=_gen(1), max_sentences=20)
    assert seen == [20, 20] and a == b


def test_mutual_information_in_chunks_matches_one_pass(monkeypatch):
    import workers._metrics as metrics

    mu = torch.randn(40, 3, generator=_gen(0), dtype=torch.float64)
    logvar = torch.randn(40, 3, generator=_gen(1), dtype=torch.float64) * 0.3
    z = mu + torch.randn(2, 40, 3, generator=_gen(2), dtype=torch.float64)
    one_pass = mutual_information(mu, logvar, z)
    monkeypatch.setattr(metrics, "_MI_CHUNK_ELEMENTS", 40 * 7)  # 7 samples per chunk
    assert mutual_information(mu, logvar, z) == pytest.approx(one_pass, abs=1e-12)


# --- decoding within a memory budget -----------------------------------------------------------
def test_rows_per_pass_fits_the_logits_in_the_budget():
    from workers._metrics import DECODE_BUDGET_BYTES, rows_per_pass

    # The PTB-sized case: an 82-token batch, a 28,284-word vocabulary, 128 MiB:
    # one row of logits is 82 · 28,284 · 4 = 9,277,152 bytes, so 14 rows fit.
    assert DECODE_BUDGET_BYTES == 128 * 2**20
    assert rows_per_pass(82, 28_284) == 14
    assert rows_per_pass(82, 28_284, budget_bytes=1) == 1


class _CountingModel(SentenceVAE):
    """Records the (rows, columns) of every decoder call."""

    calls: list[tuple[int, int]]

    def reconstruction_nll(self, batch, z):
        self.calls.append((int(z.shape[0]), int(batch.tokens.shape[1])))
        return super().reconstruction_nll(batch, z)


def _counting_model(vocab_size: int) -> _CountingModel:
    torch.manual_seed(0)
    model = _CountingModel(ModelShape(vocab_size, 8, 16, 3, 1, dropout=0.5)).double()
    model.calls = []
    return model


def _long_batch() -> list:
    return [make_batch([[4 + (i * j) % 20 for j in range(3 + i % 9)] for i in range(12)])]


def test_iw_nll_in_passes_equals_the_unchunked_computation():
    model = _counting_model(30)
    whole = importance_weighted_nll(model, _long_batch(), n_samples=9, device=CPU,
                                    generator=_gen(3), budget_bytes=2**40)
    assert model.calls == [(12 * 9, 13)]  # one pass: 108 rows, <s> + 11 words + </s>
    model.calls = []
    budget = 5 * 12 * 30 * 4  # logits of 60 token positions: 5 rows of the longest sentence
    chunked = importance_weighted_nll(model, _long_batch(), n_samples=9, device=CPU,
                                      generator=_gen(3), budget_bytes=budget)
    # Shortest rows first, packed while rows × (columns − 1) positions ≤ 60; each pass is cut
    # to its longest row; all 108 rows are decoded once.
    assert sum(rows for rows, _ in model.calls) == 108
    assert all(rows * (cols - 1) <= 60 for rows, cols in model.calls)
    assert min(cols for _, cols in model.calls) == 5 and max(r for r, _ in model.calls) == 15
    assert len(model.calls) < math.ceil(108 / 5)  # short rows share passes
    assert chunked.keys() == whole.keys()
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-12)


def test_evaluate_in_passes_equals_the_unchunked_computation():
    model = _counting_model(30)
    whole = evaluate(model, _long_batch(), device=CPU, generator=_gen(4), budget_bytes=2**40)
    calls_whole, model.calls = model.calls, []
    chunked = evaluate(model, _long_batch(), device=CPU, generator=_gen(4), budget_bytes=1)
    assert len(calls_whole) == 1 and len(model.calls) == 12 * 16  # rec: 16 samples of 12
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-12)


def test_a_literal_pad_in_text_is_counted_and_predicted_as_a_word(tmp_path):
    # "a <pad> b": |x| = 4 predicted tokens (a, <pad>, b, </s>), none of them ignored. With all
    # logits 0 each has probability 1/V, so −log p(x|z) = 4 log V.
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text("a <pad> b\n")
    corpus = load_corpus("text", path=str(tmp_path))
    batch = next(corpus.eval_batches("valid", batch_size=1))
    assert int(batch.lengths[0]) == 4 and corpus.n_predicted_tokens("valid") == 4
    model = _model(corpus).eval()
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.zero_()
        nll = model.reconstruction_nll(batch, torch.zeros(1, 2))
    assert float(nll[0]) == pytest.approx(4 * math.log(len(corpus.vocab)), rel=1e-6)
