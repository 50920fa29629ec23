"""The training loop of one trial: steps, periodic evaluation, checkpoint/resume, a report callback.

``train_trial`` knows nothing about Ray or MLflow. A driver plugs in through ``report``: it is
called after every evaluation (the checkpoint of that step is already on disk) and may return
True to stop the trial there. Resuming from a checkpoint continues bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from workers._config import TrialConfig
from workers._data import Corpus, load_corpus
from workers._metrics import evaluate, importance_weighted_nll
from workers._models import ModelShape, SentenceVAE, gaussian_kl, reparameterize
from workers._schedules import at_beta_max, beta_at, lr_at

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
_CHECKPOINT_FORMAT = 1
_MAX_LATENT_POINTS = 1000
# Fields that may differ between a checkpoint and the config resuming it.
_RESUMABLE_DIFFERENCES = {"device", "num_threads", "trial_id", "total_steps", "eval_every_steps"}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial cannot continue."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or belongs to another configuration."""


@dataclass(frozen=True)
class Evaluation:
    """One evaluation, reported to the callback.

    ``train`` holds ``beta``/``lr`` at ``step`` and the interval means ``loss``/``rec``/``kl``;
    ``valid`` (and ``test`` when ``final``) the metrics of DESIGN §3. ``at_beta_max`` says
    whether ``step`` is in a fixing stage of the β schedule (what schedule-aware pruning needs).
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
    config: TrialConfig
    status: Literal["completed", "stopped"]
    step: int
    evaluations: list[Evaluation] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        """The validation metrics of the last evaluation."""
        return self.evaluations[-1].valid if self.evaluations else {}


def build_model(config: TrialConfig, corpus: Corpus) -> SentenceVAE:
    assert config.emb_dim is not None and config.hidden_dim is not None  # resolved config
    assert config.latent_dim is not None and config.n_layers is not None
    assert config.dropout is not None
    return SentenceVAE(
        ModelShape(
            vocab_size=len(corpus.vocab),
            emb_dim=config.emb_dim,
            hidden_dim=config.hidden_dim,
            latent_dim=config.latent_dim,
            n_layers=config.n_layers,
            dropout=config.dropout,
        )
    )


def load_trial_corpus(config: TrialConfig) -> Corpus:
    return load_corpus(
        config.data,
        path=config.data_path,
        max_length=config.max_length,
        max_train_sentences=config.max_train_sentences,
    )


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

    def __init__(self, config: TrialConfig, corpus: Corpus | None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.corpus = corpus if corpus is not None else load_trial_corpus(config)
        torch.manual_seed(config.seed)
        self.model = build_model(config, self.corpus).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.step = 0
        self._sums = torch.zeros(3, device=self.device)  # loss, rec, kl over the interval
        self._n_steps_in_interval = 0

    # --- one optimisation step -------------------------------------------------------------
    def train_step(self, t: int) -> None:
        c = self.config
        beta = beta_at(t, total_steps=c.total_steps, n_cycles=c.n_cycles, ratio=c.ratio,
                       ramp=c.ramp, beta_max=c.beta_max)
        lr = lr_at(t, lr=c.lr, schedule=c.lr_schedule, total_steps=c.total_steps,
                   n_cycles=c.n_cycles)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.corpus.train_batch(t, batch_size=c.batch_size, seed=c.seed).to(self.device)
        mu, logvar = self.model.encode(batch)
        z = reparameterize(mu, logvar)
        rec = self.model.reconstruction_nll(batch, z).mean()
        kl = gaussian_kl(mu, logvar).mean()
        loss = rec + beta * kl
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"trial {c.trial_id}: loss is {loss.item()} at step {t} "
                f"(rec={rec.item()}, kl={kl.item()}, beta={beta}, lr={lr}); "
                + ("try a smaller lr" if c.grad_clip > 0 else "try a smaller lr or a grad_clip > 0")
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            _clip_grad_norm(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self._sums += torch.stack([loss.detach(), rec.detach(), kl.detach()])
        self._n_steps_in_interval += 1
        self.step = t

    # --- evaluation ------------------------------------------------------------------------
    def _eval_generator(self, salt: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.config.seed * 1_000_003 + self.step * 7 + salt)
        return gen

    def _evaluate_split(self, split: str, *, with_iw: bool) -> dict[str, float]:
        c = self.config
        metrics = evaluate(
            self.model,
            self.corpus.eval_batches(split, batch_size=c.eval_batch_size),
            device=self.device,
            generator=self._eval_generator(salt=1),
        )
        if with_iw and c.iw_samples > 0:
            metrics |= importance_weighted_nll(
                self.model,
                self.corpus.eval_batches(split, batch_size=c.eval_batch_size),
                n_samples=c.iw_samples,
                device=self.device,
                generator=self._eval_generator(salt=2),
            )
        return metrics

    def evaluation(self, *, final: bool, checkpoint: Path | None) -> Evaluation:
        c, t = self.config, self.step
        n = max(self._n_steps_in_interval, 1)
        loss, rec, kl = (self._sums / n).tolist()
        self._sums.zero_()
        self._n_steps_in_interval = 0
        train = {
            "beta": beta_at(t, total_steps=c.total_steps, n_cycles=c.n_cycles, ratio=c.ratio,
                            ramp=c.ramp, beta_max=c.beta_max),
            "lr": lr_at(t, lr=c.lr, schedule=c.lr_schedule, total_steps=c.total_steps,
                        n_cycles=c.n_cycles),
            "loss": loss,
            "rec": rec,
            "kl": kl,
        }
        return Evaluation(
            latents=self._latent_means("valid") if c.latent_dim == 2 else None,
            step=t,
            train=train,
            valid=self._evaluate_split("valid", with_iw=final),
            test=self._evaluate_split("test", with_iw=True) if final else None,
            final=final,
            at_beta_max=at_beta_max(t, total_steps=c.total_steps, n_cycles=c.n_cycles, ratio=c.ratio),
            checkpoint=checkpoint,
        )

    @torch.no_grad()
    def _latent_means(self, split: str) -> list[tuple[float, float]]:
        """E_q[z|x] of up to ``_MAX_LATENT_POINTS`` sentences of a split (for 2-D scatter plots)."""
        was_training = self.model.training
        self.model.eval()
        means = []
        for batch in self.corpus.eval_batches(split, batch_size=self.config.eval_batch_size):
            means.append(self.model.encode(batch.to(self.device))[0].cpu())
            if sum(len(m) for m in means) >= _MAX_LATENT_POINTS:
                break
        self.model.train(was_training)
        return [tuple(row) for row in torch.cat(means)[:_MAX_LATENT_POINTS].tolist()]

    # --- checkpoints -----------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "format": _CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "config": self.config.to_dict(),
        }
        tmp = directory / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, directory / CHECKPOINT_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True))
        return directory

    def restore(self, path: Path) -> None:
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"resume: no checkpoint at {str(file)!r}")
        state = torch.load(file, map_location=self.device, weights_only=True)
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise CheckpointError(f"resume: {str(file)!r} has unknown format {state.get('format')!r}")
        _check_compatible(TrialConfig.from_dict(state["config"]), self.config, file)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.device.type == "cuda" and state["rng_cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
        self.step = int(state["step"])


def _check_compatible(saved: TrialConfig, current: TrialConfig, file: Path) -> None:
    for f in dataclasses.fields(TrialConfig):
        if f.name in _RESUMABLE_DIFFERENCES:
            continue
        old, new = getattr(saved, f.name), getattr(current, f.name)
        if old != new:
            raise CheckpointError(
                f"resume: checkpoint {str(file)!r} was made with {f.name}={old!r}, "
                f"the config asks for {new!r}"
            )


def train_trial(
    config: TrialConfig,
    *,
    report: ReportFn | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    corpus: Corpus | None = None,
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
        corpus: an already loaded corpus for this config's data (saves reloading it).

    Raises:
        NonFiniteLossError: the loss became NaN/inf.
        CheckpointError: ``resume_from`` is missing or made with another configuration.
    """
    config = config.resolved()
    torch.set_num_threads(max(1, config.num_threads))
    trainer = _Trainer(config, corpus)
    if resume_from is not None:
        trainer.restore(Path(resume_from))
        log.info("trial %s resumed at step %d", config.trial_id, trainer.step)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    result = TrialResult(config=config, status="completed", step=trainer.step)
    last_save = time.monotonic()
    for t in range(trainer.step + 1, config.total_steps + 1):
        trainer.train_step(t)
        final = t == config.total_steps
        if t % config.eval_every_steps and not final:
            continue
        saved = None
        if ckpt_dir is not None and (final or time.monotonic() - last_save >= checkpoint_every_s):
            saved, last_save = trainer.save(ckpt_dir), time.monotonic()
        evaluation = trainer.evaluation(final=final, checkpoint=saved)
        result.evaluations.append(evaluation)
        log.info("trial %s step %d valid elbo %.4f", config.trial_id, t, evaluation.valid["elbo"])
        if report is not None and report(evaluation) and not final:
            result.status = "stopped"
            break
    result.step = trainer.step
    return result
