"""docker/kuberay/: a RayJob (ray.io/v1) whose images, commands, ports, variables and files
exist and match the compose stack and the image. No Kubernetes here: these read the manifests."""

from __future__ import annotations

import re
import shlex
from urllib.parse import urlsplit

import pytest
import yaml
from _stack import (
    DOCKER,
    IMAGE_ENTRYPOINT,
    KUBERAY,
    STANDARD_ENV,
    entrypoint_default,
    entrypoint_env_names,
    final_stage,
    kuberay_docs,
    kuberay_object,
    pod_env,
    rayjob_containers,
    resolved_compose,
)

from study._spec import parse_spec


@pytest.fixture(scope="module")
def stack() -> dict:
    return resolved_compose()


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return kuberay_object("RayJob")


def _secret() -> dict[str, str]:
    return kuberay_object("Secret")["stringData"]


def test_every_manifest_is_a_named_kubernetes_object() -> None:
    docs = kuberay_docs()
    assert set(docs) >= {"rayjob.yaml", "storage.yaml", "secret.example.yaml",
                         "spec-configmap.yaml", "kustomization.yaml"}
    for name, objects in docs.items():
        for obj in objects:
            assert obj["apiVersion"] and obj["kind"], name
            if obj["kind"] != "Kustomization":
                assert obj["metadata"]["name"], name
    kustomization = kuberay_object("Kustomization")
    for resource in kustomization["resources"]:
        assert (KUBERAY / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]  # applied by hand, edited


def test_rayjob_runs_the_driver_role_from_the_image(rayjob: dict) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    command = shlex.split(rayjob["spec"]["entrypoint"])
    assert command[:2] == [IMAGE_ENTRYPOINT.rsplit("/", 1)[1], "driver"]
    copies = [rest.split() for word, rest in final_stage() if word == "COPY"]
    assert ["docker/entrypoint.sh", IMAGE_ENTRYPOINT] in copies  # on PATH in /usr/local/bin
    assert rayjob["spec"]["backoffLimit"] >= 1  # a retried driver resumes the study
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_spec_file_is_mounted_from_the_configmap_and_valid(rayjob: dict) -> None:
    spec_path = shlex.split(rayjob["spec"]["entrypoint"])[2]
    head, _ = rayjob_containers()
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    folder, filename = spec_path.rsplit("/", 1)
    volume = next(v for v in head["volumes"] if v["name"] == mounts[folder])
    configmap = kuberay_object("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    spec = parse_spec(yaml.safe_load(configmap["data"][filename]))
    assert spec.resources.gpus_per_trial > 0  # the workers are GPU nodes
    assert spec.pruning.storage is None  # comes from the Secret (KLSTUDY_OPTUNA_STORAGE)


def test_head_is_cpu_only_and_workers_request_gpus(rayjob: dict) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    head_pod, worker_pod = rayjob_containers()
    head_resources = head_pod["containers"][0]["resources"]
    assert all("nvidia.com/gpu" not in head_resources[k] for k in ("requests", "limits"))
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    worker_resources = worker_pod["containers"][0]["resources"]
    gpus = worker_resources["limits"]["nvidia.com/gpu"]
    assert gpus >= 1 and worker_resources["requests"]["nvidia.com/gpu"] == gpus
    (group,) = cluster["workerGroupSpecs"]
    assert group["rayStartParams"]["num-gpus"] == str(gpus)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        worker_pod["tolerations"])
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_study_dir_is_a_shared_pvc_at_the_compose_mount(rayjob: dict, stack: dict) -> None:
    pvc = kuberay_object("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # the head and every worker write
    compose_mount = next(v for v in stack["services"]["ray-worker"]["volumes"]
                         if v.startswith("studies:")).split(":")[1]
    for pod in rayjob_containers():
        claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
        assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts[claim["name"]] == compose_mount
        assert mounts["dshm"] == "/dev/shm"  # Ray's object store (compose: shm_size)
    head_env = pod_env(rayjob_containers()[0])
    assert head_env["KLSTUDY_STUDY_DIR"].startswith(compose_mount + "/")


def test_urls_and_password_come_from_the_secret(rayjob: dict) -> None:
    secret = kuberay_object("Secret")
    head, _ = rayjob_containers()
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in head["containers"][0]["env"]
            if "valueFrom" in e}
    assert set(refs) == {"MLFLOW_TRACKING_URI", "KLSTUDY_OPTUNA_STORAGE", "PGPASSWORD"}
    for name, ref in refs.items():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] == name
        assert name in secret["stringData"]
    for key in ("MLFLOW_TRACKING_URI", "KLSTUDY_OPTUNA_STORAGE"):
        assert urlsplit(_secret()[key]).password is None, key  # libpq reads PGPASSWORD
    assert _secret()["KLSTUDY_OPTUNA_STORAGE"].startswith("postgresql://")


def test_every_variable_is_read_by_someone(rayjob: dict) -> None:
    read = entrypoint_env_names() | STANDARD_ENV
    for pod in rayjob_containers():
        names = {e["name"] for e in pod["containers"][0].get("env", [])}
        assert names <= read, names - read


def test_images_match_compose(rayjob: dict, stack: dict) -> None:
    head, worker = rayjob_containers()
    assert head["containers"][0]["image"] == stack["services"]["ray-head"]["image"]
    assert worker["containers"][0]["image"] == stack["services"]["ray-worker-gpu"]["image"]


def test_ports_match_the_image_and_the_entrypoint(rayjob: dict) -> None:
    head, _ = rayjob_containers()
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    exposed = {int(p) for word, rest in final_stage() if word == "EXPOSE" for p in rest.split()}
    assert ports["gcs-server"] == int(entrypoint_default("KLSTUDY_RAY_PORT"))
    assert ports["dashboard"] == int(entrypoint_default("KLSTUDY_DASHBOARD_PORT"))
    assert {ports["gcs-server"], ports["dashboard"]} <= exposed


def test_ray_start_params_match_the_compose_nodes(rayjob: dict, stack: dict) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params["dashboard-host"] == entrypoint_default("KLSTUDY_BIND_HOST")
    compose_head = stack["services"]["ray-head"]["environment"]
    assert head_params["num-cpus"] == compose_head["KLSTUDY_NUM_CPUS"]
    groups = [head_params, cluster["workerGroupSpecs"][0]["rayStartParams"]]
    for params in groups:
        assert params["object-store-memory"] == compose_head["KLSTUDY_OBJECT_STORE_BYTES"]
    for pod, service in zip(rayjob_containers(), ("ray-head", "ray-worker-gpu"), strict=True):
        compose_env = stack["services"][service]["environment"]
        assert pod_env(pod)["RAY_AUTH_MODE"] == compose_env["RAY_AUTH_MODE"]


def test_ray_version_matches_the_image_pin(rayjob: dict) -> None:
    pins = (DOCKER / "constraints.txt").read_text()
    (ray_pin,) = re.findall(r"^ray==(\S+)$", pins, flags=re.M)
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray_pin
