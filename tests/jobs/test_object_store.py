"""Store URLs on S3 end to end (extraction, resume, reading) against a moto server on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from tests.conftest import extract_tiny
from vitcnn_store import open_store
from vitcnn_store.errors import StoreError


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    """An S3-compatible server on 127.0.0.1 (moto, as s3fs's own tests use) with one bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("vitcnn-test")
        yield "s3://vitcnn-test"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def test_extract_resume_and_read_on_s3(s3_bucket: str, tiny_store: str) -> None:
    url = f"{s3_bucket}/acts.zarr"
    extract_tiny(url, "vit", "vit", layers="preset:paper", attention=True, inputs=True, limit=24,
                 chunk_size=8)  # fmt: skip
    run = open_store(url)["vit"]
    assert run.complete and run.n_images == 24
    local = open_store(tiny_store)["vit"]
    np.testing.assert_array_equal(run["blocks.1"].values, local["blocks.1"].values[:24])
    np.testing.assert_array_equal(
        run.attention("blocks.0.attn").values, local.attention("blocks.0.attn").values[:24]
    )
    # Resume on S3 finds nothing left to do, and the store reads with plain xarray.
    assert extract_tiny(url, "vit", "vit", layers="preset:paper", attention=True, inputs=True,
                        limit=24, chunk_size=8, resume=True).units_written == 0  # type: ignore[attr-defined]  # fmt: skip
    import xarray as xr

    tree = xr.open_datatree(url, engine="zarr")
    assert tree["vit"]["blocks.1"]["activation"].shape == (24, 5, 192)


def test_analyses_on_s3(s3_bucket: str, tmp_path: object) -> None:
    from jobs.analyze import AttentionConfig, CKAConfig, run_attention, run_cka
    from vitcnn_store.cli_analyze import analyze

    url = f"{s3_bucket}/analyses.zarr"
    extract_tiny(url, "vit", "vit", layers="preset:blocks", attention=True, limit=24, chunk_size=8)
    figures = str(tmp_path)
    cka, figure = analyze(
        "cka", CKAConfig(store=url, run="vit", batch_size=12, progress=False), figures=figures
    )
    attention = run_attention(AttentionConfig(store=url, run="vit", progress=False))
    assert figure is not None and figure.exists()
    import xarray as xr

    stored = xr.open_zarr(url, group=cka.group)
    np.testing.assert_allclose(stored["cka"].values, cka.dataset["cka"].values, atol=1e-12)
    assert attention.dataset["mean_distance"].dims == ("layer", "head")
    again = run_cka(CKAConfig(store=url, run="vit", batch_size=12, progress=False))
    assert again.reused
    # The analysis lock is an object created only if absent (S3's conditional write).
    from vitcnn_store.errors import RunLockedError
    from vitcnn_store.store.locks import analysis_lock, lock_holder

    with analysis_lock(url, ["vit"], "vitcnn analyze cka vit"):
        assert "vitcnn analyze cka vit" in str(lock_holder(url, "vit"))
        with pytest.raises(RunLockedError, match=r"analysed by vitcnn analyze cka vit .*delete"):
            run_cka(CKAConfig(store=url, run="vit", batch_size=12, seed=9, progress=False))
    assert lock_holder(url, "vit") is None


def test_unreachable_object_store() -> None:
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens there
    try:
        with pytest.raises(StoreError):
            open_store("s3://nowhere/acts.zarr")
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
