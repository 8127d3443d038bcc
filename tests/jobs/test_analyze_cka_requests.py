"""CKA on a copy of a store in a bucket: the Gram cache reused, in few requests.

On object storage every object read is a request, and the benchmark
(benchmarks/remote_store.py, its ``analyze cka`` row) is bounded by how many a
reused-Gram CKA makes. These counts keep the cuts from silently coming back.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from jobs.analyze.cka import CKAConfig, run_cka
from tests.helpers import moto_requests, moto_s3
from tests.jobs.test_analyze_common import ids, make_run

LAYERS = ["norm_pre", "blocks.0", "blocks.1"]  # the residual stream of make_run's ViT


def test_a_copied_store_reuses_its_grams_in_few_requests(tmp_path: Path) -> None:
    import s3fs

    local = str(tmp_path / "s.zarr")
    make_run(local, "vit", ids(24), attention=False, inputs=False)
    run_cka(CKAConfig(store=local, run="vit", batch_size=8, progress=False))  # fills the cache
    with moto_s3("copied") as bucket:
        fs = s3fs.S3FileSystem()
        url = f"{bucket}/s.zarr"
        fs.put(local, url, recursive=True)  # a copy: new modification times and etags
        grams = {k: v["ETag"] for k, v in fs.find(f"{url}/vit/_grams", detail=True).items()}
        with moto_requests() as requests:
            remote = run_cka(CKAConfig(store=url, run="vit", batch_size=8, seed=1, progress=False))
        seen = list(requests.seen)
        assert {k: v["ETag"] for k, v in fs.find(f"{url}/vit/_grams", detail=True).items()} == grams
    assert remote.attrs["grams_computed"] == [] and not remote.reused
    gets = Counter(p.split("/s.zarr/vit/", 1)[-1] for m, p, _ in seen if m == "GET")
    # --reduce flatten opens no layer: neither its activations nor its coordinates
    # (token kinds and positions, three requests a token layer) are read.
    assert not [p for p in gets if re.match(r"(norm_pre|blocks\.\d)/", p)], gets
    for layer in LAYERS:
        where = f"_grams/{layer}"
        # The Gram's own metadata fresh (its completeness and source), which carries its
        # row means and offsets (store/gram_inline.py): their arrays are not read; each
        # tile once.
        assert gets[f"{where}/gram/zarr.json"] == 1, layer
        assert not [k for k in gets if k.startswith((f"{where}/row_mean", f"{where}/offset"))]
        assert sum(v for k, v in gets.items() if k.startswith(f"{where}/gram/c/")) == 1, layer
    assert not [p for m, p, _ in seen if m != "GET" and "/_grams/" in p]  # nothing rewritten
    for progress in ("done", "failed", "unit_record", "image_id"):  # once per job
        chunks = [v for k, v in gets.items() if k.startswith(f"{progress}/c/")]
        assert chunks and set(chunks) == {1}, progress
    # The same numbers as the original store computes from its own Grams.
    here = run_cka(CKAConfig(store=local, run="vit", batch_size=8, seed=1, progress=False))
    assert here.attrs["grams_computed"] == []
    np.testing.assert_allclose(remote.dataset["cka"], here.dataset["cka"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(remote.dataset["depth_index_a"], here.dataset["depth_index_a"])
