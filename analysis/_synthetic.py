"""Synthetic studies: a study directory (and optionally an MLflow store) with realistic curves.

For tests, the report's own demo and ``bench/report.py``: no training, but the same layout and
record schema the study driver writes (``workers._records``), the same MLflow layout (parent
run, one nested child run per trial with the resolved config as params and ``split/metric``
metrics at optimizer steps) and plausible numbers for the paper's toy problem (10 sequences, so
−ELBO approaches log 10 ≈ 2.30 nats; more cycles and shorter ramps keep more KL).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers._config import TrialConfig
from workers._records import (
    EVAL_COLUMNS,
    LATENT_COLUMNS,
    METRIC_COLUMNS,
    TRIAL_COLUMNS,
    config_columns,
)
from workers._schedules import at_beta_max, beta_at

DEFAULT_GRID: Mapping[str, Sequence[Any]] = {
    "n_cycles": (1, 2, 4, 8),
    "ratio": (0.25, 0.5, 0.75, 1.0),
    "ramp": ("linear",),
    "beta_max": (1.0,),
}
EVAL_EVERY_STEPS = 50
_LOG10 = math.log(10.0)  # −ELBO of a perfect toy model: which of the 10 sequences
_N_TOKENS = 11  # toy sentence: 10 tokens + </s>
_TRIALS_PER_PART = 50
_MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
_VALID_KEYS = ("rec", "kl", "elbo", "nll_elbo", "ppl", "au", "mi")
_IW_KEYS = ("iw_nll", "iw_ppl")


@dataclass
class _Trial:
    config: TrialConfig
    status: str
    steps: np.ndarray  # evaluation steps actually reached
    train: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    test: dict[str, float] | None  # final evaluation only
    latents: np.ndarray | None  # (n_evals, 10, 2)
    error: str | None = None


def write_synthetic_study(
    study_dir: str | Path,
    *,
    n_trials: int,
    n_evals: int,
    seed: int = 0,
    tracking_uri: str | None = None,
    grid: Mapping[str, Sequence[Any]] = DEFAULT_GRID,
    name: str | None = None,
    n_running: int = 0,
    p_pruned: float = 0.15,
    p_error: float = 0.02,
    spec: Mapping[str, Any] | None = None,
) -> None:
    """Write a synthetic study directory and, with ``tracking_uri``, the same data to MLflow.

    Args:
        study_dir: created if missing; receives study.json, evaluations/, latents/, trials.parquet.
        n_trials: trials over the grid, seed-major (every config gets seed 0 before any gets
            seed 1).
        n_evals: evaluations of a trial that runs to the end (every 50 optimizer steps).
        seed: of the random curves, prunings and errors.
        tracking_uri: also log parent + child runs there (batched ``log_batch`` calls).
        grid: axes ``n_cycles``, ``ratio``, ``ramp``, ``beta_max`` and optionally
            ``lr_schedule`` (default constant).
        name: the study (and experiment) name; default the directory name.
        n_running: the last this many trials are still running (half their evaluations), and the
            study is marked running.
        p_pruned, p_error: chances that a trial was pruned / failed part-way.
        spec: extra keys of the spec recorded in study.json (e.g. ``objective``, ``pruning``).
    """
    if n_trials < 1 or n_evals < 1:
        raise ValueError(f"n_trials and n_evals must be at least 1, got {n_trials=}, {n_evals=}")
    root = Path(study_dir)
    name = name or root.name
    rng = np.random.default_rng(seed)
    trials = [
        _make_trial(config, n_evals, rng, running=i >= n_trials - n_running,
                    p_pruned=p_pruned, p_error=p_error)
        for i, config in enumerate(_configs(name, n_trials, n_evals, grid))
    ]
    run_ids = _log_mlflow(tracking_uri, name, trials) if tracking_uri else ({}, None, None)
    _write_parquet(root, name, trials, run_ids[0])
    meta = {
        "name": name, "spec": {"name": name, "schedule": {k: list(v) for k, v in grid.items()},
                               "synthetic": True, **(spec or {})},
        "tracking_uri": tracking_uri, "experiment_name": name, "experiment_id": run_ids[2],
        "parent_run_id": run_ids[1], "status": "running" if n_running else "finished",
        "n_trials": n_trials, "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": None if n_running else "2026-01-01T01:00:00+00:00",
    }
    (root / "study.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def _configs(name: str, n_trials: int, n_evals: int,
             grid: Mapping[str, Sequence[Any]]) -> list[TrialConfig]:
    axes = (grid["n_cycles"], grid["ratio"], grid["ramp"], grid["beta_max"],
            grid.get("lr_schedule", ("constant",)))
    points = list(itertools.product(*axes))
    configs = []
    for index in range(n_trials):
        m, r, ramp, b, lr = points[index % len(points)]
        s = index // len(points)
        lr_tag = "" if lr == "constant" else f"-{lr}"
        configs.append(TrialConfig(
            model="toy", data="toy", total_steps=n_evals * EVAL_EVERY_STEPS,
            eval_every_steps=EVAL_EVERY_STEPS, n_cycles=int(m), ratio=float(r), ramp=ramp,
            beta_max=float(b), lr_schedule=lr, seed=s, device="cpu",
            trial_id=f"t{index:04d}-M{m}-R{r:g}-{ramp}-b{b:g}{lr_tag}-s{s}",
        ).resolved())
    return configs


def _make_trial(c: TrialConfig, n_evals: int, rng: np.random.Generator, *, running: bool,
                p_pruned: float, p_error: float) -> _Trial:
    steps = np.arange(1, n_evals + 1) * EVAL_EVERY_STEPS
    u = rng.random()
    status, error, n_reached = "completed", None, n_evals
    if running:
        status, n_reached = "running", max(1, n_evals // 2)
    elif u < p_error and n_evals >= 2:  # fails before its last evaluation
        status, n_reached = "error", int(rng.integers(1, n_evals))
        error = (f"NonFiniteLossError: trial {c.trial_id}: loss is nan at step "
                 f"{steps[n_reached - 1]}")
    elif u < p_error + p_pruned and n_evals >= 4:
        status, n_reached = "pruned", int(rng.integers(n_evals // 4, 3 * n_evals // 4 + 1))
    steps = steps[:max(1, n_reached)]
    train, valid = _curves(c, steps, rng)
    final = status == "completed"
    test = None
    if final:
        for key, value in _iw(valid["nll_elbo"][-1], valid["kl"][-1]).items():
            valid[key] = np.append(np.full(len(steps) - 1, np.nan), value)
        shift = 0.03 + 0.01 * rng.standard_normal()
        test = {k: float(valid[k][-1]) for k in _VALID_KEYS}
        nll = test["nll_elbo"] + shift
        test.update(rec=test["rec"] + shift, elbo=-nll, nll_elbo=nll,
                    ppl=math.exp(nll / _N_TOKENS))
        test.update(_iw(test["nll_elbo"], test["kl"]))
    latents = _latents(valid["kl"], steps, c.total_steps, rng) if c.seed == 0 else None
    return _Trial(c, status, steps, train, valid, test, latents, error)


def _curves(c: TrialConfig, steps: np.ndarray,
            rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train/valid metric curves: rec falls with training, KL rises as β falls within a cycle."""
    beta = np.array([beta_at(int(t), total_steps=c.total_steps, n_cycles=c.n_cycles, ratio=c.ratio,
                             ramp=c.ramp, beta_max=c.beta_max) for t in steps])
    low_beta = 1.0 - beta / c.beta_max
    kl_inf = (0.3 + 0.35 * math.log2(c.n_cycles) + 0.3 * (1 - c.ratio)) / math.sqrt(c.beta_max)
    kl_inf = min(2.2, kl_inf)
    kl_inf *= math.exp(0.05 * rng.standard_normal())
    gap = 0.25 + 0.15 / math.sqrt(c.n_cycles) + 0.1 * abs(c.ratio - 0.5)
    gap += 0.02 * rng.standard_normal()
    rec_inf = max(0.05, _LOG10 + gap - kl_inf)
    decay = np.exp(-6.0 * steps / c.total_steps)
    n = len(steps)
    kl = kl_inf * (1 - 0.8 * decay) * (1 + 0.6 * low_beta) + 0.02 * rng.standard_normal(n)
    rec = rec_inf + 2.5 * decay - 0.4 * low_beta * kl_inf + 0.02 * rng.standard_normal(n)
    kl, rec = np.maximum(0.0, kl), np.maximum(0.01, rec)
    train = {"beta": beta, "lr": np.full(n, c.lr), "loss": rec + beta * kl, "rec": rec, "kl": kl}
    v_rec = rec + 0.05 + 0.01 * rng.standard_normal(n)
    v_kl = np.maximum(0.0, kl * 0.98 + 0.01 * rng.standard_normal(n))
    nll = v_rec + v_kl
    valid = {"rec": v_rec, "kl": v_kl, "elbo": -nll, "nll_elbo": nll,
             "ppl": np.exp(nll / _N_TOKENS),
             "au": np.where(v_kl > 0.6, 2.0, np.where(v_kl > 0.15, 1.0, 0.0)),
             "mi": np.minimum(v_kl, _LOG10) * (0.85 + 0.02 * rng.standard_normal(n))}
    return train, valid


def _iw(nll: float, kl: float) -> dict[str, float]:
    iw_nll = float(nll - 0.15 * kl)
    return {"iw_nll": iw_nll, "iw_ppl": math.exp(iw_nll / _N_TOKENS)}


def _latents(kl: np.ndarray, steps: np.ndarray, total_steps: int,
             rng: np.random.Generator) -> np.ndarray:
    """Posterior means of the 10 toy sequences: a ring that opens up as KL grows."""
    angle = 2 * math.pi * np.arange(10) / 10
    opening = 0.3 + 0.7 * (1 - np.exp(-4 * steps / total_steps))
    radius = (np.sqrt(np.maximum(kl, 0.0)) * opening)[:, None]
    noise = 0.05 * rng.standard_normal((len(steps), 10, 2))
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1) + noise


# --- Parquet ---------------------------------------------------------------------------------
def _eval_columns(study: str, t: _Trial) -> dict[str, np.ndarray | list]:
    """The EVAL_COLUMNS of one trial as column arrays (train rows, valid rows, test row)."""
    c, n = t.config, len(t.steps)
    nan = np.full(n, np.nan)
    blocks = [("train", t.steps, {k: t.train.get(k, nan) for k in METRIC_COLUMNS})]
    valid = {k: t.valid.get(k, nan) for k in METRIC_COLUMNS}
    valid.update(beta=t.train["beta"], lr=t.train["lr"])
    blocks.append(("valid", t.steps, valid))
    if t.test is not None:
        test = {k: np.array([t.test.get(k, math.nan)]) for k in METRIC_COLUMNS}
        test.update(beta=t.train["beta"][-1:], lr=t.train["lr"][-1:])
        blocks.append(("test", t.steps[-1:], test))
    cols: dict[str, Any] = {name: [] for name in EVAL_COLUMNS}
    for split, steps, metrics in blocks:
        k = len(steps)
        for name, value in config_columns(c).items():
            cols[name].append(np.full(k, value, dtype=object if isinstance(value, str) else None))
        cols["study"].append(np.full(k, study, dtype=object))
        cols["trial_id"].append(np.full(k, c.trial_id, dtype=object))
        cols["step"].append(steps)
        cols["split"].append(np.full(k, split, dtype=object))
        cols["final"].append(steps == c.total_steps)
        cols["at_beta_max"].append(np.array([
            at_beta_max(int(s), total_steps=c.total_steps, n_cycles=c.n_cycles, ratio=c.ratio)
            for s in steps]))
        for name in METRIC_COLUMNS:
            cols[name].append(np.asarray(metrics[name], dtype=float))
    return {name: np.concatenate(parts) for name, parts in cols.items()}


def _write_parquet(root: Path, study: str, trials: list[_Trial], run_ids: dict[str, str]) -> None:
    (root / "evaluations").mkdir(parents=True, exist_ok=True)
    (root / "latents").mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, len(trials), _TRIALS_PER_PART)):
        chunk = [_eval_columns(study, t) for t in trials[start:start + _TRIALS_PER_PART]]
        table = pa.table({name: np.concatenate([c[name] for c in chunk]) for name in EVAL_COLUMNS})
        pq.write_table(table, root / "evaluations" / f"part-{part:06d}.parquet")
    latent_rows = [_latent_columns(study, t) for t in trials if t.latents is not None]
    if latent_rows:
        table = pa.table({name: np.concatenate([r[name] for r in latent_rows])
                          for name in LATENT_COLUMNS})
        pq.write_table(table, root / "latents" / "part-000000.parquet")
    pq.write_table(pa.Table.from_pylist([_trial_row(study, t, run_ids) for t in trials]),
                   root / "trials.parquet")


def _latent_columns(study: str, t: _Trial) -> dict[str, np.ndarray]:
    assert t.latents is not None
    n_steps, n_points = t.latents.shape[:2]
    return {
        "study": np.full(n_steps * n_points, study, dtype=object),
        "trial_id": np.full(n_steps * n_points, t.config.trial_id, dtype=object),
        "step": np.repeat(t.steps, n_points), "index": np.tile(np.arange(n_points), n_steps),
        "z0": t.latents[..., 0].ravel(), "z1": t.latents[..., 1].ravel(),
    }


def _trial_row(study: str, t: _Trial, run_ids: dict[str, str]) -> dict[str, Any]:
    c = t.config
    row = {"study": study, "trial_id": c.trial_id, "status": t.status,
           "last_step": int(t.steps[-1]), "error": t.error,
           "pruned_at_step": int(t.steps[-1]) if t.status == "pruned" else None,
           "mlflow_run_id": run_ids.get(c.trial_id), "node_ip": "127.0.0.1"}
    row.update(config_columns(c))  # as the study's recorder writes them (lr_n_cycles resolved)
    return {k: row[k] for k in TRIAL_COLUMNS}


# --- MLflow ----------------------------------------------------------------------------------
def _mlflow_metrics(t: _Trial, base_ms: int) -> list[Any]:
    from mlflow.entities import Metric

    out = []
    for i, step in enumerate(t.steps.tolist()):
        ts = base_ms + step
        for split, values in (("train", t.train), ("valid", t.valid)):
            out += [Metric(f"{split}/{k}", float(v[i]), ts, step) for k, v in values.items()
                    if math.isfinite(v[i])]
    if t.test is not None:
        last = int(t.steps[-1])
        out += [Metric(f"test/{k}", v, base_ms + last, last) for k, v in t.test.items()]
    return out


def _log_mlflow(uri: str, study: str, trials: list[_Trial]) -> tuple[dict[str, str], str, str]:
    """Parent run + one nested child run per trial; returns ({trial_id: run_id}, parent, exp)."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    exp_id = exp.experiment_id if exp else client.create_experiment(study)
    parent = client.create_run(exp_id, run_name=study,
                               tags={"klstudy.role": "study", "klstudy.study": study}).info.run_id
    base_ms = int(time.time() * 1000)
    run_ids = {}
    for t in trials:
        c = t.config
        tags = {"mlflow.parentRunId": parent, "klstudy.role": "trial", "klstudy.study": study,
                "klstudy.trial_id": c.trial_id, "klstudy.status": t.status}
        if t.status == "pruned":
            tags["klstudy.pruned_at_step"] = str(int(t.steps[-1]))
        if t.error:
            tags["klstudy.error"] = t.error
        run_id = client.create_run(exp_id, run_name=c.trial_id, tags=tags).info.run_id
        params = [Param(k, str(v)) for k, v in c.to_params().items()]  # as workers log them
        client.log_batch(run_id, params=params)
        metrics = _mlflow_metrics(t, base_ms)
        for start in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + _MAX_METRICS_PER_BATCH])
        if t.status != "running":
            end = {"completed": "FINISHED", "pruned": "KILLED"}.get(t.status, "FAILED")
            client.set_terminated(run_id, end)
        run_ids[c.trial_id] = run_id
    client.log_batch(parent, tags=[RunTag("klstudy.n_trials", str(len(trials)))])
    if not any(t.status == "running" for t in trials):
        client.set_terminated(parent, "FINISHED")
    return run_ids, parent, exp_id
