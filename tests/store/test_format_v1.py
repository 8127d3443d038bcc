"""Stores written in format 1 (before checksums and creation markers) stay readable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from vitcnn_store import open_store
from vitcnn_store.cli import main
from vitcnn_store.errors import RunMismatchError
from vitcnn_store.store import prepare_run, verify_store

TOKENS = {
    "token_kind": np.array(["cls", "patch"]),
    "token_y": np.array([np.nan, 8.0]),
    "token_x": np.array([np.nan, 8.0]),
}


def make_v1_store(url: str, n: int = 4, chunk: int = 2) -> np.ndarray:
    """A store laid out exactly as format 1 wrote it (no crc32c, no marker, fill value 0)."""
    with zarr.config.set({"array.write_empty_chunks": True}):  # as format 1's unit writes
        return _make_v1_store(url, n, chunk)


def _make_v1_store(url: str, n: int, chunk: int) -> np.ndarray:
    root = zarr.open_group(url, mode="w", zarr_format=3)
    root.attrs["vitcnn_store.format"] = 1
    run = root.create_group("old")
    run.attrs.update(
        {"model": "m", "chunk_size": chunk, "dtype": "float32", "format": 1, "n_images": n}
    )

    def plain(group, name, values, dims, chunks, **kw):  # type: ignore[no-untyped-def]
        arr = group.create_array(
            name,
            shape=values.shape,
            chunks=chunks,
            dtype=str if values.dtype.kind in "OU" else values.dtype,
            dimension_names=list(dims),
            **kw,
        )
        arr[...] = values

    plain(run, "image", np.arange(n), ("image",), (chunk,))
    plain(
        run, "image_id", np.array([f"i{k}" for k in range(n)], dtype=object), ("image",), (chunk,)
    )
    plain(run, "label", np.arange(n) % 2, ("image",), (chunk,))
    plain(run, "done", np.ones(n // chunk, bool), ("unit",), (1,))
    attrs = {"coordinates": "image_id label"}
    plain(run, "failed", np.zeros(n, bool), ("image",), (chunk,), attributes=attrs)
    plain(run, "failure", np.array([""] * n, dtype=object), ("image",), (chunk,), attributes=attrs)
    layer = run.create_group("blocks.0")
    layer.attrs.update({"kind": "token", "depth_index": 0, "depth_fraction": 0.0})
    for name, values in TOKENS.items():
        plain(
            layer,
            name,
            values.astype(object if name == "token_kind" else np.float32),
            ("token",),
            (2,),
        )
    values = np.random.default_rng(0).standard_normal((n, 2, 3)).astype(np.float32)
    wrong = {"coordinates": "token_kind token_y token_x"}  # format 1 put this on attention too
    for name, dims, shape in (
        ("activation", ("token", "channel"), (2, 3)),
        ("attention", ("head", "query", "key"), (1, 2, 2)),
    ):
        arr = layer.create_array(
            name,
            shape=(n, *shape),
            chunks=(chunk, *shape),
            dtype="float32",
            fill_value=np.nan,
            compressors=BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"),
            dimension_names=["image", *dims],
            attributes=wrong,
        )
        arr[...] = values if name == "activation" else np.full((n, *shape), 0.5, np.float32)
    zarr.consolidate_metadata(url)
    return values


def test_v1_store_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "v1.zarr")
    values = make_v1_store(url)
    run = open_store(url)["old"]
    assert run.format == 1 and run.complete
    np.testing.assert_array_equal(run["blocks.0"].values, values)
    assert list(run.image_sha256) == [""] * 4
    attention = run.attention("blocks.0")
    assert list(attention.query_kind.values) == ["cls", "patch"]
    assert "token_kind" not in attention.coords
    assert main(["ls", url]) == 0 and "old" in capsys.readouterr().out
    report = verify_store(url)
    assert report.ok and any("format 1" in note for note in report.notes)


def test_v1_damage_that_can_be_found_is_found(tmp_path: Path) -> None:
    url = str(tmp_path / "v1.zarr")
    make_v1_store(url)
    Path(url, "old", "blocks.0", "activation", "c", "1", "0", "0").unlink()
    report = verify_store(url)
    assert [(p.layer, p.unit, p.problem) for p in report.problems] == [
        ("blocks.0/activation", 1, "missing chunk")
    ]


def test_v1_run_is_not_resumed_and_a_new_run_upgrades_the_store(tmp_path: Path) -> None:
    from tests.store.test_store import make_run

    url = str(tmp_path / "v1.zarr")
    make_v1_store(url)
    with pytest.raises(RunMismatchError, match=r"format 1.*--overwrite"):
        prepare_run(url, "old", {}, resume=True, overwrite=False)
    make_run(url, "new")
    assert zarr.open_group(url, mode="r").attrs["vitcnn_store.format"] == 2
    store = open_store(url)
    assert store.runs == ["new", "old"] and store["old"].format == 1
