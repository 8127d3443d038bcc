"""``cluster/aws/ray-cluster.yaml``, the config of Ray's cluster launcher (``ray up``).

Checked the way ``ray up`` checks it before it calls AWS: against the schema shipped in
the ``ray`` package (``ray/autoscaler/ray-schema.json``), then through Ray's own
``prepare_config`` (defaults merged) and ``validate_config``. Each node type's
``node_config`` goes to EC2's RunInstances as it is, so it is checked against
botocore's model of that call. None of this needs AWS credentials or the network.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.common import CLUSTER, ROOT, base_image, load_one

CONFIG = CLUSTER / "aws" / "ray-cluster.yaml"
# NVIDIA GPU instance families of EC2 (G4dn T4, G5 A10G, G6 L4, G6e L40S, P3 V100,
# P4d A100, P5 H100, P6 B200 ...); the worker type must be one of them.
NVIDIA_FAMILIES = {
    "g4dn",
    "g5",
    "g6",
    "g6e",
    "gr6",
    "g7",
    "p3",
    "p3dn",
    "p4d",
    "p4de",
    "p5",
    "p5e",
    "p5en",
    "p6-b200",
    "p6-b300",
}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load_one(CONFIG)


@pytest.fixture(scope="module")
def prepared(config: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    out = prepare_config(copy.deepcopy(config))
    validate_config(out)
    return out


def ray_schema_errors(config: dict[str, Any]) -> list[str]:
    import jsonschema
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(path.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(config)]


def test_config_matches_rays_schema(config: dict[str, Any]) -> None:
    assert ray_schema_errors(config) == []


def test_rays_checks_catch_mistakes(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = {**config, "head_setup_command": []}
    assert any("head_setup_command" in e for e in ray_schema_errors(typo))
    too_few = copy.deepcopy(config)
    too_few["max_workers"] = 0
    too_few["available_node_types"]["ray.worker.gpu"]["min_workers"] = 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(too_few))


def test_prepared_config_has_our_commands_only(prepared: dict[str, Any]) -> None:
    """Ray's AWS defaults would add setup commands (a dev wheel of Ray, boto3); every
    command list is ours."""
    assert prepared["setup_commands"] == [] and prepared["initialization_commands"] == []
    assert prepared["head_node_type"] == "ray.head.cpu"
    for key in ("head_setup_commands", "worker_setup_commands"):
        (command,) = prepared[key]
        assert "install.sh" in command, command


def run_instances_errors(node_config: dict[str, Any]) -> str:
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("ec2")
    shape = model.operation_model("RunInstances").input_shape
    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, shape)
    errors: str = report.generate_report() if report.has_errors() else ""
    enum = shape.members["InstanceType"].enum
    if node_config["InstanceType"] not in enum:
        errors += f"\nunknown InstanceType {node_config['InstanceType']}"
    return errors


def test_node_configs_are_valid_run_instances_requests(config: dict[str, Any]) -> None:
    for name, node_type in config["available_node_types"].items():
        assert run_instances_errors(node_type["node_config"]) == "", name
    bad = {**config["available_node_types"]["ray.worker.gpu"]["node_config"], "InstanceTyp": "x"}
    assert "InstanceTyp" in run_instances_errors(bad)


def family(instance_type: str) -> str:
    return instance_type.rsplit(".", 1)[0]


def test_a_cpu_head_and_gpu_workers(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert family(head["node_config"]["InstanceType"]) not in NVIDIA_FAMILIES
    assert head["resources"] == {"CPU": 0}, "the head runs drivers only, as on KubeRay"
    assert head["max_workers"] == 0
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    assert workers, "a worker node type"
    for name, worker in workers.items():
        assert family(worker["node_config"]["InstanceType"]) in NVIDIA_FAMILIES, name
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= prepared["max_workers"]


def test_images_and_install_match_the_dockerfile(config: dict[str, Any]) -> None:
    """Each node type runs Ray's image of the Dockerfile's base and installs the package
    with the Dockerfile's recipe (install.sh) for the same PLATFORM."""
    docker = config["docker"]
    images = {"head": docker["head_image"], "worker": docker["worker_image"]}
    assert images["head"] == base_image(PLATFORM="cpu")
    assert images["worker"] == base_image()  # the Dockerfile's default CUDA build
    for role, image in images.items():
        assert image.startswith(f"rayproject/ray:{version('ray')}-")
        platform = image.rsplit("-", 1)[-1]
        (command,) = config[f"{role}_setup_commands"]
        words = shlex.split(command)
        assert words[0] == "bash" and words[1].endswith("/install.sh")
        assert words[2] == platform, f"{role}: install.sh {words[2]} on a -{platform} image"
        assert local_path(config, words[1]).resolve() == (CLUSTER / "docker" / "install.sh")
        assert local_path(config, words[3]).resolve() == CLUSTER / "docker" / "dist"


def local_path(config: dict[str, Any], remote: str) -> Path:
    """Where a path on the nodes comes from, by the config's file_mounts."""
    for mount, local in config["file_mounts"].items():
        if remote == mount or remote.startswith(mount + "/"):
            return ROOT / local / remote[len(mount) :].lstrip("/")
    raise AssertionError(f"{remote} is in no file mount")


def test_file_mounts_are_folders_of_the_repository(config: dict[str, Any]) -> None:
    for remote, local in config["file_mounts"].items():
        assert remote.startswith("/home/ray/"), "inside the container, the ray user's home"
        assert not Path(local).is_absolute(), "relative to the repository root"
        # Ray bind-mounts file mounts into the container; only folders stay in sync.
        assert (ROOT / local).is_dir(), f"{local} must be a folder of the repository"


def test_credentials_come_from_the_environment_file(config: dict[str, Any]) -> None:
    text = CONFIG.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "no access key in the config"
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[=:]", text), "no secret key in the config"
    env_dir = CLUSTER / "aws" / "env"
    example = (env_dir / "cluster.env.example").read_text()
    names = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", example, re.M))
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= names
    assert all(n.startswith(("AWS_", "RAY_AUTH_")) for n in names), names
    assert not re.search(r"^[A-Z]", example, re.M), "the example sets nothing until edited"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(env_dir / "cluster.env")], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, "git must ignore the filled-in cluster.env"
    for role in ("head", "worker"):
        start = " ".join(config[f"{role}_start_ray_commands"])
        sourced = re.search(r"\. (\S+cluster\.env)", start)
        assert sourced, f"{role} start commands export cluster.env"
        assert local_path(config, sourced[1]) == env_dir / "cluster.env"
        assert start.index("set -a") < start.index("ray start"), "exported before ray start"


def test_commands_are_valid_shell(prepared: dict[str, Any]) -> None:
    keys = [k for k in prepared if k.endswith("_commands")]
    for key in keys:
        for command in prepared[key]:
            out = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert out.returncode == 0, f"{key}: {command}\n{out.stderr}"
