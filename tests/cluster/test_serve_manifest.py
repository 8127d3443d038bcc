"""``cluster/kubernetes/serve.yaml``: a Deployment of ``vitcnn serve``, its Service and the
token Secret.

Each document is validated against the official JSON schema of its kind (apps/v1
Deployment, v1 Service, v1 Secret: the strict schemas generated from the
Kubernetes 1.37 OpenAPI spec, as the ``kubernetes-validate`` package ships them,
stored under ``schemas/``): an unknown or misplaced field, or a value of the wrong
type, fails. Beyond the schema: the command is one ``vitcnn serve`` accepts and the
bind rules allow (a non-loopback host needs the token file, which the Secret
mounts), the replicas do not run jobs (stateless), the Service reaches the pods'
port, and every Secret referenced exists here or in ``kuberay/secrets.example.yaml``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.common import CLUSTER, core_schema_errors, load, mutated, secret_keys

SERVE = CLUSTER / "kubernetes" / "serve.yaml"


def documents() -> dict[str, dict[str, Any]]:
    docs = load(SERVE)
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs) == 3, [d["kind"] for d in docs]
    return by_kind


@pytest.mark.parametrize("kind", ["Secret", "Deployment", "Service"])
def test_documents_fit_the_api_types(kind: str) -> None:
    errors = core_schema_errors(kind, documents()[kind])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("kind", "path", "key", "value"),
    [
        ("Deployment", "spec.template.spec.containers.0", "envs", []),
        ("Deployment", "spec", "replicas", "2"),
        ("Service", "spec.ports.0", "targetport", 8000),
        ("Service", "spec.ports.0", "port", "http"),
        ("Secret", "", "stringdata", {}),
        ("Deployment", "spec.template.spec.containers.0.readinessProbe", "httpGet", {}),
    ],
)
def test_the_schema_check_can_fail(kind: str, path: str, key: str, value: Any) -> None:
    assert core_schema_errors(kind, mutated(documents()[kind], path, key, value))


def _container() -> dict[str, Any]:
    return documents()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def test_the_command_is_a_safe_vitcnn_serve() -> None:
    from vitcnn_store.cli import build_parser
    from vitcnn_store.serve.config import ServeConfig, check_serve_config

    command = _container()["command"]
    assert command[:2] == ["vitcnn", "serve"]
    args = build_parser().parse_args(command[1:])
    assert args.host == "0.0.0.0" and not args.allow_jobs  # replicas keep no job state
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    folder, name = args.token_file.rsplit("/", 1)
    volumes = {
        v["name"]: v for v in documents()["Deployment"]["spec"]["template"]["spec"]["volumes"]
    }
    secret = volumes[mounts[folder]]["secret"]
    assert secret["secretName"] == documents()["Secret"]["metadata"]["name"]
    assert {"key": "token", "path": name} in secret["items"]
    assert "token" in documents()["Secret"]["stringData"]
    # The bind rules accept this host with a token (and would refuse it without).
    config = ServeConfig(store=args.store, host=args.host, token="x" * 32)
    assert check_serve_config(config) is config


def test_service_reaches_the_pods_and_credentials_come_from_a_secret() -> None:
    deployment, service = documents()["Deployment"], documents()["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    assert str(ports["http"]) in _container()["command"]
    known = {name for name, _ in secret_keys()} | {documents()["Secret"]["metadata"]["name"]}
    refs = [e["secretRef"]["name"] for e in _container().get("envFrom", [])]
    assert "vitcnn-object-store" in refs and set(refs) <= known
    assert documents()["Secret"]["stringData"]["token"].startswith("REPLACE_")
