"""docs/format.md is true: a reader written from it alone (tests/spec_reader.py: JSON,
numpy, crc32c, numcodecs' decompressors) reads what the real jobs write, and reads
the same values as zarr-python and xarray.

The store: a tiny ViT run (attention, 40 images in units of 16, so the last chunk
is padded) and a ResNet run compressed with blosc-lz4 (bit shuffle), extracted in
process; then a CKA analysis of the ViT run, which leaves the Gram cache (tiles of
32 images over 40: a padded edge tile) and a result under ``vit/_analyses``.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from tests.conftest import extract_tiny
from tests.spec_reader import ChecksumError, SpecStore, find_result_group

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from jobs.analyze.cka import CKAConfig, run_cka

    url = str(tmp_path_factory.mktemp("spec") / "acts.zarr")
    extract_tiny(url, "vit", "vit", layers="preset:blocks", attention=True)
    extract_tiny(url, "resnet", "resnet", layers="preset:blocks", compression="lz4")
    run_cka(CKAConfig(store=url, run="vit", batch_size=8, repeats=2, gram_tile=24, progress=False))
    return url


def _zarr(url: str, path: str) -> np.ndarray:
    return np.asarray(zarr.open_array(url, path=path, mode="r", zarr_format=3)[...])


def _same(ours: np.ndarray, theirs: np.ndarray) -> None:
    if ours.dtype == object:
        assert ours.tolist() == np.asarray(theirs).tolist()
    else:
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)  # bit for bit, NaN where NaN


def test_reader_imports_no_zarr_xarray_or_vitcnn(store: str) -> None:
    code = (
        "import sys; from tests.spec_reader import SpecStore; print(SpecStore(sys.argv[1]).runs());"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('zarr', 'xarray', 'vitcnn_store')];"
        "assert not bad, bad"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, store],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['resnet', 'vit']"


def test_runs_and_their_attributes(store: str, tmp_path: Path) -> None:
    spec = SpecStore(store)
    root = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
    runs = sorted(k for k, _ in root.groups() if not k.startswith(("_", ".")))
    assert spec.runs() == spec.created_runs() == runs
    for run in spec.runs():
        assert spec.attrs(run) == dict(root[run].attrs)
        assert spec.attrs(run)["format"] == 2
    # Without consolidated metadata the reader lists the root's folders instead.
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    assert meta.pop("consolidated_metadata")
    (copy / "zarr.json").write_text(json.dumps(meta))
    assert SpecStore(copy).runs() == spec.runs()


def test_every_run_array_and_layer_activation(store: str) -> None:
    spec = SpecStore(store)
    for run in spec.runs():
        attrs = spec.attrs(run)
        for name in ("image", "image_id", "label", "image_sha256", "done", "failed", "failure"):
            _same(spec.read(f"{run}/{name}"), _zarr(store, f"{run}/{name}"))
        for layer in attrs["layers"]:
            x = spec.read(f"{run}/{layer}/activation")
            _same(x, _zarr(store, f"{run}/{layer}/activation"))
            assert x.dtype == np.dtype(attrs["dtype"]) and np.isfinite(x).all()
            ds = xr.open_zarr(store, group=f"{run}/{layer}", consolidated=False)
            names = spec.attrs(f"{run}/{layer}/activation")["coordinates"].split()
            for coord in names + [d for d in ds["activation"].dims if d in ds.coords]:
                _same(spec.read(f"{run}/{layer}/{coord}"), ds[coord].values)
    # The ResNet run's activations are blosc-lz4 with bit shuffle; the ViT's uncompressed.
    codecs = spec.metadata("resnet/layer1.0/activation")["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "blosc", "crc32c"]
    assert codecs[1]["configuration"]["shuffle"] == "bitshuffle"
    vit_codecs = spec.metadata("vit/blocks.0/activation")["codecs"]
    assert [c["name"] for c in vit_codecs] == ["bytes", "crc32c"]


def test_padded_last_chunk_and_vlen_utf8_layout(store: str) -> None:
    spec = SpecStore(store)
    # 40 images in units of 16: the third chunk is stored full-size (16 images).
    meta = spec.metadata("vit/blocks.0/activation")
    per_image = int(np.prod(meta["shape"][1:])) * 2  # float16
    assert (Path(store) / "vit/blocks.0/activation/c/2/0/0").stat().st_size == 16 * per_image + 4
    # image_id: one chunk of whole units (48 >= 40 images), 48 items, "" past the end.
    raw = (Path(store) / "vit/image_id/c/0").read_bytes()
    from numcodecs import zstd

    body = bytes(zstd.decompress(raw[:-4]))
    assert int.from_bytes(body[:4], "little") == 48
    first = int.from_bytes(body[4:8], "little")
    assert body[8 : 8 + first].decode() == spec.read("vit/image_id")[0]


def test_an_image_selected_by_its_id(store: str) -> None:
    spec = SpecStore(store)
    ds = xr.open_zarr(store, group="vit/blocks.1", consolidated=False)
    wanted = str(ds.image_id.values[37])  # in the padded last unit
    i = spec.image_index("vit", wanted)
    assert i == 37
    ours = spec.rows("vit/blocks.1/activation", i, i + 1)[0]
    theirs = ds["activation"].sel(image=ds.image_id == wanted)
    _same(ours, theirs.values[0])
    assert int(spec.rows("vit/label", i, i + 1)[0]) == int(theirs.label.values[0])


def test_attention(store: str) -> None:
    spec = SpecStore(store)
    layers = spec.attrs("vit")["attention_layers"]
    assert layers
    for layer in layers:
        a = spec.read(f"vit/{layer}/attention")
        _same(a, _zarr(store, f"vit/{layer}/attention"))
        np.testing.assert_allclose(a.astype(np.float64).sum(axis=-1), 1.0, rtol=0, atol=5e-3)
        da = xr.open_zarr(store, group=f"vit/{layer}", consolidated=False)["attention"]
        assert da.dims == tuple(spec.metadata(f"vit/{layer}/attention")["dimension_names"])
        for coord in ("query_kind", "key_x"):
            _same(spec.read(f"vit/{layer}/{coord}"), da[coord].values)


def test_gram_gives_x_xt(store: str) -> None:
    spec = SpecStore(store)
    usable = spec.usable("vit")
    grams = Path(store) / "vit/_grams"
    layers = [la for la in spec.attrs("vit")["layers"] if (grams / la / "gram/zarr.json").is_file()]
    assert len(layers) == 3
    for layer in layers:
        x = spec.read(f"vit/{layer}/activation").astype(np.float64).reshape(40, -1)
        want = x @ x.T
        k, row_mean = spec.gram("vit", layer)
        scale = np.abs(want).max()
        np.testing.assert_allclose(
            k[np.ix_(usable, usable)], want[np.ix_(usable, usable)], rtol=1e-10, atol=1e-10 * scale
        )
        np.testing.assert_allclose(
            row_mean[usable],
            want[np.ix_(usable, usable)].mean(axis=1),
            rtol=1e-10,
            atol=1e-10 * scale,
        )
        # The stored numbers are the shifted Gram xarray sees too; tiles of min(tile, n).
        g = xr.open_zarr(store, group=f"vit/_grams/{layer}", consolidated=False)["gram"].values
        _same(spec.read(f"vit/_grams/{layer}/gram"), g)
        attrs = spec.attrs(f"vit/_grams/{layer}/gram")
        chunk = spec.metadata(f"vit/_grams/{layer}/gram")["chunk_grid"]["configuration"]
        assert attrs["tile"] == 32 and chunk["chunk_shape"] == [32, 32]
        assert np.isnan(g[32:, :32]).all()  # the lower tile is not stored
        # The copy of the vectors in the Gram's own metadata is the arrays', bit for bit.
        copy = spec.gram_vectors("vit", layer)
        assert copy is not None
        _same(copy[0], spec.read(f"vit/_grams/{layer}/row_mean"))
        _same(copy[1], spec.read(f"vit/_grams/{layer}/offset"))
        # source.digest recomputed from the run as it is now.
        assert spec.gram_digest("vit", layer, usable) == attrs["source"]["digest"]


def test_analysis_result(store: str) -> None:
    spec = SpecStore(store)
    group = find_result_group(spec, "vit", "cka", "cka")
    cka = spec.read(f"{group}/cka")
    ds = xr.open_zarr(store, group=group, consolidated=False)
    _same(cka, ds["cka"].values)
    _same(spec.read(f"{group}/layer_a"), ds["layer_a"].values)
    assert np.isfinite(cka).all() and np.allclose(np.diag(cka), 1.0, rtol=0, atol=1e-6)
    # xarray's CF attribute: base64 of the little-endian float64 fill value.
    fill = spec.attrs(f"{group}/cka")["_FillValue"]
    assert np.isnan(struct.unpack("<d", base64.b64decode(fill))[0])


def test_damaged_chunk_is_refused(store: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    chunk = copy / "resnet/layer1.0/activation/c/1/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="c/1/0/0/0"):
        SpecStore(copy).read("resnet/layer1.0/activation")
    with pytest.raises(ValueError, match="checksum"):
        _zarr(str(copy), "resnet/layer1.0/activation")


def test_every_array_ends_with_crc32c_and_reads_as_zarr_reads_it(store: str) -> None:
    spec = SpecStore(store)
    arrays = sorted(
        p.parent.relative_to(store).as_posix()
        for p in Path(store).rglob("zarr.json")
        if json.loads(p.read_text())["node_type"] == "array"
    )
    assert any("/_grams/" in a for a in arrays) and any("/_analyses/" in a for a in arrays)
    for path in arrays:
        assert spec.metadata(path)["codecs"][-1]["name"] == "crc32c", path
        _same(spec.read(path), _zarr(store, path))
