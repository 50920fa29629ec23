"""Evaluation metrics of DESIGN §3: rec, kl, elbo, nll_elbo, ppl, au, mi, iw_nll, iw_ppl.

Every metric is a mean per sentence except the perplexities, which divide by the number of
predicted tokens (words plus ``</s>``). Sampling uses a caller-given generator so that an
evaluation never disturbs the training RNG (needed for bit-for-bit resume).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from workers._data import Batch
from workers._models import SentenceVAE, gaussian_kl, log_normal, reparameterize

AU_THRESHOLD = 0.01  # variance over x of E_q[z|x] that makes a latent dimension "active"
_REC_SAMPLE_BUDGET = 256  # decoder passes per evaluation batch for Rec (see rec_samples)
_MI_SAMPLE_BUDGET = 2048  # posterior samples per evaluation batch for the MI estimate


def active_units(means: torch.Tensor, *, threshold: float = AU_THRESHOLD) -> int:
    """Number of dimensions whose variance over sentences of the posterior mean ≥ threshold.

    Args:
        means: ``[N, D]`` posterior means E_q[z|x], one row per sentence.
    """
    if means.shape[0] < 2:
        return 0
    return int((means.var(dim=0, unbiased=False) >= threshold).sum().item())


def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> float:
    """I_q(z; x) ≈ E[log q(z|x)] − E[log q(z)] on one batch (He et al. 2019).

    q(z) is the mixture of the batch's posteriors. ``z`` is ``[n, d]`` (``z[i]`` a sample of
    q(z|x_i)) or ``[k, n, d]`` (k samples each, averaged: less noise on small batches).
    """
    n, d = mu.shape
    neg_entropy = (-0.5 * d * math.log(2 * math.pi) - 0.5 * (1.0 + logvar).sum(dim=-1)).mean()
    log_q_each = log_normal(z.unsqueeze(-2), mu, logvar)  # [..., n, n]: sample i under posterior j
    log_qz = torch.logsumexp(log_q_each, dim=-1) - math.log(n)
    return float(neg_entropy - log_qz.mean())


def rec_samples(batch_size: int) -> int:
    """Posterior samples per sentence for Rec: 1 on real evaluation batches, up to 16 on tiny
    ones (the toy's 10 sentences), where one sample each makes the ELBO too noisy to compare."""
    return max(1, min(16, math.ceil(_REC_SAMPLE_BUDGET / batch_size)))


def mi_samples(batch_size: int) -> int:
    """Posterior samples per sentence for MI: more on small batches (≈ 2048 pairs, 1 to 32)."""
    return max(1, min(32, math.ceil(_MI_SAMPLE_BUDGET / batch_size)))


def perplexity(total_nll: float, n_tokens: int) -> float:
    return math.exp(total_nll / n_tokens)


@torch.no_grad()
def evaluate(
    model: SentenceVAE,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    generator: torch.Generator,
) -> dict[str, float]:
    """rec, kl, elbo (β = 1), nll_elbo, ppl, au, mi over all sentences of ``batches``.

    ``rec`` averages ``rec_samples`` posterior samples per sentence (1 for batches ≥ 256); MI
    uses ``mi_samples`` per sentence with the aggregate posterior formed over each evaluation
    batch, and is averaged over batches by size.
    """
    was_training = model.training
    model.eval()
    rec_sum = kl_sum = mi_sum = 0.0
    n_sent = n_tok = 0
    means = []
    for batch in batches:
        batch = batch.to(device)
        mu, logvar = model.encode(batch)
        k_rec = rec_samples(len(batch))
        z = reparameterize(mu.repeat(k_rec, 1), logvar.repeat(k_rec, 1), generator=generator)
        rec_sum += float(model.reconstruction_nll(batch, z).sum()) / k_rec
        kl_sum += float(gaussian_kl(mu, logvar).sum())
        k = mi_samples(len(batch))
        z_mi = reparameterize(mu.expand(k, -1, -1), logvar.expand(k, -1, -1), generator=generator)
        mi_sum += mutual_information(mu, logvar, z_mi) * len(batch)
        means.append(mu.cpu())
        n_sent += len(batch)
        n_tok += int(batch.lengths.sum())
    model.train(was_training)
    rec, kl = rec_sum / n_sent, kl_sum / n_sent
    return {
        "rec": rec,
        "kl": kl,
        "elbo": -(rec + kl),
        "nll_elbo": rec + kl,
        "ppl": perplexity(rec_sum + kl_sum, n_tok),
        "au": float(active_units(torch.cat(means))),
        "mi": mi_sum / n_sent,
    }


@torch.no_grad()
def importance_weighted_nll(
    model: SentenceVAE,
    batches: Iterable[Batch],
    *,
    n_samples: int,
    device: torch.device,
    generator: torch.Generator,
    samples_per_pass: int = 50,
) -> dict[str, float]:
    """−log p(x) ≥ estimate with K = ``n_samples`` importance samples from q(z|x).

    log p(x) ≈ logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K.
    """
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    n_sent = n_tok = 0
    for batch in batches:
        batch = batch.to(device)
        mu, logvar = model.encode(batch)
        log_w = []
        for start in range(0, n_samples, samples_per_pass):
            k = min(samples_per_pass, n_samples - start)
            mu_k, logvar_k = mu.repeat(k, 1), logvar.repeat(k, 1)
            z = reparameterize(mu_k, logvar_k, generator=generator)
            log_px_z = -model.reconstruction_nll(batch, z)
            log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
            log_qz = log_normal(z, mu_k, logvar_k)
            log_w.append((log_px_z + log_pz - log_qz).view(k, len(batch)))
        log_px = torch.logsumexp(torch.cat(log_w), dim=0) - math.log(n_samples)
        nll_sum -= float(log_px.sum())
        n_sent += len(batch)
        n_tok += int(batch.lengths.sum())
    model.train(was_training)
    return {"iw_nll": nll_sum / n_sent, "iw_ppl": perplexity(nll_sum, n_tok)}
