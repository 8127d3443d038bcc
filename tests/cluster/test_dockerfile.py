"""``cluster/docker/Dockerfile`` and its install recipe ``install.sh``.

No Docker daemon runs here, so the image is never built in the suite. Instead the
Dockerfile is parsed as Docker parses it and checked against what the base image
gives: Ray's images run as user ``ray`` (UID 1000), so no step may need root rights on
files, and the base image tag and the torch wheel index must name the same CUDA build.
``install.sh`` (shared with the ``ray up`` nodes) runs for real: its dry run shows
which index and pins it would use, and its check runs against this machine's torch.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.cluster.common import (
    DOCKER,
    ROOT,
    Instruction,
    arg_defaults,
    base_image,
    dockerfile,
    parse_dockerfile,
)

INSTALL = DOCKER / "install.sh"
BASE_USER = "1000"  # rayproject/ray images: USER ray, UID 1000 (GID 100, users)
ROOT_USERS = {"root", "0"}
WRITERS = {"rm", "mv", "chmod", "chown", "chgrp", "truncate", "shred", "unlink", "touch"}


def ownership_problems(instructions: list[Instruction]) -> list[str]:
    """Steps that need rights the image's user lacks: a RUN as UID 1000 that deletes,
    moves or changes a path that COPY/ADD created as root, or a final USER other than
    the base image's."""
    user = BASE_USER
    root_owned: list[tuple[str, int]] = []  # (destination, line of the COPY)
    problems = []
    for ins in instructions:
        if ins.keyword == "USER":
            user = ins.value[0].split(":")[0]
        elif ins.keyword in ("COPY", "ADD"):
            owner = (ins.flags.get("chown") or ["0"])[-1].split(":")[0]
            if owner in ROOT_USERS:
                root_owned.append((ins.value[-1].rstrip("/"), ins.line))
        elif ins.keyword == "RUN" and user not in ROOT_USERS:
            words = shlex.split(ins.args.replace(";", " ; "))
            for i, word in enumerate(words):
                if word not in WRITERS:
                    continue
                for target in words[i + 1 :]:
                    if target in {"&&", "||", ";", "|"}:
                        break
                    for dest, line in root_owned:
                        if target.rstrip("/") == dest or target.startswith(dest + "/"):
                            problems.append(
                                f"line {ins.line}: `{word} {target}` as UID {user}, but line "
                                f"{line} copied {dest} as root"
                            )
    if user != BASE_USER and user != "ray":
        problems.append(f"the image ends as user {user}, not the base image's ray (UID 1000)")
    return problems


def test_dockerfile_needs_no_root_rights() -> None:
    instructions = dockerfile()
    assert ownership_problems(instructions) == []
    assert not [i for i in instructions if i.keyword == "USER"], "keep the base image's user"
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD")]
    for ins in copies:  # none today; any later one must hand its files to the image's user
        assert (ins.flags.get("chown") or ["0"])[-1].split(":")[0] in (BASE_USER, "ray")


def test_the_ownership_check_catches_the_old_failure() -> None:
    """The image of issue 13: COPY as root, then `rm` as ray in a RUN step."""
    old = parse_dockerfile(
        "ARG BASE=rayproject/ray:2.60.0-py311-gpu\nFROM ${BASE}\nCOPY dist/ /tmp/dist/\n"
        "RUN pip install --no-cache-dir /tmp/dist/vitcnn_store-*.whl s3fs \\\n"
        "    && rm -rf /tmp/dist \\\n    && python -c 'import vitcnn_store'\n"
    )
    (problem,) = ownership_problems(old)
    assert "`rm /tmp/dist` as UID 1000" in problem and "line 3" in problem
    fixed = parse_dockerfile(
        "FROM x\nCOPY --chown=1000:100 dist/ /tmp/dist/\nRUN rm -rf /tmp/dist\n"
    )
    assert ownership_problems(fixed) == []
    as_root = parse_dockerfile("FROM x\nUSER root\nCOPY a /a\nRUN rm /a\n")
    assert ownership_problems(as_root) == [
        "the image ends as user root, not the base image's ray (UID 1000)"
    ]


def test_dockerfile_parses_with_dockers_parser() -> None:
    instructions = dockerfile()
    assert [i.keyword for i in instructions if i.keyword not in ("ARG",)] == ["FROM", "RUN", "ENV"]
    text = "# syntax=docker/dockerfile:1\nARG A=1\nRUN --mount=type=bind,source=.,target=/t \\\n"
    text += "    # a comment inside\n    echo $A\n"
    ins = parse_dockerfile(text)
    assert [i.keyword for i in ins] == ["ARG", "RUN"]
    assert ins[1].flags == {"mount": ["type=bind,source=.,target=/t"]}
    assert ins[1].args.split() == ["echo", "$A"] and ins[1].line == 3


def test_base_image_and_versions_match_what_the_project_runs() -> None:
    args = arg_defaults(dockerfile())
    assert args["RAY_VERSION"] == version("ray"), "the pods' Ray must be the clients' Ray"
    assert base_image() == f"rayproject/ray:{version('ray')}-{args['PYTHON_TAG']}-cu128"
    assert base_image(PLATFORM="cpu") == f"rayproject/ray:{version('ray')}-py311-cpu"
    assert re.fullmatch(r"cu\d{3}", args["PLATFORM"]), "the default build is a CUDA build"
    # The tested torch pair (DESIGN: torch 2.14.1 with torchvision 0.29.1).
    assert args["TORCH_VERSION"] == version("torch").split("+")[0]
    assert args["TORCHVISION_VERSION"] == version("torchvision").split("+")[0]
    # The image's Python satisfies the package's requires-python.
    m = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml names the lowest Python"
    lowest = (int(m[1]), int(m[2]))
    py = args["PYTHON_TAG"].removeprefix("py")
    assert (int(py[0]), int(py[1:])) >= lowest


def test_the_one_run_step_uses_the_build_context_read_only() -> None:
    (run,) = [i for i in dockerfile() if i.keyword == "RUN"]
    (mount,) = run.flags["mount"]
    options = dict(part.split("=", 1) for part in mount.split(","))
    assert options["type"] == "bind" and "rw" not in options, options
    context = DOCKER / options.get("source", ".")
    target = options["target"]
    words = shlex.split(run.args)
    script = next(w for w in words if w.startswith(target + "/") and w.endswith(".sh"))
    assert (context / script.removeprefix(target + "/")).resolve() == INSTALL.resolve()
    assert words[words.index(script) + 1] == "${PLATFORM}", "install.sh gets the base's PLATFORM"
    assert words[words.index(script) + 2] == f"{target}/dist"
    gitignore = (DOCKER / ".gitignore").read_text().split()
    assert "dist/" in gitignore, "the built wheel stays out of git"


# -- install.sh, for real ------------------------------------------------------------------


def install(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run install.sh with this interpreter as its PYTHON."""
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


@pytest.mark.parametrize("platform", ["cu128", "cu130", "cpu"])
def test_install_takes_torch_from_the_index_of_its_platform(platform: str, tmp_path: Path) -> None:
    (tmp_path / "vitcnn_store-0.1.0-py3-none-any.whl").write_bytes(b"")
    out = install(platform, str(tmp_path), VITCNN_INSTALL_DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    torch_step, package_step = [shlex.split(line) for line in out.stdout.splitlines()]
    assert torch_step[:4] == [sys.executable, "-m", "pip", "install"]
    index = torch_step[torch_step.index("--index-url") + 1]
    assert index == f"https://download.pytorch.org/whl/{platform}"
    args = arg_defaults(dockerfile())
    assert {
        "torch==" + args["TORCH_VERSION"],
        "torchvision==" + args["TORCHVISION_VERSION"],
    } <= set(torch_step), "install.sh pins the pair the Dockerfile names"
    assert "--index-url" not in package_step and package_step[-1].endswith(".whl")


def test_install_refuses_bad_input(tmp_path: Path) -> None:
    empty = install("cu128", str(tmp_path), VITCNN_INSTALL_DRY_RUN="1")
    assert empty.returncode == 2 and "pip wheel --no-deps -w cluster/docker/dist" in empty.stderr
    for name in ("vitcnn_store-0.1.0-py3-none-any.whl", "vitcnn_store-0.0.9-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    two = install("cu128", str(tmp_path), VITCNN_INSTALL_DRY_RUN="1")
    assert two.returncode == 2 and "2 vitcnn_store wheels" in two.stderr
    gpu = install("gpu", str(tmp_path), VITCNN_INSTALL_DRY_RUN="1")
    assert gpu.returncode == 2 and "cpu or cuXYZ" in gpu.stderr


def _cuda_of_this_torch() -> str | None:
    import torch

    return torch.version.cuda


def test_install_check_accepts_the_matching_build_only() -> None:
    """--check runs the test install.sh runs after installing, on this machine's torch."""
    cuda = _cuda_of_this_torch()
    mine = "cpu" if cuda is None else "cu" + cuda.replace(".", "")
    ok = install("--check", mine)
    assert ok.returncode == 0, ok.stderr
    other = "cu126" if mine != "cu126" else "cu128"
    for wrong in {other, "cpu"} - {mine}:
        bad = install("--check", wrong)
        assert bad.returncode == 1 and f"PLATFORM={wrong}" in bad.stderr, bad.stderr
    pinned = install("--check", mine, TORCH_VERSION="2.0.0")
    assert pinned.returncode == 1 and "not the pinned 2.0.0" in pinned.stderr
    if mine != "cpu":  # an NVIDIA image whose CUDA is not torch's
        image = install("--check", mine, CUDA_VERSION="11.8.0")
        assert image.returncode == 1 and "the image has CUDA 11.8.0" in image.stderr
        same = install("--check", mine, CUDA_VERSION=f"{cuda}.1")
        assert same.returncode == 0, same.stderr
