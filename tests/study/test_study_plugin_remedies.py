"""A whole study (embedded Ray, Tune, Optuna pruning, MLflow sqlite, Parquet) of a user's
model and data, with the remedy axes crossed: every trial carries its remedies everywhere a
trial's configuration is recorded, and free bits change what is trained, not what is reported."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study._driver import run_study
from study._spec import parse_spec

pytestmark = pytest.mark.timeout(600)

MODULE = "remedy_vae_i18"
SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class Pair:  # a batch object with .to(device): klstudy moves it to the trial's device
        def __init__(self, x, mask):
            self.x, self.mask = x, mask

        def to(self, device):
            return Pair(self.x.to(device), self.mask.to(device))


    def collate(examples):
        return Pair(torch.stack(examples), torch.ones(len(examples), dtype=torch.bool))


    def load(n=60, dim=6):
        x = (torch.rand(n, dim, generator=torch.Generator().manual_seed(3)) > 0.5).float()
        return {"train": list(x[:36]), "valid": list(x[36:48]), "test": list(x[48:]),
                "collate": collate, "info": {"dim": dim}}


    class VAE(nn.Module):
        def __init__(self, dim, latent):
            super().__init__()
            self.enc, self.dec = nn.Linear(dim, 2 * latent), nn.Linear(latent, dim)

        def encode(self, batch):
            assert batch.mask.all()
            mu, logvar = self.enc(batch.x).chunk(2, dim=-1)
            return mu, logvar

        def reconstruction_nll(self, batch, z):
            x = batch.x.repeat(z.shape[0] // batch.x.shape[0], 1)
            return nn.functional.binary_cross_entropy_with_logits(
                self.dec(z), x, reduction="none").sum(-1)


    def build(info, latent=3):
        return VAE(info["dim"], latent)
''')


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_local) -> Path:
    # the session's embedded Ray (tests/conftest.py): a Ray of its own here would shut down the
    # one later tests in this process use
    tmp = tmp_path_factory.mktemp("plugin-remedies")
    (tmp / f"{MODULE}.py").write_text(SOURCE)
    spec = {"name": "remedies", "code_dir": str(tmp),
            "model": {"kind": "python", "factory": f"{MODULE}:build", "params": {"latent": 3}},
            "data": {"kind": "python", "factory": f"{MODULE}:load"},
            "train": {"total_steps": 60, "batch_size": 6, "eval_every_steps": 20,
                      "iw_samples": 3, "free_bits": [0.0, 5.0]},
            "schedule": {"n_cycles": [2], "ratio": [0.5], "beta_min": [0.0, 0.2]},
            "seeds": [0], "pruning": {"pruner": "none"}, "resources": {"cpus_per_trial": 1}}
    run_study(parse_spec(spec), yaml.safe_dump(spec), study_dir=tmp / "study")
    return tmp / "study"


def test_every_remedy_configuration_is_a_trial_with_its_own_columns(study: Path) -> None:
    trials = pd.read_parquet(study / "trials.parquet")
    assert list(trials["status"]) == ["completed"] * 4
    assert set(trials["model"]) == {"python"}
    pairs = set(zip(trials["free_bits"], trials["beta_min"], strict=True))
    assert pairs == {(0.0, 0.0), (0.0, 0.2), (5.0, 0.0), (5.0, 0.2)}
    assert (trials["lr_n_cycles"] == trials["n_cycles"]).all()  # none of its own: M
    assert trials["trial_id"].nunique() == 4


def test_mlflow_children_carry_the_remedies_and_the_factory_params(study: Path) -> None:
    meta = json.loads((study / "study.json").read_text())
    client = MlflowClient(meta["tracking_uri"])
    runs = client.search_runs([meta["experiment_id"]], filter_string=(
        f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'"))
    assert len(runs) == 4
    seen = set()
    for run in runs:
        params = run.data.params
        assert params["model_factory"] == f"{MODULE}:build"
        assert params["model_params.latent"] == "3"
        seen.add((float(params["free_bits"]), float(params["beta_min"])))
    assert seen == {(0.0, 0.0), (0.0, 0.2), (5.0, 0.0), (5.0, 0.2)}


def test_beta_starts_at_beta_min_and_free_bits_keep_the_reported_kl_true(study: Path) -> None:
    evals = pd.read_parquet(study / "evaluations")
    train = evals[evals["split"] == "train"].set_index(["free_bits", "beta_min", "step"])
    # step 40 of 60, M 2, R 0.5: on the second cycle's ramp; from β_min it is β_min + (1 − β_min) f
    ramp = train.loc[(0.0, 0.0, 40), "beta"]
    assert 0.0 < ramp < 1.0
    assert train.loc[(0.0, 0.2, 40), "beta"] == pytest.approx(0.2 + 0.8 * ramp)
    for step in (20, 40, 60):
        # β ≤ 1: the plain loss's KL part, mean(β_t KL_t), is at most the reported KL
        plain = train.loc[(0.0, 0.2, step)]
        assert plain["loss"] - plain["rec"] <= plain["kl"] + 1e-4
        # λ 5 on each of 3 dimensions: the trained term is ≥ 15 nats, β ≥ 0.2, so the loss's
        # KL part is ≥ 3; the reported KL stays the true one, far under the floor
        floored = train.loc[(5.0, 0.2, step)]
        assert floored["loss"] - floored["rec"] >= 3.0 - 1e-4
        assert floored["kl"] < min(3.0, floored["loss"] - floored["rec"])
