"""``klstudy train``: one trial, no Ray, printing each evaluation as it goes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from study._cli_base import UserError

# A killed `klstudy train --out DIR` loses at most this much training (plus the final step is
# always saved); a large text model's checkpoint takes ~1 s to write.
_CHECKPOINT_EVERY_S = 30.0


# --- klstudy train ----------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one trial (no Ray), printing each evaluation",
                       description="Train one trial without Ray, printing each evaluation; "
                       "--json prints the final validation metrics as the last line.")
    p.add_argument("--model", choices=["toy", "lstm_text"], default="toy",
                   help="the VAE: the paper's toy (2-layer LSTM 64, z in R^2) or a text VAE")
    p.add_argument("--data", default="toy",
                   help="toy | ptb | a directory of train/valid/test .txt")
    p.add_argument("--n-cycles", type=int, default=4, help="M, number of β cycles")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="R, proportion of a cycle spent ramping")
    p.add_argument("--ramp", choices=["linear", "sigmoid", "cosine"], default="linear",
                   help="f, the shape of β's ramp from 0 to β_max")
    p.add_argument("--beta-max", type=float, default=1.0, help="β in the fixing stage")
    p.add_argument("--total-steps", type=int, default=4000, help="T, optimizer steps")
    p.add_argument("--seed", type=int, default=0,
                   help="initialisation and data order (evaluation has its own seeded stream)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 10 (toy), 32 (text)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--lr-schedule", choices=["constant", "cyclical_cosine"], default="constant",
                   help="cyclical_cosine restarts a cosine decay with each β cycle")
    p.add_argument("--grad-clip", type=float, default=5.0,
                   help="max L2 norm of the gradient (0: no clipping)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps; default: total/10 (intermediate ones on 250 valid sentences)")
    p.add_argument("--iw-samples", type=int, default=100,
                   help="K of the final IW-NLL (within a budget of T*batch/4 rows); 0 skips")
    p.add_argument("--max-train-sentences", type=int, default=None,
                   help="use only the first N training sentences (default: all)")
    p.add_argument("--max-vocab", type=int, default=None,
                   help="keep the most frequent train words (4 specials included)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest for the toy; try 2-4 for lstm_text)")
    p.add_argument("--out", type=Path, default=None, help="directory for checkpoint and results")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint file or directory")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON, last")
    p.set_defaults(handler=_cmd_train)


def _train_config(args: argparse.Namespace):  # -> TrialConfig
    from workers import ConfigError, TrialConfig

    if args.data in ("toy", "ptb"):
        data, data_path = args.data, None
    else:
        data, data_path = "text", str(args.data)
        if not Path(data_path).is_dir():
            raise UserError("--data: must be toy, ptb or an existing directory, "
                            f"got {args.data!r}")
    text_model = args.model == "lstm_text"
    config = TrialConfig(
        model=args.model,
        data=data,
        data_path=data_path,
        max_train_sentences=args.max_train_sentences, max_vocab=args.max_vocab,
        total_steps=args.total_steps,
        batch_size=args.batch_size or (32 if text_model else 10),
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        grad_clip=args.grad_clip,
        n_cycles=args.n_cycles,
        ratio=args.ratio,
        ramp=args.ramp,
        beta_max=args.beta_max,
        eval_every_steps=args.eval_every or max(1, args.total_steps // 10),
        eval_batch_size=256,
        iw_samples=args.iw_samples,
        seed=args.seed,
        device=args.device,
        num_threads=args.threads,
        trial_id=f"train-seed{args.seed}",
    )
    try:
        config.check()
    except ConfigError as exc:
        raise UserError(f"--{exc.field.replace('_', '-')}: {exc.message}") from None
    return config


def _format_mi(mi: float) -> str:
    """I(z; x) ≥ 0; its Monte-Carlo estimate (He et al. 2019) scatters around 0 when z carries
    nothing, so a negative estimate is shown as ``~0`` (``--json`` keeps the estimate)."""
    return "~0" if mi < 0 else f"{mi:.3f}"


def _format_evaluation(ev, total_steps: int) -> str:
    v, t = ev.valid, ev.train
    line = (
        f"step {ev.step:>{len(str(total_steps))}}/{total_steps}  beta {t['beta']:.3f}  "
        f"loss {t['loss']:.3f}  valid: rec {v['rec']:.3f} kl {v['kl']:.3f} elbo {v['elbo']:.3f} "
        f"ppl {v['ppl']:.2f} au {v['au']:.0f} mi {_format_mi(v['mi'])}"
    )
    if "iw_nll" in v:
        line += f" iw_nll {v['iw_nll']:.3f}"
    return line


def _cmd_train(args: argparse.Namespace) -> int:
    from workers import CheckpointError, DataError, train_trial

    config = _train_config(args)
    out: Path | None = args.out
    history = []

    def report(ev) -> None:
        print(_format_evaluation(ev, config.total_steps), flush=True)
        history.append({"step": ev.step, **ev.flat()})

    try:
        result = train_trial(config, report=report, checkpoint_dir=out, resume_from=args.resume,
                             checkpoint_every_s=_CHECKPOINT_EVERY_S)
    except (DataError, CheckpointError) as exc:
        raise UserError(str(exc)) from None
    if not result.evaluations:
        raise UserError(f"--resume: the checkpoint is already at step {result.step} of "
                        f"--total-steps {config.total_steps}; nothing left to train")
    final = dict(result.final)
    if out is not None:
        mode = "a" if args.resume is not None else "w"  # a resumed run extends its history
        with open(out / "evaluations.jsonl", mode) as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        (out / "final.json").write_text(json.dumps(final, indent=2))
        timing = {"train_s": result.train_s, "eval_s": result.eval_s,
                  "checkpoint_s": result.checkpoint_s}
        (out / "timing.json").write_text(json.dumps(timing, indent=2))
    if args.json:
        print(json.dumps(final))
    return 0
