"""``/zarr/``: plain zarr readers (xarray, tensorstore, our own reader) read the served
store exactly as the local one; HEAD, Range, ETag and 404 behave as HTTP readers expect."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.serve.conftest import ThreadServer

PLAIN_XARRAY = textwrap.dedent("""
    import sys, warnings
    import numpy as np, xarray as xr
    warnings.simplefilter("ignore")
    url, local = sys.argv[1], sys.argv[2]
    remote = xr.open_datatree(url, engine="zarr")
    here = xr.open_datatree(local, engine="zarr")
    runs = [k for k in sorted(remote.children) if not k.startswith("_")]  # _leases, _runs: no runs
    assert sorted(remote.children) == sorted(here.children) and runs == ["resnet", "vit"]
    n = 0
    for path in ("vit/blocks.0", "vit/blocks.1.attn", "resnet/layer2", "vit"):
        a, b = remote[path].to_dataset(), here[path].to_dataset()
        assert sorted(a.variables) == sorted(b.variables), path
        for name in b.variables:
            x, y = a[name].values, b[name].values
            assert x.dtype == y.dtype and x.shape == y.shape, (path, name)
            nan = x.dtype.kind == "f"
            assert np.array_equal(x, y, equal_nan=nan), (path, name)
            n += 1
    assert "vitcnn_store" not in sys.modules
    print("compared", n)
""")


def test_plain_xarray_in_a_process_without_vitcnn_reads_the_same_values(
    open_server: ThreadServer, serve_store: str, tmp_path: Path
) -> None:
    script = tmp_path / "read.py"
    script.write_text(PLAIN_XARRAY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vitcnn_store not importable
    out = subprocess.run(
        [sys.executable, str(script), f"{open_server.url}/zarr", serve_store],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 20


def test_open_store_over_http_gives_the_same_runs(
    open_server: ThreadServer, serve_store: str
) -> None:
    from vitcnn_store import open_store

    remote, local = open_store(f"{open_server.url}/zarr"), open_store(serve_store)
    assert remote.runs == local.runs == ["resnet", "vit"]
    for name in remote.runs:
        r, h = remote[name], local[name]
        assert r.layers == h.layers and r.attention_layers == h.attention_layers
        assert r.attrs == h.attrs and r.image_ids.tolist() == h.image_ids.tolist()
        assert r.complete and r.analyses == h.analyses
        for layer in r.layers:
            np.testing.assert_array_equal(r[layer].values, h[layer].values)
    np.testing.assert_array_equal(
        remote["vit"].attention("blocks.1.attn").values,
        local["vit"].attention("blocks.1.attn").values,
    )


def test_tensorstore_reads_a_served_array(open_server: ThreadServer, serve_store: str) -> None:
    ts = pytest.importorskip("tensorstore")
    from vitcnn_store import open_store

    array = ts.open(
        {"driver": "zarr3", "kvstore": f"{open_server.url}/zarr/vit/blocks.0/activation/"}
    ).result()
    np.testing.assert_array_equal(
        array.read().result(), open_store(serve_store)["vit"]["blocks.0"].values
    )


def test_head_range_etag_and_absent_keys(open_server: ThreadServer, serve_store: str) -> None:
    key = "vit/blocks.0/activation/c/1/0/0"
    stored = (Path(serve_store) / key).read_bytes()
    status, headers, body = open_server.request(f"/zarr/{key}", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(stored)
    etag = headers["etag"]
    assert headers["accept-ranges"] == "bytes" and "max-age" in headers["cache-control"]

    status, headers, body = open_server.request(f"/zarr/{key}")
    assert (status, body, headers["etag"]) == (200, stored, etag)
    status, headers, body = open_server.request(f"/zarr/{key}", headers={"Range": "bytes=3-9"})
    assert (status, body) == (206, stored[3:10])
    assert headers["content-range"] == f"bytes 3-9/{len(stored)}"
    status, _, body = open_server.request(f"/zarr/{key}", headers={"Range": "bytes=-4"})
    assert (status, body) == (206, stored[-4:])
    status, headers, _ = open_server.request(
        f"/zarr/{key}", headers={"Range": f"bytes={len(stored)}-"}
    )
    assert status == 416 and headers["content-range"] == f"bytes */{len(stored)}"
    status, _, body = open_server.request(f"/zarr/{key}", headers={"If-None-Match": etag})
    assert (status, body) == (304, b"")

    status, headers, _ = open_server.request("/zarr/zarr.json")
    assert status == 200 and headers["cache-control"] == "no-cache"
    assert headers["content-type"] == "application/json"
    # Absent chunks, absent metadata, zarr v2 probes and folders: 404, as zarr expects.
    for absent in (
        "vit/blocks.0/activation/c/9/0/0",
        "nope/zarr.json",
        ".zgroup",
        "vit/.zattrs",
        "vit/blocks.0",
    ):
        status, _, body = open_server.request(f"/zarr/{absent}")
        assert status == 404 and b'"error"' in body, absent


def test_plain_xarray_sends_the_token_through_storage_options(serve_store: str) -> None:
    import xarray as xr

    from tests.serve.conftest import TOKEN
    from vitcnn_store.serve.config import ServeConfig

    server = ThreadServer(ServeConfig(store=serve_store, token=TOKEN))
    try:
        options = {"client_kwargs": {"headers": {"Authorization": f"Bearer {TOKEN}"}}}
        tree = xr.open_datatree(f"{server.url}/zarr", engine="zarr", storage_options=options)
        here = xr.open_datatree(serve_store, engine="zarr")
        np.testing.assert_array_equal(
            tree["resnet/layer1"]["activation"].values, here["resnet/layer1"]["activation"].values
        )
    finally:
        server.stop()


def test_zarr_is_read_only_and_checked_on_the_fast_path(
    token_server: ThreadServer, serve_store: str
) -> None:
    """/zarr/ skips FastAPI's routing, not the token, the key rules or read-only-ness."""
    from tests.serve.conftest import snapshot

    before = snapshot(serve_store)
    for method in ("POST", "PUT", "DELETE"):
        status, _, body = token_server.request("/zarr/zarr.json", method=method, body=b"{}")
        assert status == 405 and "read-only" in body.decode()
    assert snapshot(serve_store) == before
    assert token_server.request("/zarr/zarr.json", token="wrong-token-0123456789")[0] == 401
    status, _, body = token_server.request("/zarr/vit/../../etc/passwd")
    assert status in (400, 404) and b"error" in body
    status, headers, _ = token_server.request("/zarr/zarr.json", headers={"Range": "bytes=999999-"})
    assert status == 416 and headers["content-range"].startswith("bytes */")
