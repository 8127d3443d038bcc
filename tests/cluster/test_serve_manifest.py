"""``cluster/kubernetes/serve.yaml``: a Deployment of ``vitcnn serve``, its Service and the
token Secret.

The suite stores no official schema of the core kinds (``schemas/`` holds the
operators' CRDs only), so each document is checked against a closed
structural schema of the fields it uses, written from the Kubernetes API
reference (apps/v1 Deployment, core/v1 Service, Secret, PodSpec): an unknown
or misplaced field, or a value of the wrong type, fails. Beyond the schema:
the command is one ``vitcnn serve`` accepts and the bind rules allow (a
non-loopback host needs the token file, which the Secret mounts), the
replicas do not run jobs (stateless), the Service reaches the pods' port, and
every Secret referenced exists here or in ``kuberay/secrets.example.yaml``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.common import CLUSTER, load, mutated, schema_errors, secret_keys

SERVE = CLUSTER / "kubernetes" / "serve.yaml"


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}  # fmt: skip


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
INT_OR_STR = {"type": ["integer", "string"]}
LABELS = {"type": "object", "additionalProperties": STR}
META = _obj({"name": STR, "labels": LABELS, "annotations": LABELS})
SECRET_KEY_REF = _obj({"secretKeyRef": _obj({"name": STR, "key": STR}, ("key",))})
ENV = {"type": "array", "items": _obj({"name": STR, "value": STR, "valueFrom": SECRET_KEY_REF},
                                      ("name",))}  # fmt: skip
PROBE = _obj({
    "tcpSocket": _obj({"port": INT_OR_STR}, ("port",)),
    "httpGet": _obj({"path": STR, "port": INT_OR_STR}, ("port",)),
    "initialDelaySeconds": INT, "periodSeconds": INT, "timeoutSeconds": INT,
    "failureThreshold": INT,
})  # fmt: skip
QUANTITIES = {"type": "object", "additionalProperties": INT_OR_STR}
CONTAINER = _obj(
    {
        "name": STR, "image": STR, "command": {"type": "array", "items": STR},
        "args": {"type": "array", "items": STR},
        "ports": {"type": "array", "items": _obj(
            {"name": STR, "containerPort": INT, "protocol": {"enum": ["TCP", "UDP", "SCTP"]}},
            ("containerPort",))},
        "env": ENV,
        "envFrom": {"type": "array", "items": _obj({"secretRef": _obj({"name": STR}, ("name",))})},
        "volumeMounts": {"type": "array", "items": _obj(
            {"name": STR, "mountPath": STR, "readOnly": BOOL}, ("name", "mountPath"))},
        "readinessProbe": PROBE, "livenessProbe": PROBE,
        "resources": _obj({"requests": QUANTITIES, "limits": QUANTITIES}),
        "securityContext": _obj({"allowPrivilegeEscalation": BOOL, "readOnlyRootFilesystem": BOOL,
                                 "runAsNonRoot": BOOL, "runAsUser": INT}),
    },
    ("name",),
)  # fmt: skip
VOLUME = _obj(
    {
        "name": STR, "emptyDir": {"type": "object", "additionalProperties": False},
        "secret": _obj({"secretName": STR, "items": {"type": "array", "items": _obj(
            {"key": STR, "path": STR}, ("key", "path"))}}),
    },
    ("name",),
)  # fmt: skip
POD_SPEC = _obj({
    "containers": {"type": "array", "items": CONTAINER, "minItems": 1},
    "volumes": {"type": "array", "items": VOLUME},
    "securityContext": _obj({"runAsNonRoot": BOOL, "runAsUser": INT, "fsGroup": INT}),
}, ("containers",))  # fmt: skip
SCHEMAS = {
    "Secret": _obj({"apiVersion": {"const": "v1"}, "kind": STR, "metadata": META,
                    "type": STR, "stringData": LABELS, "data": LABELS},
                   ("apiVersion", "kind", "metadata")),
    "Deployment": _obj({
        "apiVersion": {"const": "apps/v1"}, "kind": STR, "metadata": META,
        "spec": _obj({
            "replicas": INT,
            "selector": _obj({"matchLabels": LABELS}, ("matchLabels",)),
            "template": _obj({"metadata": META, "spec": POD_SPEC}, ("spec",)),
        }, ("selector", "template")),
    }, ("apiVersion", "kind", "metadata", "spec")),
    "Service": _obj({
        "apiVersion": {"const": "v1"}, "kind": STR, "metadata": META,
        "spec": _obj({
            "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "selector": LABELS,
            "ports": {"type": "array", "minItems": 1, "items": _obj(
                {"name": STR, "port": INT, "targetPort": INT_OR_STR,
                 "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}, ("port",))},
        }, ("selector", "ports")),
    }, ("apiVersion", "kind", "metadata", "spec")),
}  # fmt: skip


def documents() -> dict[str, dict[str, Any]]:
    docs = load(SERVE)
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs) == 3, [d["kind"] for d in docs]
    return by_kind


@pytest.mark.parametrize("kind", ["Secret", "Deployment", "Service"])
def test_documents_fit_the_api_types(kind: str) -> None:
    errors = schema_errors(SCHEMAS[kind], documents()[kind])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("kind", "path", "key", "value"),
    [
        ("Deployment", "spec.template.spec.containers.0", "envs", []),
        ("Deployment", "spec", "replicas", "2"),
        ("Service", "spec.ports.0", "targetport", 8000),
    ],
)
def test_the_schema_check_can_fail(kind: str, path: str, key: str, value: Any) -> None:
    assert schema_errors(SCHEMAS[kind], mutated(documents()[kind], path, key, value))


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
