"""The training loop of one trial: steps, periodic evaluation, checkpoint/resume, a callback.

``train_trial`` knows nothing about Ray or MLflow. A driver plugs in through ``report``: it is
called after every evaluation (the checkpoint of that step is already on disk) and may return
True to stop the trial there. Resuming from a checkpoint continues bit-for-bit on CPU, and on
CUDA with ``deterministic`` (without it, within float rounding: see README, GPU workers).

A training step never waits for the device: the loss is checked for NaN/inf once per
evaluation (the interval's summed loss is then non-finite), not per step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from workers._checkpoint import (  # noqa: F401 - CHECKPOINT_FILE, CONFIG_FILE re-exported
    CHECKPOINT_FILE,
    CONFIG_FILE,
    CheckpointError,
    read_checkpoint,
    write_checkpoint,
)
from workers._config import TrialConfig
from workers._device import (
    autocast,
    configure_runtime,
    make_optimizer,
    restore_rng_state,
    rng_state,
)
from workers._metrics import evaluate, importance_weighted_nll, perplexity
from workers._models import gaussian_kl, reparameterize
from workers._plugin_data import TrialData
from workers._plugins import build_trial_model, load_trial_data
from workers._schedules import beta_at, fixing_stage_eval, lr_at

log = logging.getLogger(__name__)

_MAX_LATENT_POINTS = 1000  # 2-D latent scatter: a fixed-seed sample of this many valid sentences
# The final IW-NLL decodes at most this share of training's T × B sentence rows (half on valid,
# half on test): one evaluation row costs ~1/3 of a training row, so ≈ 8% of the training time.
IW_ROW_SHARE = 0.25


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial cannot continue."""


@dataclass(frozen=True)
class Evaluation:
    """One evaluation, reported to the callback.

    ``train`` holds ``beta``/``lr`` at ``step`` and the interval means ``loss``/``rec``/``kl``;
    ``valid`` (and ``test`` when ``final``) the metrics of DESIGN §3. ``at_beta_max`` says
    whether this evaluation stands for a fixing stage of the β schedule
    (:func:`workers.fixing_stage_eval`: β = β_max, or the last evaluation of a cycle that has
    none at β_max), what schedule-aware pruning needs. Intermediate ``valid`` metrics are over
    the fixed-seed subset of ``eval_subset_sentences`` sentences, final ones over every sentence.
    """

    step: int
    train: dict[str, float]
    valid: dict[str, float]
    test: dict[str, float] | None
    final: bool
    at_beta_max: bool
    checkpoint: Path | None
    latents: list[tuple[float, float]] | None = None  # 2-D models: valid posterior means

    def flat(self) -> dict[str, float]:
        """``{"train/loss": …, "valid/elbo": …, "test/…": …}`` for loggers."""
        out: dict[str, float] = {}
        for split, metrics in (("train", self.train), ("valid", self.valid), ("test", self.test)):
            for name, value in (metrics or {}).items():
                out[f"{split}/{name}"] = value
        return out


ReportFn = Callable[[Evaluation], "bool | None"]


@dataclass
class TrialResult:
    """How a trial ended; ``*_s`` are wall seconds spent training, evaluating, checkpointing."""

    config: TrialConfig
    status: Literal["completed", "stopped"]
    step: int
    evaluations: list[Evaluation] = field(default_factory=list)
    train_s: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        """The validation metrics of the last evaluation."""
        return self.evaluations[-1].valid if self.evaluations else {}


def build_model(config: TrialConfig, data: TrialData) -> torch.nn.Module:
    """The trial's model from its factory (:func:`workers._plugins.build_trial_model`)."""
    return build_trial_model(config, data)


def load_trial_corpus(config: TrialConfig) -> TrialData:
    """The trial's data from its factory (:func:`workers._plugins.load_trial_data`)."""
    return load_trial_data(config)


def kl_term(mu: torch.Tensor, logvar: torch.Tensor, *, free_bits: float) -> torch.Tensor:
    """The KL term that is trained: the batch mean of KL(q(z|x) ‖ N(0, I)), or with free
    bits λ > 0 (Kingma et al. 2016, per latent dimension) Σ_d max(λ, batch-mean KL_d)."""
    if free_bits <= 0.0:
        return gaussian_kl(mu, logvar).mean()
    per_dim = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).mean(dim=0)
    return torch.clamp(per_dim, min=free_bits).sum()


@torch.no_grad()
def _clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` (L2 norm) with less overhead.

    When every gradient has the same device and dtype (always, for SentenceVAE) this runs the
    very kernels torch runs, in the same order (per-tensor foreach norms, the norm of their
    stack, the clamped coefficient, a foreach multiply), so the result is bit-identical; it only
    skips torch's per-call grouping by device and dtype (~40% of its cost on the toy model).
    Anything else goes to torch.
    """
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    device, dtype = grads[0].device, grads[0].dtype
    if any(g.device != device or g.dtype != dtype or g.is_sparse for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))


class _Trainer:
    """State of one running trial: model, optimizer, step; ``train_trial`` drives it."""

    def __init__(self, config: TrialConfig, corpus: TrialData | None,
                 device: torch.device | None = None) -> None:
        self.config = config
        self.device = device if device is not None else torch.device(config.device)
        self.data = corpus if corpus is not None else load_trial_data(config)
        torch.manual_seed(config.seed)
        self.model = build_trial_model(config, self.data).to(self.device)
        # the latent dimension, once a training step has shown it (built-ins: the config's)
        self.latent_dim: int | None = config.latent_dim
        self.optimizer = make_optimizer(self.model.parameters(), config, self.device)
        self.step = 0
        self._sums = torch.zeros(3, device=self.device)  # loss, rec, kl over the interval
        self._n_steps_in_interval = 0

    @property
    def corpus(self) -> TrialData:  # the name before user data sets (tests, benches)
        return self.data

    # --- one optimisation step -------------------------------------------------------------
    def beta(self, t: int) -> float:
        c = self.config
        return beta_at(t, total_steps=c.total_steps, n_cycles=c.n_cycles, ratio=c.ratio,
                       ramp=c.ramp, beta_max=c.beta_max, beta_min=c.beta_min)

    def lr(self, t: int) -> float:
        c = self.config
        return lr_at(t, lr=c.lr, schedule=c.lr_schedule, total_steps=c.total_steps,
                     n_cycles=c.lr_cycles)

    def train_step(self, t: int) -> None:
        c = self.config
        beta, lr = self.beta(t), self.lr(t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.data.train_batch(t, batch_size=c.batch_size, seed=c.seed,
                                      device=self.device)
        with autocast(c, self.device):  # bf16: the forward pass only; KL and loss in fp32
            mu, logvar = self.model.encode(batch)
            mu, logvar = mu.float(), logvar.float()
            z = reparameterize(mu, logvar)
            rec = self.model.reconstruction_nll(batch, z).float().mean()
        self.latent_dim = mu.shape[-1]
        kl = gaussian_kl(mu, logvar).mean()  # the true KL: what is reported
        loss = rec + beta * (kl_term(mu, logvar, free_bits=c.free_bits) if c.free_bits > 0
                             else kl)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            _clip_grad_norm(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self._sums += torch.stack([loss.detach(), rec.detach(), kl.detach()])
        self._n_steps_in_interval += 1
        self.step = t

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` when a loss since the last evaluation was NaN/inf.

        A non-finite loss makes the interval's sum non-finite (losses are ≥ 0, so no inf − inf
        can hide one); checking it here, once per evaluation, keeps every step free of host
        syncs. The error names the interval, since the step itself is not recorded.
        """
        sums = self._sums.tolist()
        if all(math.isfinite(v) for v in sums):
            return
        c, first = self.config, self.step - self._n_steps_in_interval + 1
        lr = self.lr(self.step)
        raise NonFiniteLossError(
            f"trial {c.trial_id}: loss is {sums[0]} in steps {first}–{self.step} (summed since "
            f"the last evaluation: rec={sums[1]}, kl={sums[2]}; beta_max={c.beta_max}, "
            f"lr={lr}); "
            + ("try a smaller lr" if c.grad_clip > 0 else "try a smaller lr or a grad_clip > 0")
        )

    # --- evaluation ------------------------------------------------------------------------
    def _eval_generator(self, salt: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.config.seed * 1_000_003 + self.step * 7 + salt)
        return gen

    def _evaluate_split(self, split: str, *, final: bool) -> dict[str, float]:
        """DESIGN §3 metrics of a split: intermediate ones on the fixed-seed subset of
        ``eval_subset_sentences``, final ones on every sentence, plus the IW-NLL."""
        c = self.config
        subset = None if final else c.eval_subset_sentences
        metrics = evaluate(
            self.model,
            self.data.eval_batches(split, batch_size=c.eval_batch_size, device=self.device,
                                   max_sentences=subset),
            device=self.device,
            generator=self._eval_generator(salt=1),
            n_tokens=self.data.n_tokens(split, subset),
        )
        if final and c.iw_samples > 0:
            metrics |= self._iw_nll(split, metrics)
        return metrics

    def _iw_nll(self, split: str, metrics: dict[str, float]) -> dict[str, float]:
        """iw_nll/iw_ppl of a whole split, within the IW budget (:func:`iw_sentences`).

        On the whole split: the direct K-sample estimate. On a fixed-seed subset: the split's
        −ELBO minus the subset's mean gap between its K-sample −ELBO and IW estimates (a
        difference estimator: the gap varies far less between sentences than the NLL does).
        """
        c = self.config
        n_split = self.data.n_examples(split)
        n_iw = iw_sentences(c, n_split)
        iw = importance_weighted_nll(
            self.model,
            self.data.eval_batches(split, batch_size=c.eval_batch_size, max_sentences=n_iw,
                                   device=self.device),
            n_samples=c.iw_samples,
            device=self.device,
            generator=self._eval_generator(salt=2),
            n_tokens=self.data.n_tokens(split, n_iw),
        )
        if n_iw >= n_split:
            return {"iw_nll": iw["iw_nll"], "iw_ppl": iw["iw_ppl"]}
        nll = metrics["nll_elbo"] - iw["iw_gap"]
        return {"iw_nll": nll, "iw_ppl": perplexity(nll * n_split, self.data.n_tokens(split))}

    def evaluation(self, *, final: bool, checkpoint: Path | None) -> Evaluation:
        c, t = self.config, self.step
        n = max(self._n_steps_in_interval, 1)
        loss, rec, kl = (self._sums / n).tolist()
        self._sums.zero_()
        self._n_steps_in_interval = 0
        train = {
            "beta": self.beta(t),
            "lr": self.lr(t),
            "loss": loss,
            "rec": rec,
            "kl": kl,
        }
        return Evaluation(
            latents=self._latent_means("valid") if self.latent_dim == 2 else None,
            step=t,
            train=train,
            valid=self._evaluate_split("valid", final=final),
            test=self._evaluate_split("test", final=True) if final else None,
            final=final,
            at_beta_max=fixing_stage_eval(t, total_steps=c.total_steps, n_cycles=c.n_cycles,
                                          ratio=c.ratio, eval_every_steps=c.eval_every_steps),
            checkpoint=checkpoint,
        )

    @torch.no_grad()
    def _latent_means(self, split: str) -> list[tuple[float, float]]:
        """E_q[z|x] of a fixed-seed random sample of ``_MAX_LATENT_POINTS`` sentences of a split
        (all when fewer), the same sentences in the same order at every evaluation."""
        was_training = self.model.training
        self.model.eval()
        batches = self.data.eval_batches(split, batch_size=self.config.eval_batch_size,
                                         max_sentences=_MAX_LATENT_POINTS, device=self.device)
        means = [self.model.encode(batch)[0].cpu() for batch in batches]
        self.model.train(was_training)
        return [tuple(row) for row in torch.cat(means).tolist()]

    # --- checkpoints -----------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        state = {"step": self.step, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), **rng_state(self.device)}
        return write_checkpoint(directory, state, self.config)

    def restore(self, path: Path) -> None:
        # Read on CPU: load_state_dict copies parameters and Adam moments onto this device.
        state = read_checkpoint(path, self.config)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state, self.device)
        self.step = int(state["step"])


def iw_sentences(config: TrialConfig, n_split: int) -> int:
    """Sentences of one split the final IW pass decodes, K times each: all of them when
    ``n_split`` · K fits half of ``IW_ROW_SHARE`` · T · B, else a fixed-seed subset that fits
    (at least one sentence)."""
    budget_rows = IW_ROW_SHARE * config.total_steps * config.batch_size / 2
    return max(1, min(n_split, int(budget_rows // max(1, config.iw_samples))))


def _add_elapsed(result: TrialResult, name: str, since: float) -> float:
    now = time.perf_counter()
    setattr(result, name, getattr(result, name) + now - since)
    return now


def train_trial(
    config: TrialConfig,
    *,
    report: ReportFn | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    corpus: TrialData | None = None,
    checkpoint_every_s: float = 0.0,
) -> TrialResult:
    """Train one trial to ``total_steps``, evaluating every ``eval_every_steps``.

    Args:
        config: the trial config; it is resolved here (model defaults, device).
        report: called with each :class:`Evaluation`; returning True stops the trial.
        checkpoint_dir: where a checkpoint is written before a report (overwritten).
        checkpoint_every_s: write it only when this many seconds passed since the last one
            (and always at the final step); 0 checkpoints at every evaluation.
        resume_from: a checkpoint file or directory to continue from.
        corpus: this config's data, already loaded (saves reloading it).

    Raises:
        NonFiniteLossError: the loss became NaN/inf.
        CheckpointError: ``resume_from`` is missing or made with another configuration.
        PluginError: the model or data factory breaks the contract (DESIGN §8).
    """
    config = config.resolved()
    trainer = _Trainer(config, corpus, configure_runtime(config))
    if resume_from is not None:
        trainer.restore(Path(resume_from))
        log.info("trial %s resumed at step %d", config.trial_id, trainer.step)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    result = TrialResult(config=config, status="completed", step=trainer.step)
    last_save = time.monotonic()
    clock = time.perf_counter()
    for t in range(trainer.step + 1, config.total_steps + 1):
        trainer.train_step(t)
        final = t == config.total_steps
        if t % config.eval_every_steps and not final:
            continue
        trainer.check_finite()  # the interval's first host sync
        clock = _add_elapsed(result, "train_s", clock)
        saved = None
        if ckpt_dir is not None and (final or time.monotonic() - last_save >= checkpoint_every_s):
            saved, last_save = trainer.save(ckpt_dir), time.monotonic()
            clock = _add_elapsed(result, "checkpoint_s", clock)
        evaluation = trainer.evaluation(final=final, checkpoint=saved)
        clock = _add_elapsed(result, "eval_s", clock)
        result.evaluations.append(evaluation)
        log.info("trial %s step %d valid elbo %.4f", config.trial_id, t, evaluation.valid["elbo"])
        stop = report is not None and report(evaluation) and not final
        clock = time.perf_counter()  # the report's own time (e.g. logging) counts nowhere
        if stop:
            result.status = "stopped"
            break
    result.step = trainer.step
    return result
