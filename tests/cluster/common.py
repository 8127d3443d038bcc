"""Shared readers for the tests of ``cluster/``: YAML manifests, the official CRD
schemas kept under ``schemas/``, and the Dockerfile (through Docker's own parser).

Nothing here imports Ray or starts anything; each test module picks what it needs.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
DOCKER = CLUSTER / "docker"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The Kubernetes manifests (the launcher config under aws/ is Ray's format, not Kubernetes').
K8S_FILES = sorted([*KUBERAY.glob("*.yaml"), *(CLUSTER / "dask").glob("*.yaml")])

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 1+ MB


def load(path: Path) -> list[dict[str, Any]]:
    """Every YAML document of ``path`` (empty documents dropped)."""
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load(path)
    assert len(docs) == 1, f"{path.name}: expected one document, got {len(docs)}"
    return docs[0]


# -- Kubernetes odds and ends --------------------------------------------------------

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (``16Gi``, ``500M``, ``2``) as a number."""
    m = re.fullmatch(r"([0-9.]+)(|k|M|G|Ki|Mi|Gi)", str(text))
    assert m, f"unexpected quantity {text!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def secret_keys() -> set[tuple[str, str]]:
    """(Secret name, key) pairs that secrets.example.yaml defines."""
    keys = set()
    for doc in load(KUBERAY / "secrets.example.yaml"):
        assert doc["kind"] == "Secret" and doc["apiVersion"] == "v1"
        for part in ("stringData", "data"):
            keys |= {(doc["metadata"]["name"], k) for k in doc.get(part) or {}}
    return keys


def secret_refs(node: Any) -> Iterator[dict[str, Any]]:
    """Every ``secretKeyRef`` anywhere below ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "secretKeyRef":
                yield value
            else:
                yield from secret_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from secret_refs(item)


# -- official CRD schemas ------------------------------------------------------------


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file with these bytes (as in ``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def schema_sources() -> dict[str, dict[str, str]]:
    sources: dict[str, dict[str, str]] = json.loads((SCHEMAS / "sources.json").read_text())
    return sources


def schema_files(kind: str) -> list[str]:
    """File names of the stored CRDs of ``kind`` (RayCluster, RayJob, DaskCluster)."""
    return sorted(name for name, src in schema_sources().items() if src["kind"] == kind)


def read_schema_file(name: str) -> bytes:
    return gzip.decompress((SCHEMAS / name).read_bytes())


@functools.cache
def _crd(name: str) -> dict[str, Any]:
    crd = yaml.load(read_schema_file(name), Loader=_Loader)
    assert crd["kind"] == "CustomResourceDefinition", name
    return crd


def crd_schema(name: str, api_version: str) -> dict[str, Any]:
    """The closed openAPIV3Schema of ``api_version`` (``group/version``) in CRD ``name``."""
    crd = _crd(name)
    group, _, version = api_version.partition("/")
    assert crd["spec"]["group"] == group, f"{name} serves {crd['spec']['group']}, not {group}"
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions, f"{name} has no version {version} (has {sorted(versions)})"
    assert versions[version].get("served", True), f"{name}: {api_version} is not served"
    schema = close_schema(versions[version]["schema"]["openAPIV3Schema"])
    # Every object's root takes these whatever the CRD lists; the API server checks
    # metadata as ObjectMeta (see the name checks in the tests).
    implicit = {
        "apiVersion": {"type": "string", "enum": [api_version]},
        "kind": {"type": "string", "enum": [crd["spec"]["names"]["kind"]]},
        "metadata": {"type": "object"},
    }
    schema["properties"] = {**schema.get("properties", {}), **implicit}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return schema


def close_schema(node: Any) -> Any:
    """A copy of a structural schema in which unknown fields are errors.

    The API server prunes (or, with strict field validation, rejects) any field that an
    object schema with ``properties`` does not list, unless the node says
    ``x-kubernetes-preserve-unknown-fields``; plain JSON Schema allows them. Adding
    ``additionalProperties: false`` to exactly those nodes gives JSON Schema the API
    server's view. ``nullable: true`` becomes a ``null`` in the type.
    """
    if isinstance(node, list):
        return [close_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: close_schema(value) for key, value in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def schema_errors(schema: dict[str, Any], document: dict[str, Any]) -> list[str]:
    """Every violation of ``schema`` by ``document``, one line each, by path."""
    import jsonschema

    # OpenAPI 3.0 schemas are a dialect of JSON Schema draft 4 (boolean exclusiveMinimum...).
    validator = jsonschema.Draft4Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.path)))
    return [f"{_dotted(e.absolute_path)}: {e.message}" for e in errors]


@functools.cache
def _core_validator(kind: str) -> Any:
    """A validator of the official JSON schema of core ``kind`` (Deployment, Service, Secret),
    its ``$ref``s resolved in the stored ``_definitions.json``, never over the network."""
    import jsonschema
    from referencing import Registry, Resource

    def stored(of: str) -> dict[str, Any]:
        (name,) = [n for n, src in schema_sources().items() if src["kind"] == of]
        loaded: dict[str, Any] = json.loads(read_schema_file(name))
        return loaded

    definitions = stored("definitions")
    registry: Any = Registry().with_resource(
        definitions["$id"], Resource.from_contents(definitions)
    )
    return jsonschema.Draft202012Validator(stored(kind), registry=registry)


def core_schema_errors(kind: str, document: dict[str, Any]) -> list[str]:
    """Every violation of the official schema of core ``kind`` by ``document``, by path."""
    errors = sorted(
        _core_validator(kind).iter_errors(document), key=lambda e: list(map(str, e.path))
    )
    return [f"{_dotted(e.absolute_path)}: {e.message}" for e in errors]


def _dotted(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(top)"


def mutated(document: dict[str, Any], path: str, key: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``document`` with ``value`` set at ``key`` of the dict at ``path``
    (dotted, integers index lists)."""
    out = copy.deepcopy(document)
    node: Any = out
    for part in path.split(".") if path else []:
        node = node[int(part)] if part.isdigit() else node[part]
    node[key] = value
    return out


# -- the Dockerfile -----------------------------------------------------------------


@dataclass
class Instruction:
    """One Dockerfile instruction: keyword, its ``--flags``, its arguments, its line."""

    keyword: str
    flags: dict[str, list[str]] = field(default_factory=dict)
    value: tuple[str, ...] = ()
    line: int = 0

    @property
    def args(self) -> str:
        return " ".join(self.value)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile, read by Docker's own parser (moby/buildkit's Go
    parser, through the ``dockerfile`` package): directives and comments dropped,
    continuations joined; a syntax error raises."""
    import dockerfile as docker_parser

    out = []
    for command in docker_parser.parse_string(text):
        flags: dict[str, list[str]] = {}
        for flag in command.flags:
            name, _, value = flag.removeprefix("--").partition("=")
            flags.setdefault(name, []).append(value)
        out.append(Instruction(command.cmd.upper(), flags, command.value, command.start_line))
    return out


def dockerfile() -> list[Instruction]:
    return parse_dockerfile((DOCKER / "Dockerfile").read_text())


def arg_defaults(instructions: list[Instruction], *, global_only: bool = False) -> dict[str, str]:
    """Default values of the ``ARG`` instructions (only those before the first FROM)."""
    out: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM" and global_only:
            break
        if ins.keyword == "ARG":
            for word in ins.value:
                name, sep, value = word.partition("=")
                if sep:
                    out[name] = value.strip('"')
    return out


def expand(text: str, variables: dict[str, str]) -> str:
    """``${NAME}`` / ``$NAME`` replaced as Docker does for ARG values."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def base_image(**build_args: str) -> str:
    """The image the Dockerfile builds FROM with these ``--build-arg`` values."""
    instructions = dockerfile()
    variables = {**arg_defaults(instructions, global_only=True), **build_args}
    (first,) = [ins for ins in instructions if ins.keyword == "FROM"]
    return expand(first.value[0], variables)
