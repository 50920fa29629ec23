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
from typing import Any

import torch

from workers import _models
from workers._data import Batch, fixed_subset
from workers._models import gaussian_kl, log_normal, reparameterize
from workers._plugin_data import to_device

AU_THRESHOLD = 0.01  # variance over x of E_q[z|x] that makes a latent dimension "active"
DECODE_BUDGET_BYTES = 128 * 2**20  # float32 logits of one decoder pass: rows × length × vocab × 4
# A model without reconstruction_nll_within decodes at most this many rows (whole samples of
# the batch, at least one) per call during evaluation and the IW-NLL.
DECODE_ROWS_PER_CALL = 4096
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
    return _models.rows_per_pass(length, vocab_size, budget_bytes=budget_bytes)


def decode_nll(model: torch.nn.Module, batch: Any, z: torch.Tensor, *, n_examples: int,
               budget_bytes: int = DECODE_BUDGET_BYTES) -> torch.Tensor:
    """−log p(x|z) ``[R]`` for ``z`` ``[R, d]`` (R = k·B, sample-major), within memory bounds.

    A model with the contract's optional ``reconstruction_nll_within(batch, z, budget_bytes=)``
    decodes within the byte budget itself (the built-in LSTM packs rows shortest first);
    any other model gets ``reconstruction_nll`` calls of whole samples, at most
    :data:`DECODE_ROWS_PER_CALL` rows each (at least one sample of the batch).
    """
    within = getattr(model, "reconstruction_nll_within", None)
    if within is not None:
        return within(batch, z, budget_bytes=budget_bytes)
    n_rows = z.shape[0]
    per_call = max(1, DECODE_ROWS_PER_CALL // n_examples) * n_examples
    if per_call >= n_rows:
        return model.reconstruction_nll(batch, z)
    return torch.cat([model.reconstruction_nll(batch, z[start:start + per_call])
                      for start in range(0, n_rows, per_call)])


def batch_tokens(batch: Any) -> int | None:
    """Predicted tokens of a klstudy text :class:`Batch` (words + ``</s>``); None otherwise."""
    return int(batch.lengths.sum()) if isinstance(batch, Batch) else None


def perplexity(total_nll: float, n_tokens: float | None) -> float:
    """exp(total_nll / n_tokens); inf where that overflows (a diverged, still finite model);
    NaN when the token count is unknown (None)."""
    if n_tokens is None:
        return math.nan
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    device: torch.device,
    generator: torch.Generator,
    budget_bytes: int = DECODE_BUDGET_BYTES,
    n_tokens: float | None = None,
) -> dict[str, float]:
    """rec, kl, elbo (β = 1), nll_elbo, ppl, au, mi over all examples of ``batches``.

    ``rec`` averages ``rec_samples`` posterior samples per example (1 for batches ≥ 256);
    ``au`` and ``mi`` use the posteriors of every example (see
    :func:`aggregate_mutual_information`), so neither depends on how ``batches`` is cut.
    ``ppl`` divides by ``n_tokens`` when given, else by the tokens of klstudy's text batches
    (:func:`batch_tokens`); it is NaN when neither is known (a user's data without token
    counts).
    """
    was_training = model.training
    model.eval()
    # MI draws from its own generator, seeded first, so it does not depend on the batches.
    mi_seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    rec_sum = kl_sum = 0.0
    n_sent = 0
    counted: int | None = 0
    mus, logvars = [], []
    for batch in batches:
        batch = to_device(batch, device)
        mu, logvar = model.encode(batch)
        size = mu.shape[0]
        k_rec = rec_samples(size)
        z = reparameterize(mu.repeat(k_rec, 1), logvar.repeat(k_rec, 1), generator=generator)
        nll = decode_nll(model, batch, z, n_examples=size, budget_bytes=budget_bytes)
        rec_sum += float(nll.sum()) / k_rec
        kl_sum += float(gaussian_kl(mu, logvar).sum())
        mus.append(mu)
        logvars.append(logvar)
        n_sent += size
        counted = _add_tokens(counted, batch)
    model.train(was_training)
    mu_all, logvar_all = torch.cat(mus), torch.cat(logvars)
    rec, kl = rec_sum / n_sent, kl_sum / n_sent
    return {
        "rec": rec,
        "kl": kl,
        "elbo": -(rec + kl),
        "nll_elbo": rec + kl,
        "ppl": perplexity(rec_sum + kl_sum, n_tokens if n_tokens is not None else counted),
        "au": float(active_units(mu_all.cpu())),
        "mi": aggregate_mutual_information(
            mu_all, logvar_all,
            generator=torch.Generator(device=generator.device).manual_seed(mi_seed),
        ),
    }


@torch.no_grad()
def importance_weights(
    model: torch.nn.Module,
    batch: Any,
    *,
    n_samples: int,
    generator: torch.Generator,
    budget_bytes: int = DECODE_BUDGET_BYTES,
) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x), z_k ~ q(z|x): ``[K, B]``.

    All K·B latent samples are drawn at once (so the result does not depend on the memory
    budget); the decoder then runs in passes (:func:`decode_nll`).
    """
    mu, logvar = model.encode(batch)
    size = mu.shape[0]
    mu_k, logvar_k = mu.repeat(n_samples, 1), logvar.repeat(n_samples, 1)
    z = reparameterize(mu_k, logvar_k, generator=generator)
    log_px_z = -decode_nll(model, batch, z, n_examples=size, budget_bytes=budget_bytes)
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
    log_qz = log_normal(z, mu_k, logvar_k)
    return (log_px_z + log_pz - log_qz).view(n_samples, size)


@torch.no_grad()
def importance_weighted_nll(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    n_samples: int,
    device: torch.device,
    generator: torch.Generator,
    budget_bytes: int = DECODE_BUDGET_BYTES,
    n_tokens: float | None = None,
) -> dict[str, float]:
    """−log p(x) ≥ estimate with K = ``n_samples`` importance samples from q(z|x).

    log p(x) ≈ logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K. Also returns
    ``iw_gap``: the mean over examples of (−mean_k log w_k) − (−log p̂(x)) ≥ 0, how much
    tighter than the ELBO (estimated from the same K samples) the bound is. ``iw_ppl``
    counts tokens as :func:`evaluate` does.
    """
    was_training = model.training
    model.eval()
    nll_sum = gap_sum = 0.0
    n_sent = 0
    counted: int | None = 0
    for batch in batches:
        batch = to_device(batch, device)
        log_w = importance_weights(model, batch, n_samples=n_samples, generator=generator,
                                   budget_bytes=budget_bytes)
        log_px = torch.logsumexp(log_w, dim=0) - math.log(n_samples)
        nll_sum -= float(log_px.sum())
        gap_sum += float((log_px - log_w.mean(dim=0)).sum())
        n_sent += log_w.shape[1]
        counted = _add_tokens(counted, batch)
    model.train(was_training)
    tokens = n_tokens if n_tokens is not None else counted
    return {"iw_nll": nll_sum / n_sent, "iw_ppl": perplexity(nll_sum, tokens),
            "iw_gap": gap_sum / n_sent}


def _add_tokens(counted: int | None, batch: Any) -> int | None:
    tokens = batch_tokens(batch)
    return None if counted is None or tokens is None else counted + tokens
