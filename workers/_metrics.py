"""Evaluation metrics of DESIGN §3: rec, kl, elbo, nll_elbo, ppl, au, mi, iw_nll, iw_ppl.

Every metric is a mean per sentence except the perplexities, which divide by the number of
predicted tokens (words plus ``</s>``). Sampling uses a caller-given generator so that an
evaluation never disturbs the training RNG (needed for bit-for-bit resume). The decoder runs
in passes whose logits fit :data:`DECODE_BUDGET_BYTES`, so memory does not grow with the
evaluation batch, the number of samples or the sentence length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from workers._data import Batch, fixed_subset
from workers._models import SentenceVAE, gaussian_kl, log_normal, reparameterize

AU_THRESHOLD = 0.01  # variance over x of E_q[z|x] that makes a latent dimension "active"
DECODE_BUDGET_BYTES = 128 * 2**20  # float32 logits of one decoder pass: rows × length × vocab × 4
MI_MAX_SENTENCES = 2000  # MI's aggregate posterior: all evaluated sentences, or this many
_REC_SAMPLE_BUDGET = 256  # decoder passes per evaluation batch for Rec (see rec_samples)
_MI_SAMPLE_BUDGET = 2048  # posterior samples in all for the MI estimate (see mi_samples)
_MI_CHUNK_ELEMENTS = 2**22  # sample-posterior pairs of the MI mixture evaluated at once


def active_units(means: torch.Tensor, *, threshold: float = AU_THRESHOLD) -> int:
    """Number of dimensions whose variance over sentences of the posterior mean ≥ threshold.

    The variance is the unbiased one (divided by N − 1), as in He et al. 2019's code
    (jxhe/vae-lagging-encoder); on the toy's N = 10 sentences that is 10/9 of the population
    variance.

    Args:
        means: ``[N, D]`` posterior means E_q[z|x], one row per sentence; N < 2 gives 0.
    """
    if means.shape[0] < 2:
        return 0
    return int((means.var(dim=0, unbiased=True) >= threshold).sum().item())


def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> float:
    """I_q(z; x) ≈ E[log q(z|x)] − E[log q(z)] (He et al. 2019), q(z) the mixture of all rows,
    never below 0.

    ``z`` is ``[n, d]`` (``z[i]`` a sample of q(z|x_i)) or ``[k, n, d]`` (k samples each,
    averaged: less noise on small sets). Both expectations are taken over the *same* samples:
    the estimate is the mean over samples z_i of log q(z_i|x_i) − log (1/n) Σ_j q(z_i|x_j).
    (Taking E[log q(z|x)] in closed form, as before, left the Monte-Carlo noise of the second
    term alone: on collapsed runs, where every q(z|x_j) is the same, the estimate went from
    −0.08 to +0.07 nats with the seed; with shared samples both terms carry the same noise and
    the estimate is 0 there.) I_q ≥ 0, so a negative estimate — what is left of the noise — is
    reported as 0. log q(z_i | x_j) for all pairs comes from two matrix products in float64
    (the square expanded), in chunks of samples, so time and memory stay small for thousands
    of posteriors.
    """
    n, d = mu.shape
    mu, logvar = mu.double(), logvar.double()
    precision = torch.exp(-logvar)  # [n, d]
    # log N(z; μ_j, σ_j²) = c_j − ½ z²·(1/σ_j²) + z·(μ_j/σ_j²)
    const = -0.5 * (d * math.log(2 * math.pi) + logvar.sum(-1) + (mu.pow(2) * precision).sum(-1))
    weighted_mu = (mu * precision).T  # [d, n]
    flat = z.reshape(-1, d).double()
    chunk = max(1, _MI_CHUNK_ELEMENTS // n)
    total = torch.zeros((), dtype=torch.float64, device=mu.device)
    for start in range(0, flat.shape[0], chunk):
        zc = flat[start : start + chunk]
        log_q_each = const - 0.5 * zc.pow(2) @ precision.T + zc @ weighted_mu  # [c, n]
        rows = torch.arange(zc.shape[0], device=mu.device)
        own = log_q_each[rows, (rows + start) % n]  # log q(z_i | x_i): row r samples x_(r mod n)
        total = total + (own - torch.logsumexp(log_q_each, dim=-1) + math.log(n)).sum()
    return max(0.0, float(total / flat.shape[0]))


def aggregate_mutual_information(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    generator: torch.Generator,
    max_sentences: int = MI_MAX_SENTENCES,
) -> float:
    """MI over the posteriors of a whole evaluation set, in any order.

    q(z) is the mixture over all ``n`` sentences given, or, beyond ``max_sentences`` (2,000),
    over a fixed-seed random subset of that many (:func:`workers._data.fixed_subset`) — never
    over one length-sorted evaluation batch, whose sentences have similar lengths, so that
    the estimate would miss what z says about length. ``mi_samples(n)`` samples per sentence.
    """
    chosen = fixed_subset(mu.shape[0], max_sentences)
    if len(chosen) < mu.shape[0]:
        index = torch.tensor(chosen, device=mu.device)
        mu, logvar = mu[index], logvar[index]
    k = mi_samples(mu.shape[0])
    z = reparameterize(mu.expand(k, -1, -1), logvar.expand(k, -1, -1), generator=generator)
    return mutual_information(mu, logvar, z)


def rec_samples(batch_size: int) -> int:
    """Posterior samples per sentence for Rec: 1 on real evaluation batches, up to 16 on tiny
    ones (the toy's 10 sentences), where one sample each makes the ELBO too noisy to compare."""
    return max(1, min(16, math.ceil(_REC_SAMPLE_BUDGET / batch_size)))


def mi_samples(n_sentences: int) -> int:
    """Posterior samples per sentence for MI: ≈ 2,048 in all, 1 to 32 per sentence."""
    return max(1, min(32, math.ceil(_MI_SAMPLE_BUDGET / n_sentences)))


def rows_per_pass(length: int, vocab_size: int, *, budget_bytes: int = DECODE_BUDGET_BYTES) -> int:
    """Decoder rows whose float32 logits (rows × length × vocab × 4 bytes) fit the budget (≥ 1)."""
    return max(1, budget_bytes // (4 * length * vocab_size))


def sentence_nll(
    model: SentenceVAE, batch: Batch, z: torch.Tensor, *, budget_bytes: int = DECODE_BUDGET_BYTES
) -> torch.Tensor:
    """−log p(x|z) for ``z`` ``[R, d]``, row r a sample for sentence ``r mod B`` (sample-major,
    as :meth:`SentenceVAE.reconstruction_nll`), decoded within a memory budget.

    One call when all R rows fit :func:`rows_per_pass`; otherwise rows are taken shortest
    first and packed into passes whose logits (rows × the longest row's length × vocab × 4
    bytes) fit ``budget_bytes``, each cut to its longest row. The result equals one unchunked
    call up to float rounding (padding never reaches a sentence's terms).
    """
    n_rows, vocab = z.shape[0], model.shape.vocab_size
    if rows_per_pass(batch.tokens.shape[1] - 1, vocab, budget_bytes=budget_bytes) >= n_rows:
        return model.reconstruction_nll(batch, z)
    row_lengths = batch.lengths.repeat(n_rows // len(batch))  # predicted tokens of each row
    order = torch.argsort(row_lengths, stable=True)
    sorted_lengths = row_lengths[order].tolist()
    positions = max(1, budget_bytes // (4 * vocab))  # row × token positions per pass
    rows_done, values = [], []
    start = 0
    while start < n_rows:
        stop = _pass_end(sorted_lengths, start, positions)
        rows = order[start:stop]
        sentences = rows % len(batch)
        lengths = batch.lengths[sentences]
        tokens = batch.tokens[sentences, : sorted_lengths[stop - 1] + 1]
        values.append(model.reconstruction_nll(Batch(tokens, lengths), z[rows]))
        rows_done.append(rows)
        start = stop
    out = torch.empty(n_rows, dtype=values[0].dtype, device=values[0].device)
    out[torch.cat(rows_done)] = torch.cat(values)
    return out


def _pass_end(sorted_lengths: list[int], start: int, positions: int) -> int:
    """The largest ``stop`` > start with (stop − start) · sorted_lengths[stop − 1] ≤ positions
    (at least one row): the product grows with ``stop``, so a binary search finds it."""
    lo, hi = start + 1, len(sorted_lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (mid - start) * sorted_lengths[mid - 1] <= positions:
            lo = mid
        else:
            hi = mid - 1
    return lo


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(total_nll / n_tokens); inf where that overflows (a diverged, still finite model)."""
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate(
    model: SentenceVAE,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    generator: torch.Generator,
    budget_bytes: int = DECODE_BUDGET_BYTES,
) -> dict[str, float]:
    """rec, kl, elbo (β = 1), nll_elbo, ppl, au, mi over all sentences of ``batches``.

    ``rec`` averages ``rec_samples`` posterior samples per sentence (1 for batches ≥ 256);
    ``au`` and ``mi`` use the posteriors of every sentence (see
    :func:`aggregate_mutual_information`), so neither depends on how ``batches`` is cut.
    """
    was_training = model.training
    model.eval()
    # MI draws from its own generator, seeded first, so it does not depend on the batches.
    mi_seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    rec_sum = kl_sum = 0.0
    n_sent = n_tok = 0
    mus, logvars = [], []
    for batch in batches:
        batch = batch.to(device)
        mu, logvar = model.encode(batch)
        k_rec = rec_samples(len(batch))
        z = reparameterize(mu.repeat(k_rec, 1), logvar.repeat(k_rec, 1), generator=generator)
        rec_sum += float(sentence_nll(model, batch, z, budget_bytes=budget_bytes).sum()) / k_rec
        kl_sum += float(gaussian_kl(mu, logvar).sum())
        mus.append(mu)
        logvars.append(logvar)
        n_sent += len(batch)
        n_tok += int(batch.lengths.sum())
    model.train(was_training)
    mu_all, logvar_all = torch.cat(mus), torch.cat(logvars)
    rec, kl = rec_sum / n_sent, kl_sum / n_sent
    return {
        "rec": rec,
        "kl": kl,
        "elbo": -(rec + kl),
        "nll_elbo": rec + kl,
        "ppl": perplexity(rec_sum + kl_sum, n_tok),
        "au": float(active_units(mu_all.cpu())),
        "mi": aggregate_mutual_information(
            mu_all, logvar_all,
            generator=torch.Generator(device=generator.device).manual_seed(mi_seed),
        ),
    }


@torch.no_grad()
def importance_weights(
    model: SentenceVAE,
    batch: Batch,
    *,
    n_samples: int,
    generator: torch.Generator,
    budget_bytes: int = DECODE_BUDGET_BYTES,
) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x), z_k ~ q(z|x): ``[K, B]``.

    All K·B latent samples are drawn at once (so the result does not depend on the memory
    budget); the decoder then runs in passes of :func:`rows_per_pass` rows.
    """
    mu, logvar = model.encode(batch)
    mu_k, logvar_k = mu.repeat(n_samples, 1), logvar.repeat(n_samples, 1)
    z = reparameterize(mu_k, logvar_k, generator=generator)
    log_px_z = -sentence_nll(model, batch, z, budget_bytes=budget_bytes)
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
    log_qz = log_normal(z, mu_k, logvar_k)
    return (log_px_z + log_pz - log_qz).view(n_samples, len(batch))


@torch.no_grad()
def importance_weighted_nll(
    model: SentenceVAE,
    batches: Iterable[Batch],
    *,
    n_samples: int,
    device: torch.device,
    generator: torch.Generator,
    budget_bytes: int = DECODE_BUDGET_BYTES,
) -> dict[str, float]:
    """−log p(x) ≥ estimate with K = ``n_samples`` importance samples from q(z|x).

    log p(x) ≈ logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K. Also returns
    ``iw_gap``: the mean over sentences of (−mean_k log w_k) − (−log p̂(x)) ≥ 0, how much
    tighter than the ELBO (estimated from the same K samples) the bound is.
    """
    was_training = model.training
    model.eval()
    nll_sum = gap_sum = 0.0
    n_sent = n_tok = 0
    for batch in batches:
        batch = batch.to(device)
        log_w = importance_weights(model, batch, n_samples=n_samples, generator=generator,
                                   budget_bytes=budget_bytes)
        log_px = torch.logsumexp(log_w, dim=0) - math.log(n_samples)
        nll_sum -= float(log_px.sum())
        gap_sum += float((log_px - log_w.mean(dim=0)).sum())
        n_sent += len(batch)
        n_tok += int(batch.lengths.sum())
    model.train(was_training)
    return {"iw_nll": nll_sum / n_sent, "iw_ppl": perplexity(nll_sum, n_tok),
            "iw_gap": gap_sum / n_sent}
