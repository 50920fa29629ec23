"""How much of a trial's wall time goes to evaluation, IW-NLL and checkpoints (goal ≤ 20%).

Three parts, each in a fresh child process (so that its peak RSS is its own):

1. **Every spec in examples/** (its first grid trial, CPU, one torch thread), measured by parts:
   the mean training step, one intermediate evaluation, the final evaluation (valid + test,
   every sentence), the final IW-NLL with the spec's K over the sentences the IW budget gives
   at the spec's own T, and one checkpoint. Specs whose trials are short (the toy ones) are
   also run in full with ``workers.train_trial`` (checkpoint every 30 s, as the Ray trainable
   does). Long specs (PTB: 52,600 steps) are *projected*: ``--spec-steps`` training steps are
   timed and the share is computed for the spec's T with its evaluation interval and IW
   settings unchanged; the IW time is timed on ``--iw-probe`` sentences per split and scaled
   by the number of sentences the budget gives (IW time is linear in sentences × K).
2. **`klstudy train` with default flags** (the toy, 4,000 steps), run for real through the CLI
   with ``--out`` (so it also checkpoints and writes timing.json).
3. **`klstudy train --model lstm_text --data DIR --total-steps 200`**, default flags (+ ``--out``),
   on a generated corpus of ~40k sentences and ~28k words (Zipf-like word frequencies, gamma
   sentence lengths of mean ≈ 21 words, seeded), against the same run with one plain final
   evaluation (``--eval-every 200 --iw-samples 0``), run once before and once after it (the
   ratio uses their mean). Goals: ≤ 1.5× its wall time, peak RSS ≤ 3 GiB.

Run from the repository root:
``python bench/eval_overhead.py [--out bench/results/eval_overhead.md]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, command_line, environment_line, markdown_table, write_output

GIB = 2**30
_CHECKPOINT_EVERY_S = 30.0  # what workers._trainable and `klstudy train` use
_FULL_RUN_MAX_STEPS = 5_000  # specs up to this T are also run in full


# --- the generated corpus ----------------------------------------------------------------------
def write_corpus(root: Path, *, n_sentences: int = 40_000, vocab_size: int = 30_000,
                 seed: int = 0) -> Path:
    """Zipf-like (s = 1.05) words over ``vocab_size`` types, gamma(4, 5.2) lengths in 1–82;
    1/13 of the sentences each for valid and test (≈ 33.8k / 3.1k / 3.1k, ≈ 28.3k word types
    in train)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab_size + 1) ** 1.05
    lengths = np.clip(np.round(rng.gamma(4.0, 5.2, size=n_sentences)), 1, 82).astype(int)
    words = np.array([f"w{i}" for i in range(vocab_size)])[
        rng.choice(vocab_size, size=int(lengths.sum()), p=p / p.sum())]
    ends = np.cumsum(lengths)
    lines = [" ".join(words[end - n:end]) for n, end in zip(lengths, ends, strict=True)]
    n_eval = n_sentences // 13
    splits = {"valid": lines[:n_eval], "test": lines[n_eval : 2 * n_eval],
              "train": lines[2 * n_eval :]}
    root.mkdir(parents=True, exist_ok=True)
    for split, split_lines in splits.items():
        (root / f"{split}.txt").write_text("\n".join(split_lines) + "\n", encoding="utf-8")
    return root


# --- children ----------------------------------------------------------------------------------
def _child(argv: list[str]) -> dict[str, Any]:
    """Run this script (or the CLI) in a fresh process; its JSON result plus peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited with {proc.returncode}")
    lines = stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {**result, "wall_s": time.perf_counter() - started,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss * 1024 / GIB}


def _measure_spec(spec_path: str, *, spec_steps: int, iw_probe: int) -> dict[str, Any]:
    """In the child: time the parts of the spec's first trial, project the share at its T."""
    import torch

    from study._spec import load_spec
    from workers._metrics import importance_weighted_nll
    from workers._trainer import _Trainer, iw_sentences, train_trial

    torch.set_num_threads(1)
    spec = load_spec(spec_path)
    config = dataclasses.replace(spec.grid_configs()[0], device="cpu", num_threads=1).resolved()
    trainer = _Trainer(config, None)
    n_steps = min(spec_steps, config.total_steps)
    trainer.train_step(1)  # warm-up
    started = time.perf_counter()
    for t in range(2, n_steps + 1):
        trainer.train_step(t)
    step_s = (time.perf_counter() - started) / max(1, n_steps - 1)
    mid_s = _timed(lambda: trainer.evaluation(final=False, checkpoint=None))
    trainer.config = dataclasses.replace(config, iw_samples=0)
    final_s = _timed(lambda: trainer.evaluation(final=True, checkpoint=None))
    trainer.config = config
    iw_s, iw_n = 0.0, {}
    for split in ("valid", "test") if config.iw_samples else ():
        n_iw = iw_sentences(config, trainer.corpus.n_sentences(split))
        probe = min(n_iw, iw_probe)
        batches = trainer.corpus.eval_batches(split, batch_size=config.eval_batch_size,
                                              max_sentences=probe)
        seconds = _timed(lambda b=batches: importance_weighted_nll(
            trainer.model, b, n_samples=config.iw_samples, device=trainer.device,
            generator=torch.Generator().manual_seed(0)))
        iw_s += seconds * n_iw / probe
        iw_n[split] = f"{n_iw}/{trainer.corpus.n_sentences(split)}"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_s = _timed(lambda: trainer.save(Path(tmp)))
        full = None
        if config.total_steps <= _FULL_RUN_MAX_STEPS:
            result = train_trial(config, checkpoint_dir=Path(tmp) / "full",
                                 checkpoint_every_s=_CHECKPOINT_EVERY_S)
            full = {"train_s": result.train_s, "eval_s": result.eval_s,
                    "checkpoint_s": result.checkpoint_s}
    n_evals = len({*range(config.eval_every_steps, config.total_steps + 1,
                          config.eval_every_steps), config.total_steps})
    train_total = step_s * config.total_steps
    n_ckpt = min(n_evals, 1 + math.floor(train_total / _CHECKPOINT_EVERY_S))
    overhead = (n_evals - 1) * mid_s + final_s + iw_s + n_ckpt * ckpt_s
    return {"spec": spec_path, "T": config.total_steps, "eval_every": config.eval_every_steps,
            "n_evals": n_evals, "K": config.iw_samples, "iw_sentences": iw_n,
            "step_s": step_s, "mid_s": mid_s, "final_s": final_s, "iw_s": iw_s,
            "ckpt_s": ckpt_s, "n_ckpt": n_ckpt, "timed_steps": n_steps,
            "projected": {"train_s": train_total, "overhead_s": overhead}, "full": full}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _cli_run(argv: list[str], out: Path) -> dict[str, Any]:
    result = _child([sys.executable, "-m", "study.cli", "train", *argv, "--out", str(out)])
    timing = json.loads((out / "timing.json").read_text())
    return {**result, **timing}


# --- tables ------------------------------------------------------------------------------------
def _share(overhead_s: float, train_s: float) -> str:
    return f"{100 * overhead_s / (overhead_s + train_s):.1f}%"


def _spec_row(r: dict[str, Any]) -> list[object]:
    iw = ", ".join(f"{k} {v}" for k, v in r["iw_sentences"].items()) or "—"
    if r["full"] is not None:
        f = r["full"]
        train, ev, ck = f["train_s"], f["eval_s"], f["checkpoint_s"]
        basis = "measured: the whole trial"
    else:
        train = r["projected"]["train_s"]
        ev = (r["n_evals"] - 1) * r["mid_s"] + r["final_s"] + r["iw_s"]
        ck = r["n_ckpt"] * r["ckpt_s"]
        basis = (f"projected to T from {r['timed_steps']} timed steps ({r['step_s']:.3f} s each), "
                 f"1 intermediate eval ({r['mid_s']:.1f} s), the final eval "
                 f"({r['final_s']:.1f} s), IW scaled from a probe ({r['iw_s']:.0f} s), "
                 f"{r['n_ckpt']} checkpoints × {r['ckpt_s']:.2f} s")
    return [f"`{r['spec']}`", r["T"], r["n_evals"], f"K {r['K']}; {iw}", f"{train:.1f}",
            f"{ev:.1f}", f"{ck:.1f}", f"**{_share(ev + ck, train)}**",
            f"{r['peak_rss_gib']:.2f}", basis]


def _cli_row(name: str, r: dict[str, Any]) -> list[object]:
    ev, ck = r["eval_s"], r["checkpoint_s"]
    return [name, f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}", f"{r['train_s']:.1f}", f"{ev:.1f}",
            f"{ck:.1f}",
            f"**{_share(ev + ck, r['train_s'])}**", f"{r['peak_rss_gib']:.2f}"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--specs", nargs="*", default=None, help="default: examples/*.yaml")
    p.add_argument("--spec-steps", type=int, default=30, help="timed training steps per spec")
    p.add_argument("--iw-probe", type=int, default=8, help="IW sentences timed per split")
    p.add_argument("--text-steps", type=int, default=200, help="T of the lstm_text CLI runs")
    p.add_argument("--skip-text", action="store_true", help="skip part 3 (the longest)")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.child_spec:
        print(json.dumps(_measure_spec(args.child_spec, spec_steps=args.spec_steps,
                                       iw_probe=args.iw_probe)))
        return
    load_start = os.getloadavg()[0]
    specs = args.specs if args.specs is not None else sorted(
        str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "examples").glob("*.yaml"))
    me = [sys.executable, str(Path(__file__).resolve())]
    spec_rows = []
    for spec in specs:
        print(f"spec {spec} …", file=sys.stderr, flush=True)
        r = _child([*me, "--child-spec", spec, "--spec-steps", str(args.spec_steps),
                    "--iw-probe", str(args.iw_probe)])
        spec_rows.append(_spec_row(r))
    with tempfile.TemporaryDirectory(prefix="klstudy-eval-overhead-") as tmp:
        print("klstudy train (toy defaults) …", file=sys.stderr, flush=True)
        toy = _cli_run(["--threads", "1"], Path(tmp) / "toy")
        text_rows, ratio = [], None
        if not args.skip_text:
            data = write_corpus(Path(tmp) / "corpus")
            base = ["--model", "lstm_text", "--data", str(data),
                    "--total-steps", str(args.text_steps), "--threads", "1"]
            plain_argv = [*base, "--eval-every", str(args.text_steps), "--iw-samples", "0"]
            runs = []  # baseline, default, baseline: drift of the machine's load hits both
            for i, (name, argv) in enumerate([("baseline (1st)", plain_argv),
                                              ("default flags", base),
                                              ("baseline (2nd)", plain_argv)]):
                print(f"klstudy train lstm_text, {name} …", file=sys.stderr, flush=True)
                runs.append((name, _cli_run(argv, Path(tmp) / f"run{i}")))
            plain_wall = (runs[0][1]["wall_s"] + runs[2][1]["wall_s"]) / 2
            plain_cpu = (runs[0][1]["cpu_s"] + runs[2][1]["cpu_s"]) / 2
            ratio = (runs[1][1]["wall_s"] / plain_wall, runs[1][1]["cpu_s"] / plain_cpu)
            text_rows = [_cli_row(name, r) for name, r in runs]
    report = _report(args, spec_rows, toy, text_rows, ratio, load_start)
    print(report)
    write_output(args.out, report)


def _report(args, spec_rows, toy, text_rows, ratio, load_start) -> str:
    spec_headers = ["spec (first trial)", "T", "evaluations", "IW: K; sentences per split",
                    "train s", "eval + IW s", "checkpoint s", "share (goal ≤ 20%)",
                    "peak RSS GiB", "basis"]
    cli_headers = ["run", "wall s", "CPU s", "train s", "eval + IW s", "checkpoint s",
                   "eval + IW + ckpt share", "peak RSS GiB"]
    lines = [
        "# Evaluation overhead: training vs evaluation + IW-NLL + checkpoints",
        "",
        f"Command: `{command_line()}`  ",
        f"{environment_line()}; one torch thread per run; 1-min load average {load_start:.1f} at "
        f"the start, {os.getloadavg()[0]:.1f} at the end (the machine is shared).",
        "",
        "## Example specs (their first grid trial, CPU)",
        "",
        markdown_table(spec_headers, spec_rows),
        "",
        "## `klstudy train` with default flags (toy, 4,000 steps; `--out` so it checkpoints)",
        "",
        markdown_table(cli_headers[:1] + cli_headers[1:], [_cli_row("`klstudy train`", toy)]),
    ]
    if text_rows:
        lines += [
            "",
            f"## `klstudy train --model lstm_text --data DIR --total-steps {args.text_steps}`",
            "",
            "Generated corpus: 40,000 sentences (33,848 train / 3,076 valid / 3,076 test), "
            "≈ 28.3k word types in train, Zipf-like (s = 1.05), mean length ≈ 21 words, "
            "seed 0. Both runs with `--out DIR` (checkpoints, timing.json).",
            "",
            markdown_table(cli_headers, text_rows),
            "",
            "Baseline = the same command with `--eval-every "
            f"{args.text_steps} --iw-samples 0` (one plain final evaluation), run before and "
            "after the default one.  ",
            f"Default ÷ mean of the two baselines: wall time **{ratio[0]:.2f}×**, CPU time "
            f"**{ratio[1]:.2f}×** (goal ≤ 1.5×; CPU time is the steadier measure on a shared "
            "machine); peak RSS goal ≤ 3 GiB.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
