"""The real services the integration tests rely on: a 2-node Ray cluster, the Ray Jobs API and
an MLflow server with nested runs and served artifacts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _services import restart_local_ray

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JOB_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def ray_client(ray_cluster) -> Iterator[object]:
    """This process connected to the cluster as a driver; disconnected after the module."""
    import ray

    local = ray.is_initialized()  # the session's embedded Ray (conftest ray_local)
    ray.shutdown()
    ray.init(address=ray_cluster.gcs_address, log_to_driver=False)
    yield ray
    ray.shutdown()
    if local:
        restart_local_ray()


def _alive_node_ids(ray) -> list[str]:
    return [node["NodeID"] for node in ray.nodes() if node["Alive"]]


def test_cluster_has_two_alive_nodes(ray_client) -> None:
    assert len(_alive_node_ids(ray_client)) == 2


def test_a_task_pinned_to_each_node_runs_there(ray_client) -> None:
    ray = ray_client
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def where() -> tuple[str, str]:
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    node_ids = _alive_node_ids(ray)
    refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
            .remote() for node_id in node_ids]
    answers = ray.get(refs, timeout=120)

    assert [node_id for node_id, _ in answers] == node_ids
    assert sorted(ip for _, ip in answers) == ["127.0.0.2", "127.0.0.3"]


def test_job_submitted_through_the_jobs_api_succeeds(ray_cluster) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    job_id = client.submit_job(
        entrypoint='python -c "import ray; ray.init(); print(ray.cluster_resources())"')
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job_id)) not in {
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {JOB_TIMEOUT_S} s"
        time.sleep(1.0)

    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert "'CPU': 2.0" in logs


@pytest.fixture
def mlflow_client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.uri)


def test_child_run_is_nested_under_its_parent(mlflow_client) -> None:
    experiment_id = mlflow_client.create_experiment("smoke-nested")
    parent = mlflow_client.create_run(experiment_id, run_name="parent")
    child = mlflow_client.create_run(experiment_id, run_name="child",
                                     tags={"mlflow.parentRunId": parent.info.run_id})
    mlflow_client.log_metric(child.info.run_id, "elbo", -102.5, step=3)
    for run in (child, parent):
        mlflow_client.set_terminated(run.info.run_id)

    nested = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [run.info.run_id for run in nested] == [child.info.run_id]
    assert [(m.step, m.value) for m in mlflow_client.get_metric_history(
        child.info.run_id, "elbo")] == [(3, -102.5)]


def test_artifact_is_uploaded_through_the_server(mlflow_server, mlflow_client,
                                                 tmp_path: Path) -> None:
    experiment_id = mlflow_client.create_experiment("smoke-artifacts")
    run = mlflow_client.create_run(experiment_id)
    (tmp_path / "note.txt").write_text("hello\n")
    mlflow_client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"), artifact_path="notes")

    listed = mlflow_client.list_artifacts(run.info.run_id, "notes")
    assert [a.path for a in listed] == ["notes/note.txt"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = list(mlflow_server.artifacts_dir.rglob("note.txt"))
    assert [p.read_text() for p in stored] == ["hello\n"]


def test_a_task_on_the_worker_node_uploads_an_artifact(ray_client, mlflow_server,
                                                       mlflow_client) -> None:
    ray = ray_client
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def log_from_worker(uri: str, run_id: str) -> str:
        import tempfile

        from mlflow import MlflowClient

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "from_worker.txt"
            path.write_text(ray.util.get_node_ip_address())
            MlflowClient(tracking_uri=uri).log_artifact(run_id, str(path))
        return ray.util.get_node_ip_address()

    run = mlflow_client.create_run(mlflow_client.create_experiment("smoke-remote"))
    worker_node = next(n["NodeID"] for n in ray.nodes()
                       if n["Alive"] and n["NodeManagerAddress"] == "127.0.0.3")
    task = log_from_worker.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(worker_node, soft=False))
    ip = ray.get(task.remote(mlflow_server.uri, run.info.run_id), timeout=120)

    assert ip == "127.0.0.3"
    assert [a.path for a in mlflow_client.list_artifacts(run.info.run_id)] == ["from_worker.txt"]


def test_embedded_ray_restarted_under_the_cluster_env_still_runs_actors(ray_local,
                                                                       monkeypatch) -> None:
    """The session's embedded Ray, restarted after a test connected elsewhere while the
    ray_cluster fixture's RAY_AUTH_MODE=disabled was set, still creates actors. Ray 2.60's
    first local ray.init() with RAY_AUTH_MODE unset turns token auth on for the process; a
    second init with it disabled then has every actor "cancelled before it started running"
    (tests/study/test_driver.py failed so after tests/test_services_smoke.py in one process).
    The conftest sets one mode for the whole session before any Ray starts."""
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # what the cluster's nodes run with
    restart_local_ray()

    @ray.remote(num_cpus=1)
    class Probe:
        def ping(self) -> str:
            return "pong"

    assert ray.get(Probe.remote().ping.remote(), timeout=120) == "pong"
