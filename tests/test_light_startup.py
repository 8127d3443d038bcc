"""Short commands load only what they use, and refusals that need only the store come first.

Each case runs the real CLI in a fresh interpreter and reads back which heavy
libraries it imported: ``vitcnn --help`` and ``vitcnn ls`` import no torch,
Ray, timm or plotting; refusing an existing, broken, leased or unwritable run
(or a bad name, or ``--resume`` of a format-1 run) happens before torch is
imported — so no model is built and no image hashed — and leaves every byte of
the store as it was. The model name given is not a timm model: had the job
built it, the refusal would name the model instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import extract_tiny

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from vitcnn_store.cli import main
out, argv = sys.argv[1], sys.argv[2:]
try:
    code = main(argv)
except SystemExit as e:
    code = e.code
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""

#: Libraries no short command needs.
PLOTTING_AND_COMPUTE = ["torch", "timm", "ray", "matplotlib", "distributed", "torchvision"]
#: Nor ``--help``: it reads no store and no array either.
STORAGE = ["zarr", "xarray", "pandas", "dask", "numcodecs", "numpy"]


def run_cli(tmp_path: Path, *argv: str) -> tuple[int, set[str], str]:
    """Exit code, modules imported and stderr of ``vitcnn ARGV`` in a fresh interpreter."""
    out = tmp_path / "probe.json"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.exists(), proc.stderr
    result = json.loads(out.read_text())
    return result["code"], set(result["modules"]), proc.stderr


def snapshot(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding a finished run ``v`` and a broken run ``half`` (creation interrupted)."""
    import zarr

    url = tmp_path_factory.mktemp("light") / "acts.zarr"
    extract_tiny(url, "v", limit=8, chunk_size=8, workers=0)
    zarr.open_group(str(url), mode="r+").create_group("half")
    return url


def test_help_imports_no_heavy_library(tmp_path: Path) -> None:
    code, modules, _ = run_cli(tmp_path, "--help")
    assert code == 0
    loaded = modules & {*PLOTTING_AND_COMPUTE, *STORAGE}
    assert not loaded, loaded


def test_ls_imports_no_compute_or_plotting_library(tmp_path: Path, store: Path) -> None:
    code, modules, err = run_cli(tmp_path, "ls", str(store))
    assert code == 0, err
    heavy = {*PLOTTING_AND_COMPUTE, "xarray", "pandas", "dask"}
    assert not modules & heavy, modules & heavy


def extract_args(store: Path | str, run: str, *extra: str) -> list[str]:
    return [
        "extract",
        "not_a_timm_model",
        "--images",
        "builtin:faces",
        "--limit",
        "8",
        "--store",
        str(store),
        "--run",
        run,
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]


def refused_early(tmp_path: Path, store: Path, argv: list[str], code: int, message: str) -> None:
    before = snapshot(store)
    got, modules, err = run_cli(tmp_path, *argv)
    assert got == code, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    loaded = modules & {*PLOTTING_AND_COMPUTE, "PIL"}
    assert not loaded, f"refused after loading {loaded}"
    assert snapshot(store) == before, "a refused job changed the store"


@pytest.mark.parametrize(
    ("run", "extra", "code", "message"),
    [
        ("v", [], 2, "run 'v' exists"),
        ("half", [], 2, "run 'half' exists but is broken"),
        ("../v", ["--overwrite"], 2, "invalid run name"),
    ],
)
def test_refusals_come_before_any_model(
    tmp_path: Path, store: Path, run: str, extra: list[str], code: int, message: str
) -> None:
    refused_early(tmp_path, store, extract_args(store, run, *extra), code, message)


def test_a_leased_run_is_refused_before_any_model(tmp_path: Path, store: Path) -> None:
    from vitcnn_store.store.lease import acquire_lease, release_lease

    acquire_lease(str(store), "v", "another-job", ttl=600)
    try:
        argv = extract_args(store, "v", "--overwrite")
        refused_early(tmp_path, store, argv, 2, "is being written by another-job")
    finally:
        release_lease(str(store), "v", "another-job")


def test_an_unwritable_store_is_refused_before_any_model(tmp_path: Path, store: Path) -> None:
    (tmp_path / "here").mkdir()
    blocker = tmp_path / "here" / "a-file"
    blocker.write_text("not a folder")
    argv = extract_args(blocker / "acts.zarr", "v")
    refused_early(tmp_path, tmp_path / "here", argv, 2, "is a file, not a folder")


def test_resuming_a_format_1_run_is_refused_before_any_model(tmp_path: Path) -> None:
    from tests.store.test_format_v1 import make_v1_store

    url = tmp_path / "v1.zarr"
    make_v1_store(str(url))
    argv = extract_args(url, "old", "--resume")
    refused_early(tmp_path, url, argv, 2, "format 1")
