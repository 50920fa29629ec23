"""The sentence VAE (DESIGN §2): shapes, z fed at every decoder step, initialisation."""

from __future__ import annotations

import pytest
import torch

from workers import (
    ModelShape,
    SentenceVAE,
    TrialConfig,
    build_model,
    load_corpus,
    make_batch,
    reparameterize,
)

SENTENCES = [[4, 5, 6], [7], [8, 9, 10, 11, 12]]


def _model(*, latent_dim: int = 3, n_layers: int = 2, dropout: float = 0.0) -> SentenceVAE:
    torch.manual_seed(0)
    return SentenceVAE(
        ModelShape(
            vocab_size=15,
            emb_dim=6,
            hidden_dim=8,
            latent_dim=latent_dim,
            n_layers=n_layers,
            dropout=dropout,
        )
    )


def _capture(module: torch.nn.Module, *, inputs: bool) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    if inputs:
        module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    else:
        module.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    return seen


# --- shapes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("latent_dim", "n_layers"), [(2, 2), (5, 1)])
def test_output_shapes(latent_dim, n_layers):
    model = _model(latent_dim=latent_dim, n_layers=n_layers)
    batch = make_batch(SENTENCES)
    mu, logvar = model.encode(batch)
    assert mu.shape == logvar.shape == (3, latent_dim)
    assert model.reconstruction_nll(batch, mu).shape == (3,)
    assert model.reconstruction_nll(batch, mu.repeat(4, 1)).shape == (12,)


def test_repeated_z_rows_follow_sample_major_order():
    # z of shape [K·B, D]: row k·B + i is sample k of sentence i.
    model = _model().eval()
    batch = make_batch(SENTENCES)
    z = torch.randn(2 * 3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = model.reconstruction_nll(batch, z)
        for k in range(2):
            for i, sentence in enumerate(SENTENCES):
                alone = model.reconstruction_nll(
                    make_batch([sentence]), z[k * 3 + i : k * 3 + i + 1]
                )
                assert together[k * 3 + i] == pytest.approx(float(alone[0]), abs=1e-5)


@pytest.mark.parametrize(("kind", "latent_dim"), [("toy", 2), ("lstm_text", 32)])
def test_build_model_uses_the_resolved_config(kind, latent_dim):
    corpus = load_corpus("toy")
    config = TrialConfig(model=kind, device="cpu").resolved()
    model = build_model(config, corpus)
    mu, _ = model.encode(make_batch(corpus.splits["valid"][:2]))
    assert mu.shape == (2, latent_dim)
    assert model.out.out_features == len(corpus.vocab) == 6


# --- z at every decoder step -------------------------------------------------------------------
def test_z_is_concatenated_to_every_decoder_input():
    model = _model().eval()
    decoder_inputs = _capture(model.decoder, inputs=True)
    batch = make_batch(SENTENCES)
    z = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.reconstruction_nll(batch, z)
    (inputs,) = decoder_inputs
    steps = batch.tokens.shape[1] - 1  # <s> w_1 … w_L (</s> is only a target)
    assert inputs.shape == (3, steps, 6 + 3)
    assert torch.equal(inputs[:, :, 6:], z.unsqueeze(1).expand(-1, steps, -1))


def test_changing_z_changes_the_logits_at_every_position():
    # With h0 independent of z, z reaches the decoder only through its inputs.
    model = _model().eval()
    with torch.no_grad():
        model.z_to_h0.weight.zero_()
    logits = _capture(model.out, inputs=False)
    batch = make_batch(SENTENCES)
    with torch.no_grad():
        model.reconstruction_nll(batch, torch.zeros(3, 3))
        model.reconstruction_nll(batch, torch.ones(3, 3))
    changed = (logits[0] - logits[1]).abs().amax(dim=-1)  # [B, steps]
    assert bool((changed > 1e-4).all())


def test_dropout_is_active_in_train_mode_only():
    model = _model(dropout=0.5)
    batch, z = make_batch(SENTENCES), torch.zeros(3, 3)
    with torch.no_grad():
        model.train()
        assert not torch.equal(
            model.reconstruction_nll(batch, z), model.reconstruction_nll(batch, z)
        )
        model.eval()
        assert torch.equal(model.reconstruction_nll(batch, z), model.reconstruction_nll(batch, z))


# --- initialisation ----------------------------------------------------------------------------
def test_every_parameter_is_initialised_uniformly_in_plus_minus_0_1():
    model = SentenceVAE(
        ModelShape(
            vocab_size=200, emb_dim=32, hidden_dim=64, latent_dim=8, n_layers=2, dropout=0.0
        )
    )
    for name, p in model.named_parameters():
        assert float(p.detach().abs().max()) <= 0.1, name
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    # U(−0.1, 0.1): mean 0, std 0.1/√3 ≈ 0.0577, and the range is filled.
    assert abs(float(values.mean())) < 0.002
    assert float(values.std()) == pytest.approx(0.1 / 3**0.5, rel=0.02)
    assert float(values.min()) < -0.099 and float(values.max()) > 0.099


# --- reparameterisation ------------------------------------------------------------------------
def test_reparameterize_is_reproducible_with_a_generator_and_has_the_right_moments():
    mu = torch.tensor([[1.0, -2.0]]).expand(20_000, -1)
    logvar = torch.tensor([[0.0, 2 * torch.log(torch.tensor(3.0)).item()]]).expand(20_000, -1)
    z = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    again = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    # Standard errors of the mean: σ/√n = 0.007 and 0.021; of the std: σ/√(2n) = 0.005, 0.015.
    assert z.mean(0).tolist() == pytest.approx([1.0, -2.0], abs=0.1)
    assert z.std(0).tolist() == pytest.approx([1.0, 3.0], abs=0.08)
