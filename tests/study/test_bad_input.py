"""Bad input never reaches a worker: `klstudy run` exits 2 with one `error:` line and starts
nothing (no study directory, no Ray) for malformed specs, corpora and YAML files."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from study.cli import main

BASE: dict[str, Any] = {
    "name": "bad", "model": {"kind": "toy"}, "data": {"kind": "toy"},
    "train": {"total_steps": 100}, "schedule": {"n_cycles": [1, 2], "ratio": [0.5]},
}
DELETE = object()


def variant(dotted: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


SPECS = [  # (dotted key, value, what the error line must name)
    ("name", "a b", "name:"), ("name", DELETE, "name: required"), ("name", 3, "name:"),
    ("model", "toy", "model:"), ("model.kind", "gpt", "model.kind:"),
    ("model.latent_dim", 0, "model.latent_dim:"), ("model.dropout", 1.5, "model.dropout:"),
    ("model.emb_dim", "big", "model.emb_dim:"), ("model.colour", "red", "model.colour:"),
    ("data.kind", "mnist", "data.kind:"), ("data.kind", "text", "data.path:"),
    ("data.max_length", -1, "data.max_length:"), ("data.max_train_sentences", 0,
                                                   "data.max_train_sentences:"),
    ("data.max_vocab", 3, "data.max_vocab: must be >= 5, got 3"),
    ("train.total_steps", 0, "train.total_steps:"), ("train.total_steps", "10",
                                                     "train.total_steps:"),
    ("train.total_steps", DELETE, "train.total_steps: required"),
    ("train.lr", -1, "train.lr:"), ("train.lr", float("inf"), "train.lr:"),
    ("train.batch_size", 0, "train.batch_size:"), ("train.grad_clip", -1, "train.grad_clip:"),
    ("train.eval_every_steps", 500, "train.eval_every_steps:"),
    ("train.iw_samples", -5, "train.iw_samples:"), ("train.lr_schedule", "step",
                                                    "train.lr_schedule:"),
    ("schedule.n_cycles", [], "schedule.n_cycles:"), ("schedule.n_cycles", [0],
                                                      "schedule.n_cycles[0]:"),
    ("schedule.n_cycles", [1, 1], "schedule.n_cycles[1]:"),
    ("schedule.n_cycles", [1000], "schedule.n_cycles[0]:"),
    ("schedule.ratio", [1.5], "schedule.ratio[0]:"), ("schedule.ratio", ["half"],
                                                      "schedule.ratio[0]:"),
    ("schedule.ramp", ["step"], "schedule.ramp[0]:"), ("schedule.beta_max", [0],
                                                       "schedule.beta_max[0]:"),
    ("schedule.n_cycles", list(range(1, 101)), None),  # with the ratios below: a huge grid
    ("seeds", [-1], "seeds[0]:"), ("seeds", [1, 1], "seeds[1]:"),
    ("search.kind", "random", "search.kind:"), ("search", {"kind": "tpe"}, "search.n_trials:"),
    ("pruning.pruner", "asha", "pruning.pruner:"), ("pruning.min_share", 2,
                                                    "pruning.min_share:"),
    ("pruning.storage", "redis://x", "pruning.storage:"),
    ("objective.metric", "loss", "objective.metric:"), ("objective.mode", "up",
                                                        "objective.mode:"),
    ("resources.cpus_per_trial", 0, "resources.cpus_per_trial:"),
    ("resources.gpus_per_trial", -1, "resources.gpus_per_trial:"),
    ("tracking.uri", "ftp://x", "tracking.uri:"), ("extra_section", {}, "extra_section:"),
]


def run_bad(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text)
    study_dir = tmp_path / "study"
    code = main(["run", str(spec_file), "--study-dir", str(study_dir)])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not study_dir.exists()  # nothing started
    return lines[0]


@pytest.mark.parametrize(("dotted", "value", "names"), SPECS,
                         # ids stable across processes (pytest-xdist): DELETE by name
                         ids=[f"{d}=<deleted>" if v is DELETE else f"{d}={v!r}"[:60]
                              for d, v, _ in SPECS])
def test_malformed_spec_exits_2_with_one_line(tmp_path, capsys, dotted, value, names) -> None:
    data = variant(dotted, value)
    if names is None:
        data["schedule"]["ratio"] = [i / 1000 for i in range(1001)]
        data["train"]["total_steps"] = 1000
        names = "schedule: the grid"
    line = run_bad(tmp_path, yaml.safe_dump(data), capsys)
    assert names in line, line


YAML_FILES = [
    ("name: [unclosed\n", "invalid YAML"), ("name: a\nname: b\n", "duplicate key"),
    ("? [1, 2]\n: x\n", "keys must be plain scalars"), ("", "empty file"),
    ("- a\n- b\n", "must be a mapping"), ("\tname: a\n", "invalid YAML"),
]


@pytest.mark.parametrize(("text", "names"), YAML_FILES)
def test_malformed_yaml_exits_2_with_one_line(tmp_path, capsys, text, names) -> None:
    assert names in run_bad(tmp_path, text, capsys)


def _corpus(root: Path, **files: bytes) -> Path:
    root.mkdir()
    for split in ("train", "valid", "test"):
        (root / f"{split}.txt").write_bytes(files.get(split, b"a b c\nd e\n"))
    return root


CORPORA = [
    ({"train": b""}, "train.txt holds no sentence"),
    ({"valid": b"\n  \n\n"}, "valid.txt holds no sentence"),
    ({"test": b"caf\xe9 au lait\n"}, "test.txt is not UTF-8 text"),
    ({"train": b"\xff\xfe\x00a\x00"}, "train.txt is not UTF-8 text"),
]


@pytest.mark.parametrize(("files", "names"), CORPORA, ids=[n for _, n in CORPORA])
def test_bad_corpus_exits_2_before_any_trial(tmp_path, capsys, files, names) -> None:
    corpus = _corpus(tmp_path / "corpus", **files)
    data = {**BASE, "model": {"kind": "lstm_text", "emb_dim": 8, "hidden_dim": 8},
            "data": {"kind": "text", "path": str(corpus)}}
    line = run_bad(tmp_path, yaml.safe_dump(data), capsys)
    assert line.startswith("error: data.path: ") and names in line, line


def test_an_unreadable_corpus_file_exits_2(tmp_path, capsys) -> None:
    import os

    corpus = _corpus(tmp_path / "corpus")
    (corpus / "valid.txt").chmod(0)
    if os.access(corpus / "valid.txt", os.R_OK):
        pytest.skip("running as root: permissions do not stop reading")
    data = {**BASE, "data": {"kind": "text", "path": str(corpus)}}
    assert "valid.txt cannot be read" in run_bad(tmp_path, yaml.safe_dump(data), capsys)


def test_a_missing_spec_file_exits_2(tmp_path, capsys) -> None:
    code = main(["run", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: spec: no such file")


@pytest.mark.parametrize("uri", [None, "sqlite:///tmp/mlflow.db", "file:///tmp/mlruns", "mlruns"])
def test_submit_refuses_a_store_only_the_head_could_write(tmp_path, capsys, monkeypatch,
                                                          uri) -> None:
    monkeypatch.delenv("KLSTUDY_TRACKING_URI", raising=False)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(BASE))
    argv = ["submit", str(spec_file), "--address", "http://127.0.0.1:9"]  # never contacted
    code = main(argv + (["--tracking-uri", uri] if uri else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: --tracking-uri: a study on a cluster needs an MLflow server")
