"""One batch on CPU: does a model and data factory pair keep the contract (DESIGN §8)?

``klstudy validate`` (and ``run``, ``train --spec``) call :func:`check_contract` before any
trial starts, so that a broken user module fails in a second with one line naming the spec
key, instead of in every trial of a study. It checks, in order:

1. the data factory imports, is callable, takes ``data.params`` and returns the mapping
   (``train``, ``valid``, ``test`` non-empty; ``collate`` callable; ``info`` a mapping);
2. the model factory imports, is callable, takes ``(info, **model.params)`` and returns an
   ``nn.Module`` with ``encode`` and ``reconstruction_nll``;
3. on the first ``batch_size`` training examples: ``encode(batch)`` gives ``(mu, logvar)``,
   each ``[B, Z]`` with B the number of examples and the same Z, finite;
   ``reconstruction_nll(batch, z)`` gives ``[B]`` for z ``[B, Z]`` and ``[2B]`` for two
   samples (row k·B + i), finite; the loss back-propagates into some trainable parameter;
4. the training batch of step 1 (what the trainer draws) and an evaluation batch of
   ``valid`` pass ``encode`` and ``reconstruction_nll`` with matching shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from workers._config import PluginError, TrialConfig
from workers._models import gaussian_kl, reparameterize
from workers._plugins import build_trial_model, load_trial_data

_KEY = "model.factory"


@dataclass(frozen=True)
class ContractCheck:
    """What the one-batch check saw."""

    n_examples: int  # B of the checked batch
    latent_dim: int  # Z
    loss: float  # rec + KL of that batch (β = 1)
    n_parameters: int  # trainable parameters of the model
    has_tokens: bool  # the data gives token counts (valid and test): PPL can be computed

    def summary(self) -> str:
        return (f"one batch on CPU: encode -> mu, logvar [{self.n_examples}, {self.latent_dim}]"
                f"; reconstruction_nll -> [{self.n_examples}] and [{2 * self.n_examples}] "
                f"(2 samples); loss {self.loss:.4g}; {self.n_parameters:,} trainable parameters")


def check_contract(config: TrialConfig) -> ContractCheck:
    """Build the config's data and model on CPU and run one batch through them.

    Raises:
        PluginError: naming the spec key (``data.factory``, ``data.params``,
            ``model.factory``, ``model.params``) and what was wrong.
        DataError: a built-in corpus is missing or malformed.
    """
    config = dataclasses.replace(config, device="cpu", precision="fp32").resolved()
    torch.manual_seed(config.seed)
    data = load_trial_data(config)
    model = build_trial_model(config, data)
    size = min(config.batch_size, data.n_examples("train"))
    batch = next(iter(data.eval_batches("train", batch_size=size, max_sentences=size)))
    model.train()
    mu, logvar = _encode(model, batch, size, what="the first training examples")
    z = reparameterize(mu, logvar)
    rec = _nll(model, batch, z, size, what="z [B, Z]")
    loss = rec.mean() + gaussian_kl(mu, logvar).mean()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise PluginError(_KEY, "the model has no trainable parameters")
    if not loss.requires_grad:
        raise PluginError(_KEY, "the loss does not depend on any parameter: encode and "
                          "reconstruction_nll must return tensors computed by the model")
    loss.backward()
    if all(p.grad is None for p in trainable):
        raise PluginError(_KEY, "no parameter received a gradient from rec + KL")
    with torch.no_grad():
        _nll(model, batch, torch.cat([z, reparameterize(mu, logvar)]), size,
             what="z [2B, Z] (2 samples per example, row k·B + i)")
        _check_other_batches(model, data, config, latent_dim=mu.shape[1])
    return ContractCheck(n_examples=size, latent_dim=int(mu.shape[1]), loss=float(loss.detach()),
                         n_parameters=sum(p.numel() for p in trainable),
                         has_tokens=all(data.n_tokens(s) is not None for s in ("valid", "test")))


def _check_other_batches(model: torch.nn.Module, data: Any, config: TrialConfig, *,
                         latent_dim: int) -> None:
    """The trainer's step-1 batch and a valid batch (in eval mode) keep the same contract."""
    train = data.train_batch(1, batch_size=config.batch_size, seed=config.seed, device="cpu")
    mu, logvar = _encode(model, train, None, what="the training batch of step 1")
    _nll(model, train, reparameterize(mu, logvar), int(mu.shape[0]),
         what="the training batch of step 1")
    model.eval()
    n_valid = min(config.eval_batch_size, data.n_examples("valid"), 8)
    valid = next(iter(data.eval_batches("valid", batch_size=n_valid, max_sentences=n_valid)))
    mu, logvar = _encode(model, valid, n_valid, what="a valid batch (eval mode)")
    if mu.shape[1] != latent_dim:
        raise PluginError(_KEY, f"encode gives Z = {latent_dim} on training data but "
                          f"{mu.shape[1]} on valid data")
    _nll(model, valid, mu, n_valid, what="a valid batch (eval mode)")
    model.train()


def _encode(model: torch.nn.Module, batch: Any, size: int | None, *,
            what: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        out = model.encode(batch)
    except Exception as exc:
        raise PluginError(_KEY, f"encode(batch) raised {type(exc).__name__}: {exc} "
                          f"(on {what})") from exc
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(t, torch.Tensor) for t in out)):
        raise PluginError(_KEY, "encode(batch) must return (mu, logvar), two tensors, got "
                          f"{_shape_of(out)}")
    mu, logvar = out
    b = size if size is not None else mu.shape[0] if mu.dim() else 0
    if mu.dim() != 2 or tuple(mu.shape) != tuple(logvar.shape) or mu.shape[0] != b:
        raise PluginError(_KEY, f"encode(batch) must return mu and logvar of shape [B, Z] with "
                          f"B = {b} examples, got {_shape_of(mu)} and {_shape_of(logvar)} "
                          f"(on {what})")
    if not mu.is_floating_point() or not logvar.is_floating_point():
        raise PluginError(_KEY, f"encode(batch) must return floating-point tensors, got "
                          f"{mu.dtype} and {logvar.dtype}")
    _finite(mu, "encode(batch) mu", what)
    _finite(logvar, "encode(batch) logvar", what)
    return mu, logvar


def _nll(model: torch.nn.Module, batch: Any, z: torch.Tensor, size: int, *,
         what: str) -> torch.Tensor:
    n = z.shape[0]
    try:
        out = model.reconstruction_nll(batch, z)
    except Exception as exc:
        raise PluginError(_KEY, f"reconstruction_nll(batch, z) raised {type(exc).__name__}: "
                          f"{exc} (z {_shape_of(z)}, {what})") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n,):
        raise PluginError(_KEY, f"reconstruction_nll(batch, z) must return a tensor [N] = [{n}] "
                          f"(N = {n // size} sample(s) x B = {size}: nats per example), got "
                          f"{_shape_of(out)} ({what})")
    _finite(out, "reconstruction_nll(batch, z)", what)
    return out


def _finite(t: torch.Tensor, name: str, what: str) -> None:
    bad = int((~torch.isfinite(t.detach())).sum())
    if bad:
        raise PluginError(_KEY, f"{name} has {bad} non-finite value(s) (NaN or inf) of "
                          f"{t.numel()} ({what})")


def _shape_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {list(value.shape)}" if value.dim() else f"a scalar ({value.item():g})"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: " + ", ".join(
            _shape_of(v) for v in value[:3])
    return f"a {type(value).__name__}"
