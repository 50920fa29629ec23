"""A sentence VAE with GRUs instead of LSTMs: a user's model on klstudy's text loader.

The model factory of ``gru_text.yaml`` (``model: {kind: python, factory: "gru_text:build"}``).
The data is klstudy's own (``data: {kind: ptb | text | toy}``): its batches are
``workers.Batch`` objects — ``tokens`` ``[B, L + 2]`` (``<s> w_1 … w_L </s>`` then ``<pad>``)
and ``lengths`` ``[B]`` (words + 1, the predicted tokens) — and its ``info`` gives
``vocab_size`` and the special ids. klstudy does β, the optimiser, metrics, checkpoints and
tracking; this file is only the network.

- encoder: a GRU reads ``w_1 … w_L </s>``; its state at the last real token → (μ, log σ²);
- decoder: a GRU whose initial state is ``tanh(W z)`` and whose every input is the previous
  word's embedding concatenated with z, word dropout (Bowman et al. 2016: a share of the
  decoder's input words replaced by ``<unk>`` in training, which pushes it towards z), then a
  linear layer to the vocabulary. An autoregressive decoder this strong can model the text
  alone, which is what makes KL vanishing possible.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class GRUTextVAE(nn.Module):
    def __init__(self, *, vocab_size: int, pad_id: int, unk_id: int, emb_dim: int,
                 hidden_dim: int, latent_dim: int, word_dropout: float) -> None:
        super().__init__()
        self.pad_id, self.unk_id, self.word_dropout = pad_id, unk_id, word_dropout
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        self.encoder = nn.GRU(emb_dim, hidden_dim, batch_first=True)
        self.to_stats = nn.Linear(hidden_dim, 2 * latent_dim)
        self.z_to_h = nn.Linear(latent_dim, hidden_dim)
        self.decoder = nn.GRU(emb_dim + latent_dim, hidden_dim, batch_first=True)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def encode(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²), each ``[B, latent_dim]``."""
        outputs, _ = self.encoder(self.embed(batch.tokens[:, 1:]))
        last = (batch.lengths - 1).view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
        mu, logvar = self.to_stats(outputs.gather(1, last).squeeze(1)).chunk(2, dim=-1)
        return mu, logvar

    def reconstruction_nll(self, batch: Any, z: torch.Tensor) -> torch.Tensor:
        """−log p(x|z) in nats per sentence, ``[N]``; z is ``[N, Z]``, N = k·B (sample k of
        sentence i at row k·B + i)."""
        k = z.shape[0] // batch.tokens.shape[0]
        tokens = batch.tokens.repeat(k, 1)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if self.training and self.word_dropout > 0:
            drop = torch.rand(inputs.shape, device=inputs.device) < self.word_dropout
            drop[:, 0] = False  # keep <s>
            inputs = inputs.masked_fill(drop & (inputs != self.pad_id), self.unk_id)
        emb = self.embed(inputs)
        steps = emb.shape[1]
        h0 = torch.tanh(self.z_to_h(z)).unsqueeze(0)
        outputs, _ = self.decoder(torch.cat([emb, z.unsqueeze(1).expand(-1, steps, -1)], -1), h0)
        logits = self.out(outputs)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              ignore_index=self.pad_id, reduction="none")
        return nll.view(targets.shape).sum(dim=1)


def build(info: dict[str, Any], *, emb_dim: int = 64, hidden_dim: int = 128,
          latent_dim: int = 16, word_dropout: float = 0.0) -> GRUTextVAE:
    """The factory: ``info`` is the text loader's (``vocab_size``, ``pad_id``, ``unk_id``)."""
    return GRUTextVAE(vocab_size=info["vocab_size"], pad_id=info["pad_id"],
                      unk_id=info["unk_id"], emb_dim=emb_dim, hidden_dim=hidden_dim,
                      latent_dim=latent_dim, word_dropout=word_dropout)
