"""The Kubernetes manifests of ``cluster/`` (KubeRay RayCluster and RayJob, the dask
operator's DaskCluster, the example Secrets): each validates against the official CRD
schema of every stored operator release (``schemas/``) with unknown fields as errors,
passes the checks the KubeRay operator applies before it acts (its
``validation.go``), and carries what this project needs (GPU workers, the token, the
store credentials, an image built by ``cluster/docker/Dockerfile``).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.common import (
    CLUSTER,
    K8S_FILES,
    KUBERAY,
    arg_defaults,
    crd_schema,
    dockerfile,
    env_of,
    git_blob_sha1,
    load,
    load_one,
    mutated,
    quantity,
    read_schema_file,
    schema_errors,
    schema_files,
    schema_sources,
    secret_keys,
    secret_refs,
)

CUSTOM_RESOURCES = [
    (path, doc) for path in K8S_FILES for doc in load(path) if doc["kind"] != "Secret"
]
# Where the GPU image tag of the manifests comes from: cluster/docker/Dockerfile's PLATFORM.
DOCKERFILE_ARGS = arg_defaults(dockerfile())
PROJECT_IMAGE = re.compile(r"REGISTRY/vitcnn-store:(?P<version>[\w.]+)-(?P<platform>cpu|cu\d{3})")


def _ids(item: tuple[Path, dict[str, Any]]) -> str:
    return f"{item[0].relative_to(CLUSTER)}:{item[1]['kind']}"


# -- the stored schemas are the upstream files ------------------------------------------


@pytest.mark.parametrize("name", sorted(schema_sources()))
def test_stored_schema_is_the_upstream_file(name: str) -> None:
    source = schema_sources()[name]
    if "wheel" in source:  # a member of a PyPI wheel: its RECORD line names its sha256
        digest = hashlib.sha256(read_schema_file(name)).digest()
        record = "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        assert record == source["record_sha256"], f"{name} is not {source['member']}"
        assert source["url"] == f"https://pypi.org/project/{source['package']}/{source['version']}/"
        assert git_blob_sha1(read_schema_file(name)) == source["git_blob_sha1"]
        return
    assert source["url"].startswith("https://raw.githubusercontent.com/"), source
    assert f"/{source['tag']}/" in source["url"], "the URL names the release it came from"
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert git_blob_sha1(read_schema_file(name)) == source["git_blob_sha1"], (
        f"{name} is not byte for byte the file at {source['url']}"
    )


def test_every_kind_has_a_schema() -> None:
    kinds = {doc["kind"] for _, doc in CUSTOM_RESOURCES}
    assert kinds == {"RayCluster", "RayJob", "DaskCluster"}
    for kind in kinds:
        assert schema_files(kind), f"no stored CRD for {kind}"


# -- schema validation ------------------------------------------------------------------


@pytest.mark.parametrize("item", CUSTOM_RESOURCES, ids=_ids)
def test_manifest_validates_against_every_stored_crd(item: tuple[Path, dict[str, Any]]) -> None:
    path, doc = item
    for name in schema_files(doc["kind"]):
        errors = schema_errors(crd_schema(name, doc["apiVersion"]), doc)
        assert not errors, f"{path.name} against {name}:\n" + "\n".join(errors)


# A typo'd field, a field of the wrong type, and a field in the wrong place, for each kind:
# the validation above must report each (else it could not fail).
BREAKAGES: dict[str, list[tuple[str, str, Any]]] = {
    "RayCluster": [
        ("spec.workerGroupSpecs.0", "rayStartParam", {"num-cpus": "1"}),
        ("spec.headGroupSpec", "serviceType", 3),
        ("spec", "authOptions", {"mode": "token", "token": "x"}),
    ],
    "RayJob": [
        ("spec", "runtimeEnv", "pip: [x]"),
        ("spec", "backoffLimit", "2"),
        ("spec.rayClusterSpec.headGroupSpec.template.spec.containers.0", "envs", []),
    ],
    "DaskCluster": [
        ("spec.scheduler.service", "typo", 1),
        ("spec.worker", "replicas", "4"),
        ("spec.worker.spec.containers.0", "argz", []),
    ],
}


@pytest.mark.parametrize("item", CUSTOM_RESOURCES, ids=_ids)
def test_validation_reports_unknown_and_wrong_fields(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    for name in schema_files(doc["kind"]):
        schema = crd_schema(name, doc["apiVersion"])
        for path, key, value in BREAKAGES[doc["kind"]]:
            errors = schema_errors(schema, mutated(doc, path, key, value))
            where = f"{path}.{key}" if path else key
            assert any(e.startswith(where) or f"'{key}'" in e for e in errors), (
                f"{name} did not report {where}={value!r}: {errors}"
            )


# -- what the KubeRay operator checks before it acts (controllers/ray/utils/validation.go) --

MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # MaxRayClusterNameLength, MaxRayJobNameLength
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def ray_cluster_spec_rules(spec: dict[str, Any]) -> list[str]:
    """ValidateRayClusterSpec of KubeRay 1.5.1, the parts these manifests can touch."""
    problems = []
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        if not group["template"]["spec"].get("containers"):
            problems.append(f"{name}: at least one container")
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and (
            group.get("resources")
        ):
            problems.append(f"{name}: resources in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{name}: rayStartParams['labels'] is not supported")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        ray_version = tuple(int(x) for x in spec.get("rayVersion", "0").split(".")[:3])
        if ray_version < (2, 52, 0):
            problems.append("authOptions.mode token needs rayVersion >= 2.52.0")
    if not spec.get("enableInTreeAutoscaling"):
        head_env = env_of(spec["headGroupSpec"]["template"]["spec"]["containers"][0])
        if head_env.get("RAY_enable_autoscaler_v2", {}).get("value") in ("1", "true"):
            problems.append("autoscaler v2 env without enableInTreeAutoscaling")
    return problems


def ray_job_spec_rules(spec: dict[str, Any]) -> list[str]:
    """ValidateRayJobSpec of KubeRay 1.5.1, the parts these manifests can touch."""
    problems = []
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append("suspend needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append("ttlSecondsAfterFinished < 0")
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        problems.append("backoffLimit with InteractiveMode")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        problems.append("activeDeadlineSeconds <= 0")
    if spec.get("backoffLimit") is not None and spec["backoffLimit"] < 0:
        problems.append("backoffLimit < 0")
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
        if not isinstance(env, dict):
            problems.append("runtimeEnvYAML is not a mapping")
    except yaml.YAMLError as e:
        problems.append(f"runtimeEnvYAML is not YAML: {e}")
    if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
        problems.append("one of rayClusterSpec or clusterSelector")
    if "rayClusterSpec" in spec:
        problems += ray_cluster_spec_rules(spec["rayClusterSpec"])
    return problems


@pytest.mark.parametrize("item", CUSTOM_RESOURCES, ids=_ids)
def test_operator_accepts_names_and_specs(item: tuple[Path, dict[str, Any]]) -> None:
    path, doc = item
    name = doc["metadata"]["name"]
    assert DNS_1035.fullmatch(name), f"{path.name}: {name!r} is not a DNS-1035 label"
    assert len(name) <= MAX_NAME.get(doc["kind"], 63), f"{path.name}: name too long"
    if doc["kind"] == "RayCluster":
        assert ray_cluster_spec_rules(doc["spec"]) == []
    elif doc["kind"] == "RayJob":
        assert ray_job_spec_rules(doc["spec"]) == []


def test_operator_rules_can_fail() -> None:
    job = load_one(KUBERAY / "rayjob.yaml")["spec"]
    assert ray_job_spec_rules({**job, "shutdownAfterJobFinishes": False})
    old = mutated({"spec": job}, "spec.rayClusterSpec", "rayVersion", "2.51.0")["spec"]
    assert "authOptions.mode token needs rayVersion >= 2.52.0" in ray_job_spec_rules(old)


# -- this project's conventions --------------------------------------------------------


def check_pod(pod: dict[str, Any], start_params: dict[str, Any]) -> dict[str, Any]:
    """Checks shared by every Ray pod template; returns its Ray container."""
    spec = pod["spec"]
    container = spec["containers"][0]
    assert container["name"] and container["image"], "the Ray container needs a name and an image"
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts") or []}
    for mount in mounts.values():
        assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"
    shm = mounts.get("/dev/shm")
    assert shm, "Ray's object store needs /dev/shm mounted"
    empty_dir = volumes[shm["name"]].get("emptyDir")
    assert empty_dir and empty_dir.get("medium") == "Memory", "/dev/shm must be emptyDir Memory"
    if "object-store-memory" in start_params and "sizeLimit" in empty_dir:
        assert quantity(start_params["object-store-memory"]) < quantity(empty_dir["sizeLimit"])
    limits = container["resources"]["limits"]
    requests = container["resources"].get("requests") or {}
    assert "cpu" in limits and "memory" in limits
    for name, value in requests.items():
        assert quantity(value) <= quantity(limits[name]), f"request {name} above its limit"
    env = env_of(container)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
    return container


def check_ray_cluster_spec(spec: dict[str, Any], *, token_from_secret: bool) -> None:
    """What this project needs of a RayClusterSpec: its Ray, GPU workers, the token."""
    assert spec["rayVersion"] == version("ray"), "rayVersion must match the Ray of the image"
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams are strings"
    head_container = check_pod(head["template"], head["rayStartParams"])
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265} <= ports, "the head serves the GCS (6379) and the job server (8265)"
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert head["rayStartParams"].get("num-gpus") == "0"

    containers = [head_container]
    assert len({g["groupName"] for g in groups}) == len(groups), "groupName must be unique"
    for group in groups:
        lo, n, hi = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert 0 <= lo <= n <= hi, f"{group['groupName']}: want min <= replicas <= max"
        containers.append(check_pod(group["template"], group["rayStartParams"]))
    gpu = [c for c in containers[1:] if "nvidia.com/gpu" in c["resources"]["limits"]]
    assert gpu, "a GPU worker group"
    for container in gpu:
        limit = container["resources"]["limits"]["nvidia.com/gpu"]
        request = container["resources"].get("requests", {}).get("nvidia.com/gpu", limit)
        assert int(limit) >= 1 and request == limit, "GPU requests must equal limits"
    for container in containers:  # the image built by cluster/docker/Dockerfile, GPU variant
        m = PROJECT_IMAGE.fullmatch(container["image"])
        assert m, f"{container['image']} is not REGISTRY/vitcnn-store:VERSION-PLATFORM"
        assert m["version"] == version("vitcnn_store")
        assert m["platform"] == DOCKERFILE_ARGS["PLATFORM"], "the Dockerfile's GPU build"

    if token_from_secret:  # RAY_AUTH_MODE/RAY_AUTH_TOKEN by hand, the same on every container
        refs = set()
        for container in containers:
            env = env_of(container)
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            refs.add((ref["name"], ref["key"]))
        assert len(refs) == 1, "head and workers must share one token"
        assert refs <= secret_keys(), "RAY_AUTH_TOKEN's Secret is in secrets.example.yaml"
    else:  # KubeRay makes and injects the token (and uses it to poll the job)
        assert spec["authOptions"]["mode"] == "token"
        for container in containers:
            assert "RAY_AUTH_TOKEN" not in env_of(container), "authOptions injects it"


def test_secret_references_exist() -> None:
    """Every ``secretKeyRef`` names a key of secrets.example.yaml, and the manifests that
    read credentials do hold such references (so the check is not passed by finding none)."""
    known = secret_keys()
    refs = {path: [r for doc in load(path) for r in secret_refs(doc)] for path in K8S_FILES}
    referring = {str(path.relative_to(CLUSTER)) for path, found in refs.items() if found}
    assert referring >= {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "dask/daskcluster.yaml",
    }, referring
    for path, found in refs.items():
        for ref in found:
            assert (ref["name"], ref["key"]) in known, f"{path}: {ref} not in secrets.example.yaml"


def test_secrets_are_placeholders() -> None:
    docs = {d["metadata"]["name"]: d for d in load(KUBERAY / "secrets.example.yaml")}
    assert "REPLACE" in docs["vitcnn-ray-auth"]["stringData"]["auth_token"]
    store = docs["vitcnn-object-store"]["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(store)
    assert "REPLACE" in store["AWS_SECRET_ACCESS_KEY"]


def test_raycluster() -> None:
    doc = load_one(KUBERAY / "raycluster.yaml")
    check_ray_cluster_spec(doc["spec"], token_from_secret=True)


def test_rayjob() -> None:
    spec = load_one(KUBERAY / "rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["vitcnn", "extract"]
    assert "--resume" in argv and "--overwrite" not in argv, "a re-run must continue, not restart"
    from vitcnn_store.cli import build_parser  # argparse only

    args = build_parser().parse_args(argv[1:])  # the entrypoint is a valid `vitcnn extract`
    assert args.resume and args.store.startswith("s3://"), "workers need a shared store"
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    check_ray_cluster_spec(cluster, token_from_secret=False)
    # The cluster fits the job: GPUs and CPUs of the worker groups.
    gpus = cpus = 0.0
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
        cpus += group["replicas"] * quantity(limits["cpu"])
    # "auto" sizes actors from the cluster's resources, so only fixed numbers can overflow it.
    assert args.workers != "auto", "the job names its actor count"
    for per_worker, available in ((args.gpus_per_worker, gpus), (args.cpus_per_worker, cpus)):
        assert per_worker == "auto" or args.workers * per_worker <= available
    # The head mounts what --images names (the driver lists the folder).
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(args.images.startswith(m["mountPath"]) for m in head["volumeMounts"])


def test_rayjob_needs_the_project_image_and_installs_nothing() -> None:
    """The job runs on the project's image (its comment says so); its runtime environment
    pins no package (vitcnn_store is on no index) and ships no code."""
    text = (KUBERAY / "rayjob.yaml").read_text()
    assert "needs the project's image" in text and "NOT run on a plain rayproject/ray" in text
    spec = load_one(KUBERAY / "rayjob.yaml")["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    installs = {"pip", "uv", "conda", "py_modules", "working_dir", "py_executable"}
    assert not installs & set(runtime_env), f"the image holds everything: {runtime_env}"
    assert set(runtime_env) <= {"env_vars", "config"}
    for container in containers_of(spec["rayClusterSpec"]):
        assert not container["image"].startswith("rayproject/"), container["image"]


def containers_of(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_dask_manifest() -> None:
    doc = load_one(CLUSTER / "dask" / "daskcluster.yaml")
    name = doc["metadata"]["name"]
    worker, scheduler = doc["spec"]["worker"], doc["spec"]["scheduler"]
    assert worker["replicas"] >= 1
    w = worker["spec"]["containers"][0]
    assert w["args"][:2] == ["dask", "worker"]
    assert "$(DASK_WORKER_NAME)" in w["args"], "the operator names workers through this"
    assert "--memory-limit" in w["args"]
    s = scheduler["spec"]["containers"][0]
    assert s["image"] == w["image"], "scheduler and workers must run the same versions"
    m = PROJECT_IMAGE.fullmatch(w["image"])
    assert m and m["platform"] == "cpu", "dask pods run the CPU build of the project image"
    assert s["args"][:2] == ["dask", "scheduler"]
    ports = {p["name"]: p["containerPort"] for p in s["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}, "port names the operator uses"
    service = scheduler["service"]
    assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    assert {p["targetPort"] for p in service["ports"]} <= set(ports)
    assert service["type"] == "ClusterIP"
    for container in (w, s):
        assert "secretKeyRef" in env_of(container)["AWS_ACCESS_KEY_ID"]["valueFrom"]
