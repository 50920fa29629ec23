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
    beta_at,
    fixing_stage_eval,
    load_corpus,
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


@pytest.mark.parametrize("total_steps", [50, 30])
def test_resume_refuses_another_total_steps(checkpoint_20, total_steps):
    # T sets the period ⌈T/M⌉: with T = 50 instead of 40, β(21) would be a ramp value where
    # the checkpointed trial was in its fixing stage.
    with pytest.raises(CheckpointError, match=rf"resume: total_steps must be the checkpoint's 40 "
                                              rf".*β\(t\) and lr\(t\).*got {total_steps}$"):
        train_trial(_config(total_steps=total_steps), resume_from=checkpoint_20)


def test_resume_may_change_evaluation_settings(checkpoint_20):
    config = _config(eval_every_steps=5, iw_samples=3, eval_batch_size=4, eval_subset_sentences=2)
    result = train_trial(config, resume_from=checkpoint_20)
    assert [ev.step for ev in result.evaluations] == [25, 30, 35, 40]


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
        assert ev.at_beta_max == fixing_stage_eval(
            ev.step, total_steps=25, n_cycles=3, ratio=0.75, eval_every_steps=10
        )
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
def test_non_finite_loss_raises_at_the_next_evaluation_naming_the_interval(grad_clip):
    # Adam with lr = 1e6 makes the loss NaN within a couple of steps (step 2 on this machine);
    # the trial notices at its first evaluation, with no per-step host sync.
    config = _config(total_steps=400, eval_every_steps=200, lr=1e6, grad_clip=grad_clip)
    with pytest.raises(NonFiniteLossError,
                       match=r"^trial trial: loss is (nan|inf) in steps 1–200 "):
        train_trial(config)


def test_a_non_finite_loss_after_good_evaluations_names_its_interval_and_keeps_the_checkpoint(
        tmp_path, monkeypatch):
    import workers._trainer as trainer_module

    real_beta_at = trainer_module.beta_at  # β = inf from step 11 on: loss = rec + inf · KL
    monkeypatch.setattr(trainer_module, "beta_at",
                        lambda t, **kw: real_beta_at(t, **kw) if t <= 10 else math.inf)
    seen: list[int] = []
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) in steps 11–20 "):
        train_trial(_config(), checkpoint_dir=tmp_path, report=lambda ev: seen.append(ev.step))
    assert seen == [10]
    assert _load(tmp_path)["step"] == 10  # the non-finite state is never checkpointed


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


def test_at_beta_max_flags_the_last_evaluation_of_cycles_that_miss_their_fixing_stage():
    # R = 1, T = 25, M = 2: P = 13, cycles 1–13 and 14–25; evaluations 10, 20, 25. Step 13 is
    # never evaluated, so step 10 stands for the first cycle and step 25 for the second.
    evaluations = train_trial(_config(total_steps=25, ratio=1.0, iw_samples=0)).evaluations
    assert [(ev.step, ev.at_beta_max) for ev in evaluations] == [(10, True), (20, False),
                                                                 (25, True)]


# --- evaluation cost ---------------------------------------------------------------------------
def _text_corpus(tmp_path: Path, n_valid: int = 40):
    lines = lambda n, w: "\n".join(" ".join([w] * (1 + i % 7)) for i in range(n)) + "\n"  # noqa: E731
    for split, text in (("train", lines(30, "a b")), ("valid", lines(n_valid, "a")),
                        ("test", lines(25, "b"))):
        (tmp_path / f"{split}.txt").write_text(text)
    return load_corpus("text", path=str(tmp_path))


def test_intermediate_evaluations_use_the_valid_subset_and_the_final_one_every_sentence(tmp_path):
    corpus = _text_corpus(tmp_path)
    calls = []
    real = corpus.eval_batches

    def spy(split, *, batch_size, max_sentences=None, device=None):
        calls.append((split, max_sentences))
        return real(split, batch_size=batch_size, max_sentences=max_sentences, device=device)

    object.__setattr__(corpus, "eval_batches", spy)
    config = _config(data="text", data_path=str(tmp_path), total_steps=20, eval_subset_sentences=7,
                     iw_samples=0, latent_dim=3)
    train_trial(config, corpus=corpus)
    assert calls == [("valid", 7), ("valid", None), ("test", None)]


def test_iw_sentences_fit_the_budget():
    from workers._trainer import IW_ROW_SHARE, iw_sentences

    assert IW_ROW_SHARE == 0.25
    # T 200, batch 32, K 50: 0.25 · 6,400 / 2 = 800 rows per split → 16 sentences.
    assert iw_sentences(TrialConfig(total_steps=200, batch_size=32, iw_samples=50), 3076) == 16
    # The paper's PTB run, K 500: 0.25 · 52,600 · 32 / 2 = 210,400 rows → 420 sentences.
    config = TrialConfig(total_steps=52_600, batch_size=32, iw_samples=500)
    assert iw_sentences(config, 3761) == 420
    assert iw_sentences(TrialConfig(total_steps=1200, batch_size=10, iw_samples=50), 10) == 10
    assert iw_sentences(TrialConfig(total_steps=1, batch_size=1, iw_samples=500), 10) == 1


def test_iw_nll_on_a_subset_estimates_the_whole_split():
    # q(z|x) = N(0, 9·I) for every x: the IW bound is > 4 nats below −ELBO. The trial's budget
    # (T 320, batch 10, K 200: 0.25 · 3,200 / 2 / 200 = 2 sentences) covers 2 of the 10 toy
    # sentences; the difference estimate must match the direct estimate over all 10.
    from workers._metrics import evaluate, importance_weighted_nll
    from workers._trainer import _Trainer, iw_sentences

    config = _config(total_steps=320, iw_samples=200).resolved()
    assert iw_sentences(config, 10) == 2
    trainer = _Trainer(config, None)
    with torch.no_grad():
        trainer.model.to_stats.weight.zero_()
        trainer.model.to_stats.bias.copy_(torch.tensor([0.0, 0.0, math.log(9.0), math.log(9.0)]))
    metrics = trainer._evaluate_split("valid", final=True)
    cpu = torch.device("cpu")
    valid = lambda: trainer.corpus.eval_batches("valid", batch_size=10)  # noqa: E731
    direct = importance_weighted_nll(trainer.model, valid(), n_samples=200, device=cpu,
                                     generator=torch.Generator().manual_seed(9))
    elbo = evaluate(trainer.model, valid(), device=cpu, generator=torch.Generator().manual_seed(9))
    assert elbo["nll_elbo"] - direct["iw_nll"] > 4.0
    assert metrics["iw_nll"] == pytest.approx(direct["iw_nll"], abs=0.5)
    n_tok = trainer.corpus.n_predicted_tokens("valid")
    assert metrics["iw_ppl"] == pytest.approx(math.exp(metrics["iw_nll"] * 10 / n_tok), rel=1e-9)


def test_trial_result_splits_wall_time_into_training_evaluation_and_checkpoints(tmp_path):
    result = train_trial(_config(total_steps=20), checkpoint_dir=tmp_path)
    assert result.train_s > 0 and result.eval_s > 0 and result.checkpoint_s > 0
    assert train_trial(_config(total_steps=20)).checkpoint_s == 0.0


class _LengthMeans(torch.nn.Module):
    """Posterior mean (length, 0): shows which sentences the latent scatter took."""

    def encode(self, batch):
        x = batch.lengths.to(torch.float32)
        return torch.stack([x, torch.zeros_like(x)], dim=-1), torch.zeros(len(batch), 2)


def test_latent_scatter_is_a_seeded_sample_not_the_shortest_sentences(tmp_path):
    from workers._trainer import _Trainer

    corpus = _text_corpus(tmp_path, n_valid=1400)  # lengths 1–7 words, 200 of each
    trainer = _Trainer(_config(data="text", data_path=str(tmp_path)).resolved(), corpus)
    trainer.model = _LengthMeans()
    points = trainer._latent_means("valid")
    lengths = [int(x) - 1 for x, _ in points]
    assert len(points) == 1000
    assert max(lengths) == 7 and 3.5 < sum(lengths) / 1000 < 4.5  # the split's mean is 4
    assert points == trainer._latent_means("valid")  # the same sentences every evaluation


def test_perplexity_of_a_diverged_but_finite_model_is_inf_not_an_overflow_error():
    # lr = 1e6 can leave the loss finite but ~1e14 nats: exp() of that must not crash the
    # evaluation (an OverflowError would be retried by Tune as if transient).
    from workers._metrics import perplexity

    assert perplexity(2.4e14, 110) == math.inf
    assert perplexity(110.0, 110) == pytest.approx(math.e)


# --- the CUDA-ready path, as far as a CPU can check it -----------------------------------------
def _golden_text_dir(root: Path) -> str:
    words = "the a cat dog sat ran on mat big small red blue".split()
    for split, n in (("train", 60), ("valid", 25), ("test", 20)):
        lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(1 + (i * 5) % 9))
                 for i in range(n)]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return str(root)


# Recorded with the implementation before tensorised splits and the per-evaluation NaN check
# (commit fa66c22, this project's 2-core x86-64 machine, torch 2.13.0+cpu): (first interval's
# train loss, final train loss, valid ELBO, test ELBO, test IW-NLL). The new code gave the very
# same floats there (every evaluation, every metric); rel 1e-6 leaves room for other CPUs' kernels.
_PREVIOUS_IMPLEMENTATION = {
    "toy": (19.52487564086914, 9.663466453552246, -8.597459518909455, -8.597459518909455,
            8.590140068531037),
    "text": (16.630115509033203, 15.825909614562988, -16.138342995643615, -16.158551681041715,
             16.157747415701547),
}


@pytest.mark.parametrize("run", ["toy", "text"])
def test_cpu_trajectories_equal_the_previous_implementation(tmp_path, run):
    config = _config()
    if run == "text":
        config = _config(model="lstm_text", data="text", data_path=_golden_text_dir(tmp_path),
                         emb_dim=16, hidden_dim=24, latent_dim=4, total_steps=30, batch_size=8,
                         iw_samples=5, eval_batch_size=16, seed=3)
    evaluations = train_trial(config).evaluations
    first, last = evaluations[0], evaluations[-1]
    assert last.test is not None
    got = (first.train["loss"], last.train["loss"], last.valid["elbo"], last.test["elbo"],
           last.test["iw_nll"])
    assert got == pytest.approx(_PREVIOUS_IMPLEMENTATION[run], rel=1e-6)


class _HostReadError(AssertionError):
    pass


def test_a_training_step_never_reads_a_tensor_back_to_the_host(monkeypatch):
    # On CUDA each such read would be a device sync. Exempt: the epoch's batch plan (host
    # tensors of a CPU generator, once per epoch) and torch's CPU Adam, which reads its step
    # counter (a host tensor there; the fused CUDA Adam does not).
    from workers._trainer import _Trainer

    trainer = _Trainer(_config().resolved(), None)
    trainer.train_step(1)  # the first step builds the split tensors (host work, once)

    def forbidden(self, *args, **kwargs):
        raise _HostReadError("a tensor was read on the host during a training step")

    names = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def reads_allowed(fn):
        def call(*args, **kwargs):
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
            try:
                return fn(*args, **kwargs)
            finally:
                for name in names:
                    setattr(torch.Tensor, name, forbidden)
        return call

    monkeypatch.setattr(trainer.optimizer, "step", reads_allowed(trainer.optimizer.step))
    object.__setattr__(trainer.corpus, "_epoch_plan", reads_allowed(trainer.corpus._epoch_plan))
    for name in names:
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    try:
        for t in range(2, 25):  # crosses epochs (every toy step is an epoch of one batch)
            trainer.train_step(t)
    finally:
        monkeypatch.undo()
    trainer.check_finite()  # the one read, at the evaluation


def test_tf32_is_fp32_on_cpu_and_bf16_autocasts_training_but_not_evaluation():
    from workers._trainer import _Trainer

    fp32 = train_trial(_config(total_steps=20, precision="fp32")).evaluations
    assert [e.valid for e in train_trial(_config(total_steps=20, precision="tf32")).evaluations] \
        == [e.valid for e in fp32]
    trainer = _Trainer(_config(precision="bf16").resolved(), None)
    dtypes: list[tuple[bool, torch.dtype]] = []
    trainer.model.out.register_forward_hook(
        lambda module, args, out: dtypes.append((module.training, out.dtype)))
    trainer.train_step(1)
    trainer._evaluate_split("valid", final=False)
    assert (True, torch.bfloat16) in dtypes and (False, torch.float32) in dtypes
    assert {d for training, d in dtypes if not training} == {torch.float32}


def test_a_bf16_trial_trains_close_to_fp32_and_records_its_precision(tmp_path):
    fp32 = train_trial(_config(total_steps=20)).final
    bf16 = train_trial(_config(total_steps=20, precision="bf16"), checkpoint_dir=tmp_path).final
    assert bf16 != fp32 and bf16["elbo"] == pytest.approx(fp32["elbo"], rel=0.05)
    assert _load(tmp_path)["config"]["precision"] == "bf16"


def test_resume_refuses_another_precision_but_takes_another_gpu_share(checkpoint_20):
    with pytest.raises(CheckpointError, match=r"precision='fp32'.*asks for 'bf16'"):
        train_trial(_config(precision="bf16"), resume_from=checkpoint_20)
    result = train_trial(_config(gpu_memory_fraction=0.25, deterministic=True),
                         resume_from=checkpoint_20)
    assert result.step == 40


def test_checkpoints_hold_only_the_trial_devices_rng_state(tmp_path):
    train_trial(_config(total_steps=10), checkpoint_dir=tmp_path)
    state = _load(tmp_path)
    assert state["format"] == 2 and "rng_cuda" not in state
    assert state["rng_device"] is None  # a CPU trial; on CUDA: its own device's state only


@pytest.mark.parametrize("written_as", ["format-2-cuda1", "format-1-two-gpus"])
def test_a_checkpoint_written_on_a_gpu_machine_resumes_on_cpu_bit_for_bit(tmp_path, written_as):
    # A checkpoint as a CUDA worker writes it (config device cuda:1, a device RNG state; or
    # the old format with every visible GPU's state) continues on a CPU-only machine exactly
    # as the uninterrupted CPU run: the device state is ignored off CUDA.
    config = _config()
    straight = train_trial(config)
    train_trial(config, checkpoint_dir=tmp_path / "ckpt", report=_stop_at(20))
    state = _load(tmp_path / "ckpt")
    gpu_state = torch.zeros(16, dtype=torch.uint8)
    state["config"]["device"] = "cuda:1"
    if written_as == "format-2-cuda1":
        state["rng_device"] = gpu_state
    else:
        state["format"] = 1
        state["rng_cuda"] = [gpu_state, gpu_state]
        del state["rng_device"]
    torch.save(state, tmp_path / "ckpt" / "checkpoint.pt")
    resumed = train_trial(config, resume_from=tmp_path / "ckpt")
    assert [(e.train, e.valid, e.test) for e in resumed.evaluations] == [
        (e.train, e.valid, e.test) for e in straight.evaluations[2:]]
