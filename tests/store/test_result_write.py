"""Writing a result from memory: few requests on S3, the commit marker last, nothing left
over from an earlier write of the same key."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.helpers import MotoRequests, moto_requests, moto_s3
from tests.jobs.test_analyze_common import ids, make_run
from vitcnn_store import open_store
from vitcnn_store.store.analyses import COMPLETE_ATTR, LATEST_ATTR, list_results, plain_json
from vitcnn_store.store.index import run_group
from vitcnn_store.store.result_write import write_analysis
from vitcnn_store.store.verify import verify_store


def _result(values: np.ndarray, parameters: dict[str, object]) -> xr.Dataset:
    layers = np.array([f"blocks.{i}" for i in range(len(values))], dtype=object)
    return xr.Dataset(
        {
            "cka": (("layer_a", "layer_b"), np.outer(values, values)),
            "depth": ("layer_a", np.arange(len(values))),
        },
        coords={"layer_a": layers, "layer_b": layers},
        attrs={"analysis": "cka", "parameters": plain_json(parameters)},
    )


@pytest.fixture(scope="module")
def bucket() -> Iterator[str]:
    with moto_s3("results") as url:
        yield url


@pytest.fixture()
def requests() -> Iterator[MotoRequests]:
    with moto_requests() as handler:
        yield handler


def test_a_result_on_s3_is_written_in_few_requests(bucket: str, requests: MotoRequests) -> None:
    url = f"{bucket}/few.zarr"
    make_run(url, "v", ids(8), depth=1, attention=False, inputs=False)
    store = open_store(url)  # the job's handle, opened before the requests counted
    first = write_analysis(store, "v", "cka", _result(np.arange(1.0, 4.0), {"seed": 0}))
    requests.seen.clear()
    second = write_analysis(store, "v", "cka", _result(np.arange(2.0, 5.0), {"seed": 1}))
    seen = list(requests.seen)
    import s3fs

    objects = s3fs.S3FileSystem().find(f"{url}/{second.group}")
    below = f"/{second.group}/"
    # Each object of the result once, its group's zarr.json twice (without, then with
    # the marker), the pointer and the run's and root's snapshots; nothing read back.
    puts = Counter(path for method, path, _ in seen if method == "PUT")
    assert sum(puts.values()) == len(objects) + 1 + 3
    assert puts[f"/{url.removeprefix('s3://')}/{second.group}/zarr.json"] == 2
    assert not [p for m, p, _ in seen if m == "GET" and below in p and "/c/" in p]
    # No listing (the name's other results are found in the run's snapshot); the reads:
    # the run's, _analyses', the name's and the key's zarr.json, the earlier result's
    # (its marker), and the run's and root's again just before rewriting them.
    assert not [p for _, p, listing in seen if listing]
    gets = [p for m, p, _ in seen if m == "GET"]
    assert len(gets) == 7 and len(seen) == len(gets) + sum(puts.values()), seen
    assert second.kept == [first.group] and not second.replaced
    # Readers find both from the run's snapshot, the latest the new one.
    raw = json.loads(s3fs.S3FileSystem().cat_file(f"{url}/v/zarr.json"))
    snapshot = raw["consolidated_metadata"]["metadata"]
    assert {first.group.split("/", 1)[1], second.group.split("/", 1)[1]} <= set(snapshot)
    run = open_store(url)["v"]
    np.testing.assert_array_equal(
        run.analysis("cka")["cka"].values, np.outer(np.arange(2.0, 5.0), np.arange(2.0, 5.0))
    )
    assert verify_store(url).ok


def test_a_job_dying_before_the_marker_leaves_an_invisible_result(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    url = f"{bucket}/dies.zarr"
    make_run(url, "v", ids(8), depth=1, attention=False, inputs=False)
    good = write_analysis(open_store(url), "v", "cka", _result(np.ones(3), {"seed": 0}))
    original = s3fs.S3FileSystem._pipe_file

    async def dies_at_the_marker(self: object, path: str, data: bytes, **kw: object) -> object:
        if COMPLETE_ATTR.encode() in data and path.endswith("/zarr.json"):
            raise ConnectionResetError("the job was killed")
        return await original(self, path, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", dies_at_the_marker)
    with pytest.raises(Exception, match="killed"):
        write_analysis(open_store(url), "v", "cka", _result(np.full(3, 2.0), {"seed": 1}))
    monkeypatch.undo()
    results = list_results(open_store(url), "v", "cka")
    assert [(r.key == good.key, r.complete) for r in results] == [(True, True), (False, False)]
    root = run_group(url, "v/_analyses/cka", consolidated=False)
    assert root.attrs[LATEST_ATTR] == good.key
    assert float(open_store(url)["v"].analysis("cka")["cka"][0, 0]) == 1.0
    assert not verify_store(url).ok
    verify_store(url, repair=True)
    assert [r.key for r in list_results(open_store(url), "v", "cka")] == [good.key]


def test_a_rewrite_leaves_no_chunk_of_the_earlier_result(tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    make_run(url, "v", ids(8), depth=1, attention=False, inputs=False)
    write_analysis(open_store(url), "v", "cka", _result(np.arange(1.0, 4.0), {"seed": 0}))
    # Same parameters (--recompute), now all NaN: zarr writes no chunk for fill values,
    # so an earlier chunk left in place would be read as this result's.
    again = write_analysis(open_store(url), "v", "cka", _result(np.full(3, np.nan), {"seed": 0}))
    assert again.replaced
    assert np.isnan(open_store(url)["v"].analysis("cka")["cka"].values).all()
    assert verify_store(url).ok
