"""An image VAE with an autoregressive decoder on scikit-learn's 8×8 digits, binarised.

The data and model factories of ``digits_ar.yaml`` (``data: {kind: python, factory:
"digits_ar:load"}``, ``model: {kind: python, factory: "digits_ar:build"}``). The images ship
inside scikit-learn (``sklearn.datasets.load_digits``: 1,797 images, read from the package,
no download); a pixel is 1 when its grey level is ≥ 8 of 16.

- ``load`` returns the contract's mapping: ``train`` / ``valid`` / ``test`` tensors of
  ``[64]`` binary pixels (a fixed-seed split, so every trial sees the same one), and ``info``
  with the image size. Batches are ``torch.utils.data.default_collate`` of the rows: ``[B, 64]``.
- ``build`` returns the VAE: an MLP encoder → (μ, log σ²); the decoder is autoregressive over
  the 64 pixels in raster order (a GRU whose input at pixel j is pixel j − 1 and z, initial
  state ``tanh(W z)``), so p(x|z) = Π_j Bernoulli(x_j | x_<j, z). Such a decoder can model the
  images without z — the image analogue of the text VAE's KL vanishing (PixelVAE, Gulrajani et
  al. 2017; Chen et al. 2017, variational lossy autoencoder).
  ``z_every_step: false`` gives z to the initial state only (a weaker path for z, tried as a
  collapse-prone variant: docs/custom-vae.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

N_PIXELS = 64


def load(*, n_valid: int = 250, n_test: int = 250, threshold: float = 8.0,
         split_seed: int = 0) -> dict[str, Any]:
    """The binarised digits, split into train / valid / test with a fixed seed."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().data, dtype=torch.float32)
    pixels = (images >= threshold).float()
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(split_seed))
    valid, test = order[:n_valid], order[n_valid:n_valid + n_test]
    train = order[n_valid + n_test:]
    return {"train": pixels[train], "valid": pixels[valid], "test": pixels[test],
            "info": {"n_pixels": N_PIXELS}}


class AutoregressiveDigitsVAE(nn.Module):
    def __init__(self, *, n_pixels: int, hidden_dim: int, latent_dim: int,
                 z_every_step: bool = True) -> None:
        super().__init__()
        self.z_every_step = z_every_step
        self.encoder = nn.Sequential(nn.Linear(n_pixels, hidden_dim), nn.ReLU(),
                                     nn.Linear(hidden_dim, 2 * latent_dim))
        self.z_to_h = nn.Linear(latent_dim, hidden_dim)
        self.decoder = nn.GRU(1 + latent_dim * z_every_step, hidden_dim, batch_first=True)
        self.out = nn.Linear(hidden_dim, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z|x), each ``[B, latent_dim]``; x is ``[B, 64]``."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def reconstruction_nll(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """−log p(x|z) in nats per image, ``[N]``; z is ``[N, Z]`` with N = k·B (sample k of
        image i at row k·B + i)."""
        x = x.repeat(z.shape[0] // x.shape[0], 1)
        previous = F.pad(x[:, :-1], (1, 0)).unsqueeze(-1)  # pixel j − 1 (0 before the first)
        inputs = previous
        if self.z_every_step:  # z at every input too, not only in the initial state
            inputs = torch.cat([previous, z.unsqueeze(1).expand(-1, x.shape[1], -1)], dim=-1)
        outputs, _ = self.decoder(inputs, torch.tanh(self.z_to_h(z)).unsqueeze(0))
        logits = self.out(outputs).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)


def build(info: dict[str, Any], *, hidden_dim: int = 64, latent_dim: int = 8,
          z_every_step: bool = True) -> AutoregressiveDigitsVAE:
    """The factory: ``info`` is what ``load`` returned under ``info``."""
    return AutoregressiveDigitsVAE(n_pixels=info["n_pixels"], hidden_dim=hidden_dim,
                                   latent_dim=latent_dim, z_every_step=z_every_step)
