"""The trial loop: evaluations, the report callback, checkpoints and bit-for-bit resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from workers import (
    CheckpointError,
    Evaluation,
    NonFiniteLossError,
    TrialConfig,
    at_beta_max,
    beta_at,
    train_trial,
)

METRICS = {"rec", "kl", "elbo", "nll_elbo", "ppl", "au", "mi"}
IW_METRICS = {"iw_nll", "iw_ppl"}


def _config(**overrides: Any) -> TrialConfig:
    """The toy trial, small: 40 steps, 2 cycles, an evaluation every 10 steps."""
    values: dict[str, Any] = {
        "total_steps": 40,
        "eval_every_steps": 10,
        "n_cycles": 2,
        "ratio": 0.5,
        "iw_samples": 10,
        "eval_batch_size": 10,
        "device": "cpu",
        "num_threads": 1,
    }
    return TrialConfig(**(values | overrides))


def _load(directory: Path) -> dict[str, Any]:
    return torch.load(directory / "checkpoint.pt", weights_only=True)


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive exact equality of (nested) state dicts; tensors with torch.equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _stop_at(step: int):
    return lambda ev: ev.step == step


@pytest.fixture(scope="module")
def checkpoint_20(tmp_path_factory) -> Path:
    """A checkpoint of ``_config()`` stopped at step 20."""
    directory = tmp_path_factory.mktemp("ckpt")
    result = train_trial(_config(), checkpoint_dir=directory, report=_stop_at(20))
    assert result.status == "stopped"
    return directory


# --- resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [{}, {"dropout": 0.5, "lr_schedule": "cyclical_cosine", "ramp": "sigmoid", "seed": 3}],
    ids=["toy", "dropout-cosine-lr"],
)
def test_resume_continues_bit_for_bit(tmp_path, overrides):
    config = _config(**overrides)
    straight = train_trial(config, checkpoint_dir=tmp_path / "straight")
    first = train_trial(config, checkpoint_dir=tmp_path / "first", report=_stop_at(20))
    assert (first.status, first.step) == ("stopped", 20)
    resumed = train_trial(
        config, checkpoint_dir=tmp_path / "resumed", resume_from=tmp_path / "first"
    )

    assert [ev.step for ev in resumed.evaluations] == [30, 40]
    a, b = _load(tmp_path / "straight"), _load(tmp_path / "resumed")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    _assert_same(a["optimizer"], b["optimizer"], "optimizer")
    assert torch.equal(a["rng_cpu"], b["rng_cpu"])
    for ours, theirs in zip(resumed.evaluations, straight.evaluations[2:], strict=True):
        assert (ours.step, ours.train, ours.valid, ours.test) == (
            theirs.step,
            theirs.train,
            theirs.valid,
            theirs.test,
        )
        assert ours.latents == theirs.latents


def test_checkpoint_loads_with_weights_only_and_holds_the_trial_state(tmp_path):
    config = _config(total_steps=20)
    train_trial(config, checkpoint_dir=tmp_path)
    state = _load(tmp_path)  # weights_only=True: plain tensors, dicts and numbers only
    assert {"model", "optimizer", "step", "rng_cpu", "config"} <= state.keys()
    assert state["step"] == 20
    assert state["config"] == config.resolved().to_dict()
    assert json.loads((tmp_path / "config.json").read_text()) == config.resolved().to_dict()
    assert state["optimizer"]["state"], "Adam moments are saved"


def test_checkpoint_is_on_disk_before_each_report(tmp_path):
    steps_on_disk = []

    def report(ev: Evaluation) -> None:
        assert ev.checkpoint is not None
        steps_on_disk.append(_load(ev.checkpoint)["step"])

    train_trial(_config(total_steps=25), checkpoint_dir=tmp_path, report=report)
    assert steps_on_disk == [10, 20, 25]


def test_resume_may_extend_total_steps(tmp_path, checkpoint_20):
    result = train_trial(_config(total_steps=50), resume_from=checkpoint_20)
    assert [ev.step for ev in result.evaluations] == [30, 40, 50]
    assert result.step == 50


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_cycles", 3), ("ratio", 0.25), ("ramp", "cosine"), ("seed", 1), ("lr", 0.01)],
)
def test_resume_with_another_config_is_a_checkpoint_error(checkpoint_20, field, value):
    with pytest.raises(CheckpointError, match=rf"{field}=.*asks for {value!r}"):
        train_trial(_config(**{field: value}), resume_from=checkpoint_20)


def test_resume_from_a_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_trial(_config(), resume_from=tmp_path / "nothing-here")


# --- evaluations and the report callback -------------------------------------------------------
def test_report_receives_every_evaluation_including_a_final_odd_step(tmp_path):
    seen: list[Evaluation] = []
    result = train_trial(_config(total_steps=25), checkpoint_dir=tmp_path, report=seen.append)
    assert result.status == "completed" and result.step == 25
    assert [ev.step for ev in seen] == [10, 20, 25]
    assert [ev.final for ev in seen] == [False, False, True]
    assert seen == result.evaluations
    assert all(ev.checkpoint is not None for ev in seen)


def test_evaluations_log_the_schedule_of_their_step():
    config = _config(total_steps=25, n_cycles=3, ratio=0.75, ramp="cosine")
    for ev in train_trial(config).evaluations:
        assert ev.train["beta"] == beta_at(
            ev.step, total_steps=25, n_cycles=3, ratio=0.75, ramp="cosine"
        )
        assert ev.train["lr"] == config.lr
        assert ev.at_beta_max == at_beta_max(ev.step, total_steps=25, n_cycles=3, ratio=0.75)
        assert {"loss", "rec", "kl"} <= ev.train.keys()
        assert all(math.isfinite(v) for v in ev.train.values())


def test_only_the_final_evaluation_has_test_metrics_and_iw_nll():
    evaluations = train_trial(_config(total_steps=25)).evaluations
    *middle, final = evaluations
    for ev in middle:
        assert ev.test is None and set(ev.valid) == METRICS
    assert final.test is not None
    assert set(final.valid) == set(final.test) == METRICS | IW_METRICS
    assert all(math.isfinite(v) for v in final.test.values())


def test_iw_samples_zero_skips_the_iw_nll():
    final = train_trial(_config(total_steps=10, iw_samples=0)).evaluations[-1]
    assert set(final.valid) == set(final.test) == METRICS


def test_two_dimensional_models_report_latent_means():
    ev = train_trial(_config(total_steps=10)).evaluations[-1]
    assert ev.latents is not None and len(ev.latents) == 10  # one per valid sentence
    assert all(len(point) == 2 for point in ev.latents)


def test_report_returning_true_stops_the_trial():
    seen: list[int] = []

    def report(ev: Evaluation) -> bool:
        seen.append(ev.step)
        return True

    result = train_trial(_config(), report=report)
    assert (result.status, result.step, seen) == ("stopped", 10, [10])
    assert len(result.evaluations) == 1 and not result.evaluations[0].final


def test_returning_true_at_the_final_evaluation_still_completes():
    result = train_trial(_config(total_steps=10), report=lambda ev: True)
    assert (result.status, result.step) == ("completed", 10)


# --- failures and reproducibility --------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("grad_clip", [5.0, 0.0])
def test_non_finite_loss_raises(grad_clip):
    # Adam with lr = 1e6 makes the loss NaN within a couple of steps (step 2 on this machine).
    config = _config(total_steps=2000, eval_every_steps=2000, lr=1e6, grad_clip=grad_clip)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf|-inf) at step \d+"):
        train_trial(config)


def test_same_seed_gives_the_same_trial(tmp_path):
    a = train_trial(_config(total_steps=20, seed=5), checkpoint_dir=tmp_path / "a")
    b = train_trial(_config(total_steps=20, seed=5), checkpoint_dir=tmp_path / "b")
    assert [(ev.train, ev.valid, ev.test) for ev in a.evaluations] == [
        (ev.train, ev.valid, ev.test) for ev in b.evaluations
    ]
    _assert_same(_load(tmp_path / "a")["model"], _load(tmp_path / "b")["model"], "model")


def test_different_seeds_give_different_trials():
    a = train_trial(_config(total_steps=20, seed=0))
    b = train_trial(_config(total_steps=20, seed=1))
    assert a.final != b.final
    assert a.evaluations[0].train["loss"] != b.evaluations[0].train["loss"]


@pytest.mark.parametrize("max_norm", [5.0, 0.05])
def test_fast_gradient_clipping_matches_torch_bit_for_bit(max_norm):
    from workers._trainer import _clip_grad_norm

    torch.manual_seed(0)
    grads = [torch.randn(7, 3), torch.randn(11), torch.randn(2, 2, 2)]
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    _clip_grad_norm(ours, max_norm)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))


def test_checkpoint_interval_in_seconds_still_checkpoints_the_final_step(tmp_path):
    config = TrialConfig(total_steps=30, eval_every_steps=10, iw_samples=0, num_threads=1)
    seen = []
    train_trial(config, report=lambda ev: seen.append(ev.checkpoint), checkpoint_dir=tmp_path,
                checkpoint_every_s=3600.0)
    assert seen[:-1] == [None, None] and seen[-1] == tmp_path
