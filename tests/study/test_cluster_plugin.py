"""``klstudy submit`` ships a user's module to every node of a real 2-node Ray cluster.

The module exists only next to the spec on the submitting side (a fresh temp directory no Ray
process has on its path); each trial's data factory writes a marker with the module's own
``__file__`` and the copies on its ``PYTHONPATH``, so the test sees what every process had.
(On this loopback cluster the nodes share one file system, so a worker may import the head's
copy through ``code_dir``; each node's own copy on ``PYTHONPATH`` is what a real cluster uses.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODULE = "shipped_vae_i18"
SOURCE = textwrap.dedent('''
    import glob, json, os, time, uuid
    import torch
    from torch import nn

    def _nodes_seen(marker_dir):
        seen = set()
        for name in glob.glob(os.path.join(marker_dir, "*.json")):
            with open(name) as f:
                for p in json.load(f)["shipped"]:
                    seen |= {node for node in ("head", "worker") if f"/{node}/" in p}
        return seen

    def load(marker_dir, n=24, dim=5):
        with open(os.path.join(marker_dir, uuid.uuid4().hex + ".tmp"), "w") as f:
            path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
            shipped = [p for p in path if os.path.isfile(os.path.join(p, __name__ + ".py"))]
            json.dump({"file": __file__, "shipped": shipped, "pid": os.getpid()}, f)
        os.replace(f.name, f.name[:-4] + ".json")
        import ray
        if ray.get_runtime_context().get_actor_id() is not None:  # a trial, not the driver
            # hold this node's CPU until a trial started on the other node: the 1-CPU nodes
            # then hold one trial each, however fast the first trials would have finished
            deadline = time.monotonic() + 120
            while _nodes_seen(marker_dir) != {"head", "worker"} and time.monotonic() < deadline:
                time.sleep(0.2)
        x = (torch.rand(n, dim, generator=torch.Generator().manual_seed(0)) > 0.5).float()
        return {"train": x[:12], "valid": x[12:18], "test": x[18:], "info": {"dim": dim}}

    class VAE(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.enc, self.dec = nn.Linear(dim, 4), nn.Linear(2, dim)

        def encode(self, x):
            mu, logvar = self.enc(x).chunk(2, dim=-1)
            return mu, logvar

        def reconstruction_nll(self, x, z):
            k = z.shape[0] // x.shape[0]
            return nn.functional.binary_cross_entropy_with_logits(
                self.dec(z), x.repeat(k, 1), reduction="none").sum(-1)

    def build(info):
        return VAE(info["dim"])
''')


@pytest.fixture(scope="module")
def submitted(ray_cluster, mlflow_server, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("plugin-submit")
    spec_dir, markers = tmp / "spec", tmp / "markers"
    spec_dir.mkdir()
    markers.mkdir()
    (spec_dir / f"{MODULE}.py").write_text(SOURCE)
    spec = {"name": "cluster-plugin",
            "model": {"kind": "python", "factory": f"{MODULE}:build"},
            "data": {"kind": "python", "factory": f"{MODULE}:load",
                     "params": {"marker_dir": str(markers)}},
            # 4 trials; the first on each 1-CPU node waits in load() until the other node has
            # one too: each node then runs trials, however quickly the first ones would end
            "train": {"total_steps": 400, "batch_size": 4, "eval_every_steps": 100,
                      "iw_samples": 3},
            "schedule": {"n_cycles": [1, 2], "ratio": [0.5]}, "seeds": [0, 1],
            "pruning": {"pruner": "none"}, "resources": {"cpus_per_trial": 1}}
    (spec_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    study_dir = tmp / "study"
    proc = subprocess.run(
        [sys.executable, "-m", "study.cli", "submit", str(spec_dir / "spec.yaml"), "--address",
         ray_cluster.dashboard_url, "--study-dir", str(study_dir), "--tracking-uri",
         mlflow_server.uri, "--python", sys.executable, "--follow"],
        env=ray_cluster.env, capture_output=True, text=True, timeout=550, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    found = [json.loads(p.read_text()) for p in markers.glob("*.json")]
    return {"study_dir": study_dir, "spec_dir": spec_dir, "markers": found,
            "ray_root": ray_cluster.ray_root}


def test_the_module_is_not_importable_where_the_cluster_runs(ray_cluster) -> None:
    probe = subprocess.run([sys.executable, "-c", f"import {MODULE}"], env=ray_cluster.env,
                           cwd=ray_cluster.tmp_dir, capture_output=True, text=True)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr


def test_every_trial_completed_on_both_nodes(submitted: dict) -> None:
    trials = pd.read_parquet(submitted["study_dir"] / "trials.parquet")
    assert list(trials["status"]) == ["completed"] * 4
    assert trials["node_ip"].nunique() == 2, trials[["trial_id", "node_ip"]]
    assert set(trials["model"]) == {"python"}


def test_each_node_had_its_own_shipped_copy_on_the_import_path(submitted: dict) -> None:
    markers = submitted["markers"]
    assert len(markers) >= 5  # the driver's one-batch check and the four trials
    files = {m["file"] for m in markers}
    assert not any(f.startswith(str(submitted["spec_dir"])) for f in files), files
    assert all("runtime_resources" in f for f in files), files  # Ray's unpacked job files
    shipped = {p for m in markers for p in m["shipped"]}
    assert all("runtime_resources" in p for p in shipped), shipped
    roots = {name for name in ("head", "worker") for p in shipped
             if p.startswith(str(submitted["ray_root"] / name))}
    assert roots == {"head", "worker"}, shipped
    assert all(m["shipped"] for m in markers), markers  # every process had a copy
