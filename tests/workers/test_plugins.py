"""Any VAE through one contract (DESIGN §8): factories, the mapping data, devices, remedies."""

from __future__ import annotations

import collections
import dataclasses
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from workers import (
    MappingData,
    PluginError,
    TrialConfig,
    beta_at,
    import_factory,
    kl_term,
    load_trial_data,
    lr_at,
    to_device,
    train_trial,
)

# A complete user module: binary vectors and a linear Bernoulli VAE.
USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    def load(n=40, dim=6, seed=0, tokens=False):
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(n, dim, generator=g) > 0.5).float()
        out = {"train": x[: n // 2], "valid": x[n // 2 : 3 * n // 4], "test": x[3 * n // 4 :],
               "info": {"dim": dim}}
        if tokens:
            out["info"]["n_tokens"] = {"valid": 10 * dim, "test": 10 * dim}
        return out

    class VAE(nn.Module):
        def __init__(self, dim, latent):
            super().__init__()
            self.enc = nn.Linear(dim, 2 * latent)
            self.dec = nn.Linear(latent, dim)

        def encode(self, x):
            return tuple(self.enc(x).chunk(2, dim=-1))

        def reconstruction_nll(self, x, z):
            k = z.shape[0] // x.shape[0]
            return nn.functional.binary_cross_entropy_with_logits(
                self.dec(z), x.repeat(k, 1), reduction="none").sum(-1)

    def build(info, latent=2):
        return VAE(info["dim"], latent)
''')


def _user_dir(tmp_path: Path, name: str, source: str = USER_MODULE) -> str:
    directory = tmp_path / "code"
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.py").write_text(source)
    return str(directory)


def _user_config(code_dir: str, name: str, **overrides: Any) -> TrialConfig:
    values: dict[str, Any] = {
        "model": "python", "model_factory": f"{name}:build", "model_params": {"latent": 2},
        "data": "python", "data_factory": f"{name}:load", "data_params": {"n": 40},
        "code_dir": code_dir, "total_steps": 30, "batch_size": 8, "eval_every_steps": 10,
        "n_cycles": 2, "ratio": 0.5, "iw_samples": 5, "eval_batch_size": 16, "device": "cpu",
    }
    return TrialConfig(**(values | overrides))


# --- the built-in models go through the same contract ------------------------------------------
def _toy(**overrides: Any) -> TrialConfig:
    values: dict[str, Any] = {"total_steps": 40, "eval_every_steps": 10, "n_cycles": 2,
                              "ratio": 0.5, "iw_samples": 10, "eval_batch_size": 10,
                              "device": "cpu"}
    return TrialConfig(**(values | overrides))


def test_the_toy_named_as_a_python_factory_trains_bit_for_bit_like_kind_toy():
    sizes = {"emb_dim": 16, "hidden_dim": 64, "latent_dim": 2, "n_layers": 2, "dropout": 0.0}
    builtin = train_trial(_toy())
    plugged = train_trial(_toy(model="python", model_factory="workers._models:build_sentence_vae",
                               model_params=sizes, data="python",
                               data_factory="workers._data:load_toy", data_params={}))
    assert [ev.flat() for ev in plugged.evaluations] == [ev.flat() for ev in builtin.evaluations]
    assert plugged.evaluations[-1].latents == builtin.evaluations[-1].latents


# --- a user's module ---------------------------------------------------------------------------
def test_a_user_model_and_data_train_and_report_every_metric(tmp_path):
    config = _user_config(_user_dir(tmp_path, "user_vae_a"), "user_vae_a")
    result = train_trial(config)
    final = result.evaluations[-1]
    assert result.status == "completed" and [ev.step for ev in result.evaluations] == [10, 20, 30]
    assert {"rec", "kl", "elbo", "mi", "au", "iw_nll"} <= final.valid.keys()
    assert all(math.isfinite(final.valid[k]) for k in ("rec", "kl", "elbo", "mi", "iw_nll"))
    assert math.isnan(final.valid["ppl"])  # no token counts in its info
    assert final.latents is not None and len(final.latents) == 10  # 2-D z: the valid split


def test_token_counts_in_info_give_perplexity(tmp_path):
    config = _user_config(_user_dir(tmp_path, "user_vae_b"), "user_vae_b",
                          data_params={"n": 40, "tokens": True})
    valid = train_trial(config).evaluations[-1].valid
    assert valid["ppl"] == pytest.approx(math.exp(valid["nll_elbo"] * 10 / 60), rel=1e-9)


def test_a_user_trial_resumes_bit_for_bit(tmp_path):
    config = _user_config(_user_dir(tmp_path, "user_vae_c"), "user_vae_c")
    whole = train_trial(config)
    train_trial(config, checkpoint_dir=tmp_path / "ckpt", report=lambda ev: ev.step == 20)
    resumed = train_trial(config, resume_from=tmp_path / "ckpt")
    assert resumed.evaluations[-1].flat() == whole.evaluations[-1].flat()


def test_the_code_dir_comes_first_and_another_dirs_module_of_that_name_is_not_reused(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    for directory, value in ((first, 1), (second, 2)):
        directory.mkdir()
        (directory / "same_name_18.py").write_text(f"def make():\n    return {value}\n")
    assert import_factory("same_name_18:make", code_dir=str(first), key="model.factory")() == 1
    assert import_factory("same_name_18:make", code_dir=str(second), key="model.factory")() == 2


def test_a_missing_code_dir_is_skipped_and_named_when_the_module_is_not_found(tmp_path):
    with pytest.raises(PluginError, match=r"model.factory: module 'nowhere_18' not found .*"
                                          r"does not exist here"):
        import_factory("nowhere_18:build", code_dir=str(tmp_path / "gone"), key="model.factory")
    # an installed module is still found
    assert import_factory("math:sqrt", code_dir=str(tmp_path / "gone"), key="k")(4.0) == 2.0


# --- the contract's mapping ----------------------------------------------------------------------
def _mapping(n_train: int = 10) -> MappingData:
    xs = torch.arange(n_train * 2, dtype=torch.float32).view(n_train, 2)
    return MappingData({"train": xs, "valid": xs[:3], "test": xs[:4]})


def test_training_batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch():
    a, b = _mapping(), _mapping()
    steps = range(1, 4)  # 10 examples, batch 4: batches of 4, 4, 2
    first = [a.train_batch(t, batch_size=4, seed=3) for t in steps]
    again = [b.train_batch(t, batch_size=4, seed=3) for t in reversed(steps)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert [len(x) for x in first] == [4, 4, 2]
    assert sorted(torch.cat(first)[:, 0].tolist()) == [float(2 * i) for i in range(10)]
    other_seed = torch.cat([a.train_batch(t, batch_size=4, seed=4) for t in steps])
    assert not torch.equal(other_seed, torch.cat(first))
    next_epoch = torch.cat([a.train_batch(t, batch_size=4, seed=3) for t in range(4, 7)])
    assert not torch.equal(next_epoch, torch.cat(first))  # a fresh permutation


def test_evaluation_batches_are_the_split_in_order_or_a_fixed_subset():
    data = _mapping(10)
    rows = torch.cat(list(data.eval_batches("train", batch_size=3)))
    assert rows[:, 0].tolist() == [float(2 * i) for i in range(10)]
    subset = [torch.cat(list(data.eval_batches("train", batch_size=3, max_sentences=4)))
              for _ in range(2)]
    assert len(subset[0]) == 4 and torch.equal(subset[0], subset[1])


def test_token_counts_scale_to_an_evaluation_subset():
    xs = torch.zeros(10, 2)
    data = MappingData({"train": xs, "valid": xs, "test": xs, "info": {"n_tokens": {"valid": 50}}})
    assert data.n_tokens("valid") == 50 and data.n_tokens("valid", 4) == 20
    assert data.n_tokens("test") is None


def test_a_custom_collate_builds_the_batches():
    data = MappingData({"train": [1, 2, 3], "valid": [4, 5], "test": [6],
                        "collate": lambda xs: {"x": torch.tensor(xs)}})
    batch = next(data.eval_batches("valid", batch_size=5))
    assert batch["x"].tolist() == [4, 5]


@pytest.mark.parametrize(("loaded", "message"), [
    ([1, 2], "must return a mapping"),
    ({"train": [1], "valid": [1]}, "must return 'test'"),
    ({"train": [1], "valid": [], "test": [1]}, "'valid' holds no examples"),
    ({"train": 5, "valid": [1], "test": [1]}, "'train' must be a sequence"),
    ({"train": [1], "valid": [1], "test": [1], "tset": [1]}, "unknown key"),
    ({"train": [1], "valid": [1], "test": [1], "collate": 3}, "'collate' must be callable"),
    ({"train": [1], "valid": [1], "test": [1], "info": [1]}, "'info' must be a mapping"),
    ({"train": [1], "valid": [1], "test": [1], "info": {"n_tokens": {"valid": -1}}},
     "must be a positive number"),
])
def test_a_malformed_mapping_is_a_plugin_error_naming_data_factory(loaded, message):
    with pytest.raises(PluginError, match=message) as info:
        MappingData(loaded)
    assert info.value.key == "data.factory"


def test_batches_of_every_shape_move_to_the_device():
    point = collections.namedtuple("point", "x y")

    class Movable:
        def to(self, device):
            return ("moved", str(device))

    batch = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), "text")],
             "c": point(torch.ones(1), 3), "d": Movable()}
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["a"], torch.ones(2)) and moved["b"][1][1] == "text"
    assert isinstance(moved["c"], point) and moved["c"].y == 3
    assert moved["d"] == ("moved", "cpu")


# --- the remedies -----------------------------------------------------------------------------
def test_beta_ramps_from_beta_min_and_zero_is_the_papers_schedule_exactly():
    kw = {"total_steps": 100, "n_cycles": 2, "ratio": 0.5, "ramp": "linear", "beta_max": 1.0}
    assert beta_at(1, **kw, beta_min=0.1) == pytest.approx(0.1)
    assert beta_at(13, **kw, beta_min=0.1) == pytest.approx(0.1 + 0.9 * 12 / 25)
    assert beta_at(30, **kw, beta_min=0.1) == 1.0
    assert beta_at(51, **kw, beta_min=0.1) == pytest.approx(0.1)  # each cycle restarts there
    for ramp in ("linear", "sigmoid", "cosine"):
        for t in range(1, 101):
            assert beta_at(t, **(kw | {"ramp": ramp}), beta_min=0.0) == \
                1.0 * beta_at(t, **(kw | {"ramp": ramp}))
    with pytest.raises(ValueError, match="beta_min must be in"):
        beta_at(1, **kw, beta_min=1.5)


def test_free_bits_floors_each_dimensions_batch_mean_kl():
    mu = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    logvar = torch.zeros(2, 2)  # KL per dim: 0 and 2
    assert float(kl_term(mu, logvar, free_bits=0.0)) == pytest.approx(2.0)
    assert float(kl_term(mu, logvar, free_bits=0.5)) == pytest.approx(0.5 + 2.0)
    assert float(kl_term(mu, logvar, free_bits=3.0)) == pytest.approx(6.0)


def test_free_bits_changes_the_trained_term_but_not_the_reported_kl(tmp_path):
    base = _toy(total_steps=20)
    plain, floored = train_trial(base), train_trial(dataclasses.replace(base, free_bits=2.0))
    first_plain, first_floored = plain.evaluations[0].train, floored.evaluations[0].train
    # the same first interval up to the first update: the floored loss is larger (λ Z = 4 nats
    # at β ≤ 1 on a near-zero KL), while the reported KL stays the true, small KL
    assert first_floored["loss"] > first_plain["loss"] + 0.5
    assert first_floored["kl"] < 1.0
    assert floored.evaluations[-1].valid["kl"] != plain.evaluations[-1].valid["kl"]


def test_the_learning_rate_has_cycles_of_its_own():
    config = _toy(total_steps=40, n_cycles=1, lr_schedule="cyclical_cosine", lr_n_cycles=4)
    lrs = {ev.step: ev.train["lr"] for ev in train_trial(config).evaluations}
    expected = {t: lr_at(t, lr=1e-3, schedule="cyclical_cosine", total_steps=40, n_cycles=4)
                for t in (10, 20, 30, 40)}
    assert lrs == expected and all(v == expected[10] for v in expected.values())  # restarts
    betas = [ev.train["beta"] for ev in train_trial(config).evaluations]
    assert betas == sorted(betas)  # β itself is monotonic (M 1)


def test_without_lr_n_cycles_the_learning_rate_restarts_with_each_beta_cycle():
    config = _toy(n_cycles=2, lr_schedule="cyclical_cosine")
    assert config.lr_cycles == 2
    assert config.to_params()["lr_n_cycles"] == 2


def test_load_trial_data_names_data_params_that_the_factory_does_not_take(tmp_path):
    config = _user_config(_user_dir(tmp_path, "user_vae_d"), "user_vae_d",
                          data_params={"nn": 40})
    with pytest.raises(PluginError, match=r"load\(\*\*params\) does not accept \{'nn': 40\}") \
            as info:
        load_trial_data(config)
    assert info.value.key == "data.params"
