"""The format as other readers see it: plain xarray (no vitcnn import) and tensorstore.

A store is promised to open with ``xarray.open_datatree(url, engine="zarr")``
and ``xarray.open_zarr(url, group="run/layer")`` with every activation
labelled by image, image_id, label and image_sha256, and attention labelled
along query and key; and its numeric arrays are plain zarr v3 any
implementation reads bit for bit (checksums included).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from vitcnn_store import open_store
from vitcnn_store.store.chunks import walk_arrays

PLAIN = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np, xarray as xr
    warnings.simplefilter("ignore")
    url = sys.argv[1]
    tree = xr.open_datatree(url, engine="zarr")
    report = {"layers": 0}
    for run in ("vit", "resnet"):
        for name, node in tree[run].children.items():
            for var in ("activation", "attention"):
                if var not in node.ds:
                    continue
                da = node[var]
                assert {"image_id", "label", "image_sha256"} <= set(da.coords), (run, name, var)
                for coord in da.coords.values():  # every coordinate lies on the array's dims
                    assert set(coord.dims) <= set(da.dims), (run, name, var, coord.name)
                report["layers"] += 1
    x = tree["vit"]["blocks.1"]["activation"]
    picked = x.sel(image=x.image_id.isin(["faces/0100", "faces/0001"]))
    report["picked"] = picked.image_id.values.tolist()
    report["picked_labels"] = picked.label.values.tolist()
    report["token_kind"] = x.token_kind.values.tolist()
    a = tree["vit"]["blocks.0.attn"]["attention"]
    report["attention_dims"] = list(a.dims)
    report["query_kind"] = a.query_kind.values.tolist()
    report["key_x"] = [None if v != v else float(v) for v in a.key_x.values]
    ds = xr.open_zarr(url, group="resnet/layer1.0")
    report["zarr_group_coords"] = sorted(ds["activation"].coords)
    report["sha"] = ds["activation"].image_sha256.values[:2].tolist()
    report["imported_vitcnn"] = any(m.startswith("vitcnn_store") for m in sys.modules)
    print(json.dumps(report))
    """
)


def test_plain_xarray_sees_every_coordinate(tiny_store: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PLAIN, tiny_store], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert not report["imported_vitcnn"]
    vit = open_store(tiny_store)["vit"]
    n_arrays = (
        len(vit.layers) + len(vit.attention_layers) + len(open_store(tiny_store)["resnet"].layers)
    )
    assert report["layers"] == n_arrays
    assert report["picked"] == ["faces/0100", "faces/0001"] and report["picked_labels"] == [0, 1]
    assert report["token_kind"] == ["cls", "patch", "patch", "patch", "patch"]
    assert report["attention_dims"] == ["image", "head", "query", "key"]
    assert report["query_kind"] == report["token_kind"]
    assert report["key_x"] == [None, 8.0, 24.0, 8.0, 24.0]
    assert {"image", "image_id", "label", "image_sha256", "x", "y"} <= set(
        report["zarr_group_coords"]
    )
    assert report["sha"] == list(open_store(tiny_store)["resnet"].image_sha256[:2])


def test_tensorstore_reads_numeric_arrays_bit_identically(tiny_store: str) -> None:
    ts = pytest.importorskip("tensorstore")
    group = zarr.open_group(tiny_store, mode="r")
    checked = 0
    for run in ("vit", "resnet"):
        for path, arr in walk_arrays(group[run]):
            if arr.dtype.kind not in "biuf":
                continue  # variable-length strings are not in tensorstore's zarr3 driver
            spec = {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": f"{tiny_store}/{run}/{path}"},
            }
            theirs = ts.open(spec, read=True).result().read().result()
            ours = np.asarray(arr[...])
            assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, path
            assert theirs.tobytes() == ours.tobytes(), f"{run}/{path}"
            checked += 1
    assert checked > 40
