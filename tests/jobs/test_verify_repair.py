"""Damage end to end: readers refuse it, verify finds it, --repair + --resume heal it exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import extract_tiny
from tests.helpers import assert_runs_identical
from tests.store.test_integrity import chunk, flip
from vitcnn_store import open_store
from vitcnn_store.cli import main

OPTIONS = {
    "layers": "preset:blocks",
    "attention": True,
    "inputs": True,
    "limit": 24,
    "chunk_size": 8,
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    url = tmp_path_factory.mktemp("clean") / "acts.zarr"
    extract_tiny(url, "vit", **OPTIONS)
    return url


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_damage_is_refused_found_and_repaired(
    clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = tmp_path / "acts.zarr"
    shutil.copytree(clean, url)
    store = str(url)
    flip(chunk(store, "vit", "blocks.0/activation", 1))
    flip(chunk(store, "vit", "blocks.1.attn/attention", 0))
    chunk(store, "vit", "input", 2).unlink()

    assert main(["query", store, "vit", "blocks.0"]) == 1
    assert "layer 'blocks.0', unit 1" in one_line(capsys)
    assert main(["query", store, "vit", "blocks.1.attn", "--attention", "--images", "0:4"]) == 1
    assert "unit 0" in one_line(capsys)
    # Reads that avoid the damaged units still work.
    assert main(["query", store, "vit", "blocks.0", "--images", "0:8"]) == 0
    capsys.readouterr()
    # Every analysis reads through the same checked arrays.
    figures = str(tmp_path / "figures")
    assert (
        main(
            [
                "analyze",
                "cka",
                store,
                "vit",
                "--figures",
                figures,
                "--no-progress",
                "--batch-size",
                "24",
            ]
        )
        == 1
    )
    assert "damaged chunk" in one_line(capsys)
    assert (
        main(
            [
                "analyze",
                "localization",
                store,
                "vit",
                "--layer",
                "blocks.1",
                "--figures",
                figures,
                "--no-progress",
                "--batch-size",
                "24",
            ]
        )
        == 1
    )
    assert "missing chunk in" in one_line(capsys)  # the input of unit 2 is gone

    assert main(["verify", store, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "blocks.0/activation" in out and "input" in out and "4 problem(s)" in out, out
    # The refused cka left the Gram it was computing incomplete: verify says so.
    assert "_grams/blocks.0/gram" in out and "incomplete cached Gram" in out
    assert main(["verify", store, "--repair", "--no-progress"]) == 1
    capsys.readouterr()
    assert list(open_store(store)["vit"].done) == [False, False, False]
    summary = extract_tiny(url, "vit", resume=True, **OPTIONS)
    assert summary.units_written == 3  # type: ignore[attr-defined]
    assert_runs_identical(store, "vit", str(clean), "vit")
    assert main(["verify", store, "--no-progress"]) == 0


def test_resume_rewrites_finished_units_with_missing_chunks(
    clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = tmp_path / "acts.zarr"
    shutil.copytree(clean, url)
    chunk(str(url), "vit", "blocks.1/activation", 2).unlink()
    summary = extract_tiny(url, "vit", resume=True, **OPTIONS)
    assert summary.units_written == 1  # type: ignore[attr-defined]
    assert "1 finished unit(s) of 'vit' have missing chunks" in capsys.readouterr().err
    assert_runs_identical(str(url), "vit", str(clean), "vit")


def test_a_lost_layer_is_restored_by_resume(
    clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = tmp_path / "acts.zarr"
    shutil.copytree(clean, url)
    store = str(url)
    shutil.rmtree(url / "vit" / "blocks.1")
    shutil.rmtree(url / "vit" / "image_sha256")
    assert main(["verify", store, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "blocks.1" in out and "layer missing" in out and "image_sha256" in out
    assert (
        main(["analyze", "cka", store, "vit", "--figures", str(tmp_path / "f"), "--no-progress"])
        == 1
    )
    assert "blocks.1, image_sha256 missing" in one_line(capsys)  # refused, naming the loss
    summary = extract_tiny(url, "vit", resume=True, **OPTIONS)
    assert summary.units_written == 3  # type: ignore[attr-defined]
    assert "restoring it and rewriting every unit" in capsys.readouterr().err
    assert_runs_identical(store, "vit", str(clean), "vit")
    assert main(["verify", store, "--no-progress"]) == 0
