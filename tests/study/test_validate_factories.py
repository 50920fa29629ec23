"""``klstudy validate`` on user factories: one batch on CPU, one ``error:`` line per failure."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest
import yaml

from study.cli import main

GOOD = textwrap.dedent('''
    import torch
    from torch import nn

    def load(n=40, dim=6):
        x = (torch.rand(n, dim, generator=torch.Generator().manual_seed(0)) > 0.5).float()
        return {"train": x[:20], "valid": x[20:30], "test": x[30:], "info": {"dim": dim}}

    class VAE(nn.Module):
        def __init__(self, dim, latent):
            super().__init__()
            self.enc = nn.Linear(dim, 2 * latent)
            self.dec = nn.Linear(latent, dim)

        def encode(self, x):
            mu, logvar = self.enc(x).chunk(2, dim=-1)
            return mu, logvar

        def reconstruction_nll(self, x, z):
            k = z.shape[0] // x.shape[0]
            nll = nn.functional.binary_cross_entropy_with_logits(
                self.dec(z), x.repeat(k, 1), reduction="none")
            return nll.sum(-1)

    def build(info, latent=2):
        return VAE(info["dim"], latent)
''')
_names = itertools.count()


def _spec(tmp_path: Path, source: str | None = GOOD, *, model: str | None = "build",
          data: str = "load", model_params: dict | None = None,
          data_params: dict | None = None, **extra) -> tuple[Path, str]:
    name = f"user_module_{next(_names)}_{tmp_path.name[-12:].replace('-', '_')}"
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source)
    model_ref = f"{name}:{model}" if model else "no_such_vae_18:build"
    spec = {"name": "byo", "model": {"kind": "python", "factory": model_ref,
                                     "params": model_params or {"latent": 2}},
            "data": {"kind": "python", "factory": f"{name}:{data}",
                     "params": data_params or {"n": 40}},
            "train": {"total_steps": 20, "batch_size": 4},
            "schedule": {"n_cycles": [1], "ratio": [0.5]}, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, name


def _validate(path: Path, capsys) -> tuple[int, str, list[str]]:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_a_good_module_validates_and_reports_its_one_batch(tmp_path, capsys):
    path, name = _spec(tmp_path)
    code, out, err = _validate(path, capsys)
    assert code == 0, err
    assert "1 trials" in out
    assert f"model {name}:build, data {name}:load: one batch on CPU: encode -> mu, logvar [4, 2]" \
        in out
    assert "reconstruction_nll -> [4] and [8] (2 samples)" in out


def _replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


BROKEN = {  # id: (module source or None, spec overrides, key, message)
    # data is loaded first: a module that fails to import is named by data.factory
    "module-not-found": (None, {}, "data.factory", "module '{name}' not found (looked in"),
    "model-module-not-found": (GOOD, {"model": None}, "model.factory",
                               "module 'no_such_vae_18' not found (looked in"),
    "import-of-a-dependency-fails": (
        "import not_installed_dependency_18\n" + GOOD, {}, "data.factory",
        "importing '{name}' failed: No module named 'not_installed_dependency_18'"),
    "syntax-error": (GOOD + "\ndef broken(:\n", {}, "data.factory",
                     "importing '{name}' raised SyntaxError"),
    "factory-missing": (GOOD, {"model": "buld"}, "model.factory",
                        "module '{name}' ({path}) has no attribute 'buld'"),
    "factory-not-callable": (GOOD + "\nBUILD = 3\n", {"model": "BUILD"}, "model.factory",
                             "'{name}:BUILD' is not callable (a int)"),
    "data-factory-not-callable": (GOOD + "\nLOAD = 'x'\n", {"data": "LOAD"}, "data.factory",
                                  "'{name}:LOAD' is not callable (a str)"),
    "params-not-accepted": (GOOD, {"model_params": {"latnt": 2}}, "model.params",
                            "build(info, **params) does not accept {{'latnt': 2}} (got an "
                            "unexpected"),
    "data-params-not-accepted": (GOOD, {"data_params": {"size": 2}}, "data.params",
                                 "load(**params) does not accept {{'size': 2}}"),
    "load-raises": (_replace('x = (torch', 'raise KeyError("no such file")\n    x = (torch'),
                    {}, "data.factory", "load(**data.params) raised KeyError: 'no such file'"),
    "load-returns-a-list": (_replace('return {"train": x[:20]', 'return [x]; {"train": x[:20]'),
                            {}, "data.factory", "must return a mapping with train, valid, test"),
    "build-returns-no-module": (_replace("return VAE(info", "return dict(info=info) or VAE(info"),
                                {}, "model.factory", "must return a torch.nn.Module"),
    "method-missing": (_replace("def reconstruction_nll(", "def reconstruct(") , {},
                       "model.factory", "has no method reconstruction_nll(...)"),
    "encode-returns-one-tensor": (_replace("return mu, logvar", "return mu"), {},
                                  "model.factory", "must return (mu, logvar), two tensors"),
    "encode-shapes-differ": (_replace("return mu, logvar", "return mu, logvar[:, :1]"), {},
                             "model.factory",
                             "mu and logvar of shape [B, Z] with B = 4 examples, got shape "
                             "[4, 2] and shape [4, 1]"),
    "encode-pools-the-batch": (_replace("return mu, logvar",
                                        "return mu.mean(0, keepdim=True), "
                                        "logvar.mean(0, keepdim=True)"),
                               {}, "model.factory", "with B = 4 examples, got shape [1, 2]"),
    "nll-not-summed": (_replace("return nll.sum(-1)", "return nll"), {}, "model.factory",
                       "must return a tensor [N] = [4] (N = 1 sample(s) x B = 4"),
    "nll-ignores-the-samples": (_replace("x.repeat(k, 1)", "x").replace(
        "self.dec(z), x,", "self.dec(z[: x.shape[0]]), x,"), {}, "model.factory",
        "must return a tensor [N] = [8] (N = 2 sample(s) x B = 4"),
    "nll-non-finite": (_replace("return nll.sum(-1)", "return nll.sum(-1) / 0.0 * 0.0"), {},
                       "model.factory", "reconstruction_nll(batch, z) has 4 non-finite value(s)"),
    "encode-non-finite": (_replace("return mu, logvar", "return mu, logvar.log()"), {},
                          "model.factory", "encode(batch) logvar has"),
    "no-trainable-parameters": (_replace("return VAE(info[\"dim\"], latent)",
                                         "return VAE(info['dim'], latent).requires_grad_(False)"),
                                {}, "model.factory", "the model has no trainable parameters"),
    "encode-raises": (_replace("mu, logvar = self.enc(x)", "mu, logvar = self.enc(x.T)"), {},
                      "model.factory", "encode(batch) raised RuntimeError"),
    "ppl-without-token-counts": (GOOD, {"objective": {"metric": "ppl"}}, "objective.metric",
                                 "'ppl' needs token counts"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_each_broken_factory_gives_one_error_line_naming_the_spec_key(tmp_path, capsys, case):
    source, overrides, key, message = BROKEN[case]
    path, name = _spec(tmp_path, source, **overrides)
    code, out, err = _validate(path, capsys)
    assert code == 2 and out == ""
    assert len(err) == 1, err
    expected = message.format(name=name, path=tmp_path / f"{name}.py")
    assert err[0].startswith(f"error: {key}: "), err[0]
    assert expected in err[0], err[0]


def test_run_refuses_a_broken_module_before_creating_the_study(tmp_path, capsys):
    path, _ = _spec(tmp_path, _replace("return nll.sum(-1)", "return nll"))
    code = main(["run", str(path), "--study-dir", str(tmp_path / "study")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: model.factory: reconstruction_nll")
    assert not (tmp_path / "study").exists()
