"""Bad input: each case is one line naming the problem, exit code 2, and an unchanged store."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from safetensors.torch import save_file

from vitcnn_store.cli import main
from vitcnn_store.models import ModelSpec, build_model
from vitcnn_store.store.layout import FORMAT_ATTR

TINY = ["vit_tiny_patch16_224", "--img-size", "32", "--model-arg", "depth=1"]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` with a hash of its bytes."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def run_bad(args: list[str], capsys: pytest.CaptureFixture[str], store: Path | None) -> str:
    before = snapshot(store) if store else {}
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    if store is not None:
        assert snapshot(store) == before
    return err


def extract_args(tmp: Path, *extra: str, images: str = "builtin:faces") -> list[str]:
    return [
        "extract",
        *TINY,
        "--images",
        images,
        "--store",
        str(tmp / "s.zarr"),
        "--run",
        "r",
        "--limit",
        "8",
        "--no-progress",
        *extra,
    ]


def bad_files(folder: Path) -> None:
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "good.png")
    (folder / "zero.png").write_bytes(b"")
    good = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_bytes(b"hello, I am not a JPEG")
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 Mpx, a few kB


def test_strict_refuses_each_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_files(tmp_path / "imgs")
    err = run_bad(
        extract_args(tmp_path, "--strict", images=str(tmp_path / "imgs")),
        capsys,
        tmp_path / "s.zarr",
    )
    assert "4 image(s) cannot be decoded" in err and "nothing was written" in err
    assert not (tmp_path / "s.zarr").exists()


def test_empty_and_missing_image_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert "empty" in run_bad(extract_args(tmp_path, images=str(tmp_path / "empty")), capsys, None)
    err = run_bad(extract_args(tmp_path, images=str(tmp_path / "missing")), capsys, None)
    assert "missing" in err
    assert not (tmp_path / "s.zarr").exists()


def test_unwritable_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("a file, not a folder")
    args = extract_args(tmp_path)
    args[args.index("--store") + 1] = str(tmp_path / "afile" / "s.zarr")
    assert "store" in run_bad(args, capsys, None)


def test_not_a_store_and_newer_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "notes.txt").write_text("my notes")
    assert "not a vitcnn store" in run_bad(extract_args(tmp_path), capsys, tmp_path / "s.zarr")
    (tmp_path / "s.zarr" / "notes.txt").unlink()
    zarr.open_group(str(tmp_path / "s.zarr"), mode="w").attrs[FORMAT_ATTR] = 3
    assert "upgrade" in run_bad(extract_args(tmp_path), capsys, tmp_path / "s.zarr")
    assert "upgrade" in run_bad(["ls", str(tmp_path / "s.zarr")], capsys, tmp_path / "s.zarr")


def scaled_checkpoint(path: Path, scale: float, nan: bool = False) -> str:
    model = build_model(ModelSpec("vit_tiny_patch16_224", img_size=32, model_args={"depth": 1}))
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["patch_embed.proj.weight"] *= scale
    if nan:
        state["blocks.0.mlp.fc1.bias"][0] = float("nan")
    save_file(state, str(path))
    return str(path)


def test_float16_overflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = scaled_checkpoint(tmp_path / "big.safetensors", 1e6)
    err = run_bad(
        extract_args(tmp_path, "--checkpoint", ckpt, "--layers", "patch_embed"),
        capsys,
        tmp_path / "s.zarr",
    )
    assert "float16" in err and "--dtype float32" in err
    assert not (tmp_path / "s.zarr").exists()


def test_nan_activations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = scaled_checkpoint(tmp_path / "nan.safetensors", 1.0, nan=True)
    err = run_bad(
        extract_args(tmp_path, "--checkpoint", ckpt, "--layers", "blocks.0"),
        capsys,
        tmp_path / "s.zarr",
    )
    assert "NaN" in err and "blocks.0" in err


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        (o, v, "must be positive")
        for o in ("--batch-size", "--chunk-size", "--cpus-per-worker")
        for v in ("0", "-3")
    ]
    + [
        ("--workers", "-3", "must be >= 0, got -3 (0 runs in this process"),
        ("--gpus-per-worker", "-1", "must be >= 0"),
        ("--lease-ttl", "nan", "must be positive"),
    ],
)
def test_out_of_range_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, words: str
) -> None:
    err = run_bad(extract_args(tmp_path, option, value), capsys, None)
    assert f"{option} {words}" in err, err
    assert not (tmp_path / "s.zarr").exists()


def test_malicious_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.models.test_factory import _Payload

    marker = tmp_path / "pwned"
    torch.save({"w": _Payload(str(marker))}, tmp_path / "evil.pth")
    err = run_bad(extract_args(tmp_path, "--checkpoint", str(tmp_path / "evil.pth")), capsys, None)
    assert "refused" in err and not marker.exists()


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """The store ``s.zarr`` holding run ``r`` (8 images), made by the CLI."""
    assert main(extract_args(tmp_path)) == 0
    return tmp_path / "s.zarr"


def test_file_name_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], filled: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "good.png")
    bad = os.path.join(os.fsencode(folder), b"bad\xff.png")  # not UTF-8 (a real file)
    with open(bad, "wb") as f:
        f.write((folder / "good.png").read_bytes())
    args = extract_args(tmp_path, images=str(folder))
    args[args.index("--run") + 1] = "other"
    err = run_bad(args, capsys, filled)
    assert "bad\\\\xff.png" in err and "not valid UTF-8" in err


def test_chunk_size_is_capped_at_the_number_of_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--chunk-size 1000000 on 8 images: chunks of 8 images (not a million-image chunk to
    allocate and store), and a resume with the same flag continues the run."""
    assert main(extract_args(tmp_path, "--chunk-size", "1000000")) == 0
    run = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["r"]
    assert run.attrs["chunk_size"] == 8 and run["blocks.0/activation"].chunks[0] == 8
    stored = sum(p.stat().st_size for p in (tmp_path / "s.zarr").rglob("*") if p.is_file())
    assert stored < 1_000_000  # 8 images × 17 tokens × 192 channels × 2 bytes per layer
    assert main(extract_args(tmp_path, "--chunk-size", "1000000", "--resume")) == 0
    assert "0 of 1 units written" in capsys.readouterr().out
