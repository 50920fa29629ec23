"""The LSTM sentence VAE used for both the paper's toy problem and the PTB experiments.

Encoder: an LSTM reads ``w_1 … w_L </s>``; its top-layer output at the last real token gives
(μ, log σ²) of a diagonal Gaussian q(z|x). Decoder (Bowman et al. 2016 / sa-vae): an LSTM whose
initial hidden state is a linear map of z and whose every input embedding is concatenated with z,
with dropout on its inputs and outputs. Padding never enters a loss: targets at ``<pad>`` are ignored.

It is built like any user's model (DESIGN §8): :func:`build_sentence_vae` is the factory of the
built-in kinds ``toy`` and ``lstm_text`` (``build(info, **params)``), and the model has
``encode`` and ``reconstruction_nll``. It also has the contract's optional
``reconstruction_nll_within`` (decoding within a memory budget), which evaluation uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers._data import PAD_ID, Batch

_INIT_RANGE = 0.1  # U(−0.1, 0.1) initialisation of every parameter, as in sa-vae / the paper's code
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    emb_dim: int
    hidden_dim: int
    latent_dim: int
    n_layers: int
    dropout: float


class SentenceVAE(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        s = shape
        self.enc_emb = nn.Embedding(s.vocab_size, s.emb_dim, padding_idx=PAD_ID)
        self.encoder = nn.LSTM(s.emb_dim, s.hidden_dim, num_layers=s.n_layers, batch_first=True)
        self.to_stats = nn.Linear(s.hidden_dim, 2 * s.latent_dim)
        self.dec_emb = nn.Embedding(s.vocab_size, s.emb_dim, padding_idx=PAD_ID)
        self.z_to_h0 = nn.Linear(s.latent_dim, s.n_layers * s.hidden_dim)
        self.decoder = nn.LSTM(
            s.emb_dim + s.latent_dim, s.hidden_dim, num_layers=s.n_layers, batch_first=True
        )
        self.drop = nn.Dropout(s.dropout)
        self.out = nn.Linear(s.hidden_dim, s.vocab_size)
        for p in self.parameters():
            nn.init.uniform_(p, -_INIT_RANGE, _INIT_RANGE)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z|x), each ``[B, latent_dim]``."""
        words = batch.tokens[:, 1:]  # w_1 … w_L </s> <pad>…
        outputs, _ = _lstm(self.encoder, self.enc_emb(words))
        last = (batch.lengths - 1).view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
        h = outputs.gather(1, last).squeeze(1)
        mu, logvar = self.to_stats(h).chunk(2, dim=-1)
        return mu, logvar

    def reconstruction_nll(self, batch: Batch, z: torch.Tensor) -> torch.Tensor:
        """−log p(x|z) per sentence, ``[N]``, summed over the |x| predicted tokens.

        ``z`` is ``[N, latent_dim]`` with N a multiple of B: sample k of sentence i is row k·B + i.
        """
        n_rep = z.shape[0] // len(batch)
        tokens = batch.tokens.repeat(n_rep, 1) if n_rep > 1 else batch.tokens
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        emb = self.drop(self.dec_emb(inputs))
        steps = emb.shape[1]
        dec_in = torch.cat([emb, z.unsqueeze(1).expand(-1, steps, -1)], dim=-1)
        s = self.shape
        h0 = self.z_to_h0(z).view(-1, s.n_layers, s.hidden_dim).transpose(0, 1).contiguous()
        h0 = h0.to(dec_in.dtype)  # bf16 autocast: Linear gives bf16, the LSTM casts its inputs
        outputs, _ = _lstm(self.decoder, dec_in, (h0, torch.zeros_like(h0)))
        logits = self.out(self.drop(outputs))
        nll = F.cross_entropy(
            logits.reshape(-1, s.vocab_size), targets.reshape(-1), ignore_index=PAD_ID, reduction="none"
        )
        return nll.view(targets.shape).sum(dim=1)


    def reconstruction_nll_within(self, batch: Batch, z: torch.Tensor, *,
                                  budget_bytes: int) -> torch.Tensor:
        """:meth:`reconstruction_nll` decoded in passes whose logits fit ``budget_bytes``."""
        return packed_nll(self, batch, z, budget_bytes=budget_bytes)


def build_sentence_vae(info: Mapping[str, Any], *, emb_dim: int, hidden_dim: int,
                       latent_dim: int, n_layers: int, dropout: float) -> SentenceVAE:
    """The model factory of the built-in kinds (``toy``, ``lstm_text``): ``info`` is the
    corpus's (``vocab_size``), the sizes come from the resolved trial config."""
    return SentenceVAE(ModelShape(vocab_size=int(info["vocab_size"]), emb_dim=emb_dim,
                                  hidden_dim=hidden_dim, latent_dim=latent_dim,
                                  n_layers=n_layers, dropout=dropout))


def rows_per_pass(length: int, vocab_size: int, *, budget_bytes: int) -> int:
    """Decoder rows whose float32 logits (rows × length × vocab × 4 bytes) fit the budget (≥ 1)."""
    return max(1, budget_bytes // (4 * length * vocab_size))


def packed_nll(model: SentenceVAE, batch: Batch, z: torch.Tensor, *,
               budget_bytes: int) -> torch.Tensor:
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


def _lstm(
    lstm: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``lstm(x, state)``; under CPU bf16 autocast the LSTM itself runs in fp32.

    oneDNN has no bf16 LSTM on CPUs without AVX512-BF16 (it fails to build the primitive), so
    CPU autocast covers the linear layers (above all the output projection) and not the LSTMs.
    On CUDA autocast decides.
    """
    if x.device.type == "cpu" and _cpu_autocast():
        with torch.autocast("cpu", enabled=False):
            return lstm(x.float(), None if state is None else (state[0].float(), state[1].float()))
    return lstm(x, state)


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per row, analytic."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=-1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, diag σ²), summed over the last dimension (broadcasting)."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(dim=-1)
