"""Every service command of the stack run natively: a study on PostgreSQL-backed MLflow and Optuna.

The compose stack's ray-head, ray-worker and mlflow services run as `docker/entrypoint.sh ROLE`
with their compose environment (tests/deploy/_native.py); PostgreSQL is real, MinIO is moto's
S3 server. The study driver runs as the KubeRay RayJob runs it (`klstudy-entrypoint driver`,
with the RayJob head's environment and the example Secret), is SIGKILLed mid-study and started
again, which resumes the study. A second study goes through the compose `submit` service.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from _native import Loopback, NativeStack, native_command, service_command, write_env_file
from _postgres import PostgresServer
from _services import _http_get, _popen, free_port, stop_processes
from _stack import (
    DOCKER,
    container_command,
    kuberay_object,
    pod_env,
    rayjob_containers,
    resolved_compose,
)
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TOY = {"model": {"kind": "toy"}, "data": {"kind": "toy"}, "resources": {"cpus_per_trial": 1}}
DRIVER_SPEC = {  # 4 trials, 2 at a time: killed after the first, 1-3 are left to resume
    "name": "deploy-driver", **TOY,
    "train": {"total_steps": 200, "eval_every_steps": 50, "iw_samples": 5},
    "schedule": {"n_cycles": [1, 2], "ratio": [0.5], "ramp": ["linear"], "beta_max": [1.0, 6.0]},
    "seeds": [0],
    "pruning": {"pruner": "percentile", "percentile": 25.0, "n_startup_trials": 2},
}
N_DRIVER_TRIALS = 4
SUBMIT_SPEC = {"name": "deploy-submit", **TOY,
               "train": {"total_steps": 100, "eval_every_steps": 50, "iw_samples": 5},
               "schedule": {"n_cycles": [1], "ratio": [0.5], "ramp": ["linear"],
                            "beta_max": [1.0]},
               "seeds": [0], "pruning": {"pruner": "none"}}
FINISHED = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}


@pytest.fixture(scope="module")
def stack(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("deploy")
    compose = resolved_compose(write_env_file(tmp / ".env", postgres))
    pg = compose["services"]["postgres"]
    init = next(v for v in pg["volumes"] if "docker-entrypoint-initdb.d" in v).split(":")[0]
    postgres.psql_file(Path(init), database=pg["environment"]["POSTGRES_DB"])  # as the image
    with NativeStack(tmp, compose, postgres) as native:
        yield native


def optuna_url(pg: PostgresServer) -> str:
    return pg.url("optuna")


def find_study(storage: str, name: str) -> optuna.Study | None:
    """The one Optuna study of klstudy study `name` (its Optuna name may carry a suffix)."""
    names = [s.study_name for s in optuna.get_all_study_summaries(storage) if name in s.study_name]
    assert len(names) <= 1, names
    return optuna.load_study(study_name=names[0], storage=storage) if names else None


def n_finished(storage: str, name: str) -> int:
    study = find_study(storage, name)
    return 0 if study is None else sum(t.state in FINISHED for t in study.get_trials())


def driver_env(stack: NativeStack, tmp: Path) -> dict[str, str]:
    """The RayJob head container's environment (example Secret), translated to loopback."""
    secret = kuberay_object("Secret")["stringData"]
    pg = stack.pg
    assert f"//{pg.user}@" in secret["KLSTUDY_OPTUNA_STORAGE"]
    k8s = Loopback(hosts={"postgres.klstudy.svc:5432": f"127.0.0.1:{pg.port}",
                          "http://mlflow.klstudy.svc:5000": stack.mlflow_uri},
                   data_dir=tmp / "pvc", overrides={secret["PGPASSWORD"]: pg.password})
    head, _ = rayjob_containers()
    return k8s.env(pod_env(head, secret), RAY_ADDRESS=stack.gcs_address)  # Ray Jobs sets it


def driver_command(spec_file: Path) -> list[str]:
    entrypoint = shlex.split(kuberay_object("RayJob")["spec"]["entrypoint"])
    return native_command(entrypoint[:2]) + [str(spec_file)]  # the spec: ours, not the ConfigMap


def _meta(study_dir: Path) -> dict[str, Any]:
    return json.loads((study_dir / "study.json").read_text())


def _kill_when_one_finished(proc: subprocess.Popen, storage: str, study_dir: Path) -> int:
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"driver exited with {proc.returncode} before it was killed"
        done = n_finished(storage, DRIVER_SPEC["name"])
        if done >= 1 and any((study_dir / "tune").glob("experiment_state-*.json")):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return done
        time.sleep(0.3)
    raise AssertionError("no trial finished within 400 s")


@pytest.fixture(scope="module")
def driven(stack: NativeStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("driver")
    spec_file = tmp / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(DRIVER_SPEC))
    env, cmd = driver_env(stack, tmp), driver_command(spec_file)
    study_dir = Path(env["KLSTUDY_STUDY_DIR"])
    storage = optuna_url(stack.pg)
    started = time.monotonic()
    first = _popen(cmd, env, tmp / "driver-1.log", cwd=tmp)
    try:
        n_at_kill = _kill_when_one_finished(first, storage, study_dir)
    finally:
        stop_processes([first])
    killed_s = time.monotonic() - started
    status_after_kill = _meta(study_dir)["status"]
    runs = [subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
            for _ in range(2)]  # resumes, then finds the study finished
    return {"study_dir": study_dir, "env": env, "storage": storage, "n_at_kill": n_at_kill,
            "status_after_kill": status_after_kill, "resume": runs[0], "again": runs[1],
            "killed_s": killed_s, "total_s": time.monotonic() - started,
            "meta": _meta(study_dir)}


def test_health_checks_pass_natively(stack: NativeStack) -> None:
    for name, env in (("ray-head", stack.head_env()), ("mlflow", stack.mlflow_env())):
        test = stack.service(name)["healthcheck"]["test"]
        assert test[0] == "CMD"
        proc = subprocess.run(native_command(test[1:]), env=env, capture_output=True, timeout=30)
        assert proc.returncode == 0, (name, proc.stderr)
    kind, shell = stack.service("postgres")["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    env = {**stack.pg.client_env(), **stack.service("postgres")["environment"],
           "PATH": f"{stack.pg.bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["sh", "-c", container_command(shell)], env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_mlflow_accepts_the_compose_host_names_only(stack: NativeStack) -> None:
    import urllib.error
    import urllib.request

    def status(host: str) -> int:
        request = urllib.request.Request(
            f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    assert status("mlflow:5000") == 200  # how the Ray nodes call it on the compose network
    assert status("intruder.example:5000") in (400, 403)


def test_driver_killed_then_resumed_by_a_restart(driven: dict) -> None:
    assert 1 <= driven["n_at_kill"] < N_DRIVER_TRIALS
    assert driven["status_after_kill"] == "running"  # SIGKILL: nothing could record an end
    resume = driven["resume"]
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    assert "resuming" in resume.stdout
    assert driven["meta"]["status"] == "finished"
    again = driven["again"]
    assert again.returncode == 0 and "already finished" in again.stdout
    trials = pd.read_parquet(driven["study_dir"] / "trials.parquet")
    assert len(trials) == N_DRIVER_TRIALS
    assert set(trials["status"]) <= {"completed", "pruned"}
    print(f"\ndriver: killed after {driven['killed_s']:.0f} s with {driven['n_at_kill']} trials "
          f"finished; whole kill + resume {driven['total_s']:.0f} s")


def test_optuna_trials_are_in_postgresql(driven: dict, stack: NativeStack) -> None:
    study = find_study(driven["storage"], DRIVER_SPEC["name"])
    assert study is not None
    trials = study.get_trials()
    assert len(trials) == N_DRIVER_TRIALS and {t.state for t in trials} <= FINISHED
    parquet = pd.read_parquet(driven["study_dir"] / "trials.parquet").set_index("trial_id")
    by_tune_id = {t.user_attrs["tune_trial_id"]: t.state for t in trials}
    assert set(by_tune_id) == set(parquet.index)
    pruned = {i for i, s in by_tune_id.items() if s == optuna.trial.TrialState.PRUNED}
    assert pruned == set(parquet.index[parquet["status"] == "pruned"])
    rows = stack.pg.psql("SELECT count(*) FROM trials JOIN studies USING (study_id) "
                         f"WHERE study_name = '{study.study_name}'", database="optuna")
    assert int(rows) == N_DRIVER_TRIALS
    assert not (driven["study_dir"] / "optuna.db").exists()


def test_mlflow_runs_are_in_postgresql(driven: dict, stack: NativeStack) -> None:
    meta = driven["meta"]
    assert meta["tracking_uri"] == stack.mlflow_uri
    client = MlflowClient(stack.mlflow_uri)
    runs = client.search_runs([meta["experiment_id"]])
    (parent,) = [r for r in runs if r.data.tags.get("klstudy.role") == "study"]
    assert parent.info.run_id == meta["parent_run_id"] and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len({r.data.tags["klstudy.trial_id"] for r in children}) == len(children)
    assert len(children) == N_DRIVER_TRIALS  # the resumed trials kept their runs
    count = stack.pg.psql(f"SELECT count(*) FROM runs WHERE experiment_id = "
                          f"{int(meta['experiment_id'])}", database="mlflow")
    assert int(count) == N_DRIVER_TRIALS + 1
    assert not (driven["study_dir"] / "mlflow.db").exists()


def _s3_keys(stack: NativeStack) -> list[str]:
    pages = stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=stack.bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_artifacts_go_through_the_server_to_s3(driven: dict, stack: NativeStack) -> None:
    client = MlflowClient(stack.mlflow_uri)
    experiment = client.get_experiment(str(driven["meta"]["experiment_id"]))
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied
    children = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`klstudy.status` = 'completed'")
    run_id = children[0].info.run_id
    assert "config.json" in [a.path for a in client.list_artifacts(run_id)]
    assert any(k.endswith(f"{run_id}/artifacts/config.json") for k in _s3_keys(stack))


def _report(study_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study.cli", "report", str(study_dir)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_report_rebuilt_from_mlflow_on_postgresql(driven: dict, stack: NativeStack,
                                                  tmp_path: Path) -> None:
    bare = tmp_path / "only-study-json"  # no Parquet: `klstudy report` reads the MLflow server
    bare.mkdir()
    shutil.copy(driven["study_dir"] / "study.json", bare / "study.json")
    proc = subprocess.run([sys.executable, "-m", "study.cli", "report", str(bare)],
                          env={**driven["env"], "MPLBACKEND": "Agg"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (bare / "report" / "report.html").read_text()
    assert DRIVER_SPEC["name"] in html
    parent = driven["meta"]["parent_run_id"]  # the report is logged to the parent run, via S3
    assert any(f"{parent}/artifacts/report/report.html" in k for k in _s3_keys(stack))


def test_optuna_dashboard_lists_the_trials_with_their_states(driven: dict, stack: NativeStack,
                                                             tmp_path: Path) -> None:
    port = free_port()
    url = stack.pg.url("optuna", with_password=False)  # the password: PGPASSWORD
    env = {**os.environ, "PGPASSWORD": stack.pg.password}
    dashboard = str(Path(sys.executable).parent / "optuna-dashboard")
    proc = _popen([dashboard, url, "--host", "127.0.0.1", "--port", str(port)], env,
                  tmp_path / "dashboard.log", cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while _http_get(f"{base}/api/studies")[0] != 200 and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()[-2000:]
            time.sleep(0.5)
        summaries = json.loads(_http_get(f"{base}/api/studies")[1])["study_summaries"]
        study = find_study(driven["storage"], DRIVER_SPEC["name"])
        (listed,) = [s for s in summaries if s["study_name"] == study.study_name]
        detail = json.loads(_http_get(f"{base}/api/studies/{listed['study_id']}?after=0",
                                      timeout_s=30)[1])
        shown = {t["number"]: t["state"] for t in detail["trials"]}
        assert shown == {t.number: t.state.name.capitalize() for t in study.get_trials()}
        assert set(shown.values()) <= {"Complete", "Pruned"}
    finally:
        stop_processes([proc])


def test_submit_service_runs_a_study_as_a_ray_job(stack: NativeStack, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SUBMIT_SPEC))
    service = stack.service("submit")
    command = service_command(list(service["command"]))
    command[command.index("/opt/klstudy/examples/quickstart.yaml")] = str(spec_file)
    env = stack.env("submit")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    study_dir = Path(env["KLSTUDY_STUDY_DIR"])  # on the cluster's `/data` volume
    assert study_dir.is_relative_to(stack.tmp_dir / "data")
    meta = _meta(study_dir)
    assert meta["status"] == "finished" and meta["tracking_uri"] == stack.mlflow_uri
    assert n_finished(optuna_url(stack.pg), SUBMIT_SPEC["name"]) == 1
    assert (DOCKER / "entrypoint.sh").samefile(command[0])
