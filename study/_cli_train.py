"""``klstudy train``: one trial, no Ray, printing each evaluation as it goes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from study._cli_base import UserError

# A killed `klstudy train --out DIR` loses at most this much training (plus the final step is
# always saved); a large text model's checkpoint takes ~1 s to write.
_CHECKPOINT_EVERY_S = 30.0


# --- klstudy train ----------------------------------------------------------------------------
# Defaults without --spec; with --spec every unset flag takes the spec's value (an axis: its
# first value).
_DEFAULTS = {"n_cycles": 4, "ratio": 0.5, "ramp": "linear", "beta_max": 1.0, "beta_min": 0.0,
             "free_bits": 0.0, "lr_n_cycles": None, "total_steps": 4000, "seed": 0,
             "lr": 1e-3, "lr_schedule": "constant", "grad_clip": 5.0, "iw_samples": 100}
# The flags that choose the model or the data: with --spec, the spec's own are trained.
_WHAT_FLAGS = {"model": "--model", "data": "--data",
               "max_train_sentences": "--max-train-sentences", "max_vocab": "--max-vocab"}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one trial (no Ray), printing each evaluation",
                       description="Train one trial without Ray, printing each evaluation; "
                       "--json prints the final validation metrics as the last line. With "
                       "--spec, every flag left unset takes the spec's value (an axis: its "
                       "first value); the defaults shown apply without --spec.")
    d = _DEFAULTS
    p.add_argument("--spec", type=Path, default=None,
                   help="train one trial of this study spec (any model kind, a user's factory "
                   "too); the flags below override its values, axes default to their first")
    p.add_argument("--model", choices=["toy", "lstm_text"], default=None,
                   help="without --spec: the paper's toy (2-layer LSTM 64, z in R^2) or a text "
                   "VAE (default: toy)")
    p.add_argument("--data", default=None,
                   help="without --spec: toy | ptb | a directory of train/valid/test .txt "
                   "(default: toy)")
    p.add_argument("--n-cycles", type=int, default=None,
                   help=f"M, number of β cycles (default: {d['n_cycles']})")
    p.add_argument("--ratio", type=float, default=None,
                   help=f"R, proportion of a cycle spent ramping (default: {d['ratio']})")
    p.add_argument("--ramp", choices=["linear", "sigmoid", "cosine"], default=None,
                   help=f"f, the shape of β's ramp (default: {d['ramp']})")
    p.add_argument("--beta-max", type=float, default=None,
                   help=f"β in the fixing stage (default: {d['beta_max']})")
    p.add_argument("--beta-min", type=float, default=None,
                   help=f"where each β ramp starts (default: {d['beta_min']:g})")
    p.add_argument("--free-bits", type=float, default=None,
                   help=f"free bits λ, nats per latent dimension (default: {d['free_bits']:g}: "
                   "off)")
    p.add_argument("--total-steps", type=int, default=None,
                   help=f"T, optimizer steps (default: {d['total_steps']})")
    p.add_argument("--seed", type=int, default=None,
                   help="initialisation and data order; evaluation has its own seeded stream "
                   f"(default: {d['seed']})")
    p.add_argument("--batch-size", type=int, default=None, help="default: 10 (toy), 32 (text)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam's learning rate (default: {d['lr']:g})")
    p.add_argument("--lr-schedule", choices=["constant", "cyclical_cosine"], default=None,
                   help="cyclical_cosine restarts a cosine decay with each learning-rate cycle "
                   f"(default: {d['lr_schedule']})")
    p.add_argument("--lr-n-cycles", type=int, default=None,
                   help="cycles of a cyclical_cosine learning rate (default: M)")
    p.add_argument("--grad-clip", type=float, default=None,
                   help=f"max L2 norm of the gradient, 0: no clipping (default: {d['grad_clip']:g})")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps; default: total/10 (intermediate ones on 250 valid sentences)")
    p.add_argument("--iw-samples", type=int, default=None,
                   help="K of the final IW-NLL (within a budget of T*batch/4 rows); 0 skips "
                   f"(default: {d['iw_samples']})")
    p.add_argument("--max-train-sentences", type=int, default=None,
                   help="use only the first N training sentences (default: all)")
    p.add_argument("--max-vocab", type=int, default=None,
                   help="keep the most frequent train words (4 specials included)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest for the toy; try 2-4 for lstm_text)")
    p.add_argument("--out", type=Path, default=None, help="directory for checkpoint and results")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint file or directory")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON, last")
    p.set_defaults(handler=_cmd_train)


def _flag_values(args: argparse.Namespace) -> dict:
    """The trial config fields the command line sets (flags left unset are absent)."""
    names = {"n_cycles": "n_cycles", "ratio": "ratio", "ramp": "ramp", "beta_max": "beta_max",
             "beta_min": "beta_min", "free_bits": "free_bits", "total_steps": "total_steps",
             "seed": "seed", "batch_size": "batch_size", "lr": "lr",
             "lr_schedule": "lr_schedule", "lr_n_cycles": "lr_n_cycles",
             "grad_clip": "grad_clip", "eval_every": "eval_every_steps",
             "iw_samples": "iw_samples", "threads": "num_threads"}
    return {field: getattr(args, flag) for flag, field in names.items()
            if getattr(args, flag) is not None}


def _builtin_base(args: argparse.Namespace):  # -> TrialConfig
    from workers import TrialConfig

    data = args.data or "toy"
    if data in ("toy", "ptb"):
        data_path = None
    else:
        data, data_path = "text", str(args.data)
        if not Path(data_path).is_dir():
            raise UserError("--data: must be toy, ptb or an existing directory, "
                            f"got {args.data!r}")
    model = args.model or "toy"
    return TrialConfig(model=model, data=data, data_path=data_path,
                       max_train_sentences=args.max_train_sentences, max_vocab=args.max_vocab,
                       batch_size=32 if model == "lstm_text" else 10, eval_batch_size=256,
                       num_threads=1, **_DEFAULTS)


def _spec_base(args: argparse.Namespace):  # -> TrialConfig
    from study._spec import SpecError, load_spec

    given = [flag for field, flag in _WHAT_FLAGS.items() if getattr(args, field) is not None]
    if given:
        raise UserError(f"{given[0]}: not used with --spec (the spec's model and data are "
                        f"trained), got {getattr(args, given[0][2:].replace('-', '_'))!r}")
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        raise UserError(str(exc)) from None
    from study.cli import _check_factories

    _check_factories(spec)
    return spec.base_config()


def _train_config(args: argparse.Namespace):  # -> TrialConfig
    from workers import ConfigError

    base = _spec_base(args) if args.spec is not None else _builtin_base(args)
    values = _flag_values(args)
    total = values.get("total_steps", base.total_steps)
    if "eval_every_steps" not in values and (args.spec is None or "total_steps" in values):
        values["eval_every_steps"] = max(1, total // 10)
    seed = values.get("seed", base.seed)
    config = dataclasses.replace(base, **values, device=args.device,
                                 trial_id=f"train-seed{seed}")
    try:
        config.check()
    except ConfigError as exc:
        flag = {"eval_every_steps": "eval-every", "num_threads": "threads"}.get(exc.field,
                                                                                  exc.field)
        raise UserError(f"--{flag.replace('_', '-')}: {exc.message}") from None
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
    from workers import CheckpointError, DataError, PluginError, train_trial

    config = _train_config(args)
    out: Path | None = args.out
    history = []

    def report(ev) -> None:
        print(_format_evaluation(ev, config.total_steps), flush=True)
        history.append({"step": ev.step, **ev.flat()})

    try:
        result = train_trial(config, report=report, checkpoint_dir=out, resume_from=args.resume,
                             checkpoint_every_s=_CHECKPOINT_EVERY_S)
    except (DataError, CheckpointError, PluginError) as exc:
        raise UserError(str(exc)) from None
    if not result.evaluations:
        raise UserError(f"--resume: the checkpoint is already at step {result.step} of "
                        f"--total-steps {config.total_steps}; nothing left to train")
    # a metric the data cannot give (PPL without token counts) is NaN: null in JSON
    final = {k: None if isinstance(v, float) and math.isnan(v) else v
             for k, v in result.final.items()}
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
