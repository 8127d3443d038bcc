"""The Gram cache in the store: its layout, checksums, source state, reads and damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from jobs.analyze.cka import CKAConfig, run_cka
from jobs.analyze.options import AnalysisWarning
from tests.jobs.test_analyze_common import ids, make_run
from vitcnn_store import open_store
from vitcnn_store.errors import DamagedDataError
from vitcnn_store.store import RunWriter
from vitcnn_store.store.codecs import has_checksum
from vitcnn_store.store.grams import (
    GramReader,
    create_gram,
    delete_grams,
    find_gram,
    finish_gram,
    gram_path,
    source_state,
    write_tile,
)
from vitcnn_store.store.verify import verify_store


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The store the tests start from, made once; read-only (each test takes a copy)."""
    url = str(tmp_path_factory.mktemp("grams") / "g.zarr")
    make_run(url, "r", ids(20), depth=1, chunk=4, attention=False, inputs=False, failed=[2])
    return url


@pytest.fixture
def store(template: str, tmp_path: Path) -> str:
    """A private copy of :func:`template` (copying its files costs less than making its run)."""
    return str(shutil.copytree(template, tmp_path / "g.zarr"))


def _full_gram(url: str, run: str, layer: str, tile: int) -> tuple[np.ndarray, object]:
    r = open_store(url)[run]
    mask = r.valid
    x = r[layer].values.astype(np.float64).reshape(r.n_images, -1)
    k = x @ x.T
    k[~mask] = np.nan
    k[:, ~mask] = np.nan
    state = source_state(r, layer, mask)
    info = create_gram(r, layer, "flatten", n=20, tile=tile, features=x.shape[1], state=state)
    for p, (r0, r1) in enumerate(info.panels):
        for q, (c0, c1) in enumerate(info.panels):
            if q >= p:
                write_tile(info, p, q, k[r0:r1, c0:c1])
    assert find_gram(r, layer, "flatten", state) is None  # not complete yet
    finish_gram(info, np.where(mask, np.nan_to_num(k).sum(axis=1) / mask.sum(), np.nan))
    return k, info


def test_layout_checksums_and_reads(store: str) -> None:
    k, info = _full_gram(store, "r", "blocks.0", tile=8)
    arr = zarr.open_array(store, path=gram_path("r", "blocks.0"), mode="r")
    assert has_checksum(arr) and arr.chunks == (8, 8) and arr.dtype == np.float64
    assert arr.attrs["complete"] and arr.metadata.dimension_names == ("image_a", "image_b")
    stored = arr[...]
    assert np.isnan(stored[8:16, :8]).all()  # lower tiles are not stored
    np.testing.assert_array_equal(np.where(np.isnan(stored), stored.T, stored)[3:, 3:], k[3:, 3:])
    run = open_store(store)["r"]
    state = source_state(run, "blocks.0", run.valid)
    assert find_gram(run, "blocks.0", "flatten", state) == info
    rng = np.random.default_rng(0)
    usable = np.flatnonzero(run.valid)
    reader = GramReader(info)
    for _ in range(5):
        rows, cols = rng.choice(usable, 7), rng.choice(usable, 9)
        np.testing.assert_array_equal(reader.block(rows, cols), k[np.ix_(rows, cols)])
    with pytest.raises(DamagedDataError, match="no values for some requested images"):
        reader.block(np.array([2]), np.array([0]))  # image 2 failed: no Gram row
    delete_grams(open_store(store), "r", "blocks.0")
    assert find_gram(run, "blocks.0", "flatten", state) is None


def test_source_state_follows_the_content_of_the_units(store: str) -> None:
    run = open_store(store)["r"]
    before = source_state(run, "blocks.0", run.valid)
    assert before == source_state(run, "blocks.0", run.valid)  # nothing changed
    assert before["digest"] != source_state(run, "blocks.0", ~run.valid)["digest"]
    writer = RunWriter(store, "r")
    group = zarr.open_group(store, path="r", mode="r")
    values = {
        k: np.asarray(group[k][4:8])
        for k in writer._arrays
        if k not in ("image", "image_id", "label", "failed", "failure")
    }
    writer.write_unit(1, values, np.zeros(4, bool), [""] * 4)  # same bytes, rewritten
    same = source_state(open_store(store)["r"], "blocks.0", run.valid)
    assert same["digest"] == before["digest"]  # the content decides, not the file's mtime
    changed = {k: v + 1 for k, v in values.items()}
    writer.write_unit(1, changed, np.zeros(4, bool), [""] * 4)  # other values: invalid
    after = source_state(open_store(store)["r"], "blocks.0", run.valid)
    assert after["digest"] != before["digest"] and after["units_done"] == before["units_done"]
    zarr.open_array(store, path="r/done", mode="r+")[1] = False  # what verify --repair does
    repaired = open_store(store)["r"]
    assert source_state(repaired, "blocks.0", run.valid)["digest"] != after["digest"]


def test_gram_survives_a_copy_and_not_an_overwrite(store: str, tmp_path: Path) -> None:
    import os
    import shutil
    import time

    _, info = _full_gram(store, "r", "blocks.0", tile=8)
    time.sleep(1.1)  # a copy made later: every file gets a new modification time
    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(store, copy, copy_function=shutil.copyfile)
    gram = Path(copy) / "r" / "_grams" / "blocks.0" / "gram" / "c" / "0" / "0"
    assert os.stat(gram).st_mtime > os.stat(Path(store, gram.relative_to(copy))).st_mtime
    run = open_store(copy)["r"]
    found = find_gram(run, "blocks.0", "flatten", source_state(run, "blocks.0", run.valid))
    assert found is not None and found.n == info.n  # type: ignore[attr-defined]
    # The same images and values extracted again (--overwrite): a new run, a new Gram.
    make_run(copy, "r", ids(20), depth=1, chunk=4, attention=False, inputs=False, failed=[2])
    again = open_store(copy)["r"]
    state = source_state(again, "blocks.0", again.valid)
    assert find_gram(again, "blocks.0", "flatten", state) is None


def test_damaged_gram_is_refused_verified_dropped_and_recomputed(store: str) -> None:
    cfg = {"store": store, "run": "r", "batch_size": 8, "gram_tile": 8, "progress": False}
    first = run_cka(CKAConfig(**cfg)).dataset
    tile = Path(store) / "r" / "_grams" / "blocks.0" / "gram" / "c" / "0" / "1"
    data = bytearray(tile.read_bytes())
    data[20] ^= 0xFF
    tile.write_bytes(bytes(data))
    run = open_store(store)["r"]
    info = find_gram(run, "blocks.0", "flatten", source_state(run, "blocks.0", run.valid))
    assert info is not None
    with pytest.raises(DamagedDataError, match=r"_grams/blocks\.0/gram.*checksum"):
        GramReader(info).block(np.arange(4), np.arange(8, 12))
    report = verify_store(store)
    (problem,) = report.problems
    assert problem.layer == "_grams/blocks.0/gram" and "cached Gram" in problem.problem
    # The job notices, computes the Gram again from the activations, and gets the same result.
    with pytest.warns(AnalysisWarning, match=r"Gram cache of r/blocks\.0 is damaged"):
        again = run_cka(CKAConfig(**cfg, recompute=True)).dataset
    np.testing.assert_allclose(again["cka"].values, first["cka"].values, atol=1e-12)
    assert verify_store(store).ok
    tile.write_bytes(bytes(data))  # damaged again: --repair drops it
    report = verify_store(store, repair=True)
    assert any("dropped the damaged Gram cache of r/blocks.0" in n for n in report.notes)
    assert verify_store(store).ok and "blocks.0" not in zarr.open_group(store, path="r/_grams")


def test_batched_reads_match_single_reads_and_see_fresh_metadata(store: str) -> None:
    """find_grams reads every Gram's own metadata at once; blocks and vectors read from
    those documents equal the ones read array by array; a Gram made incomplete after
    the run's metadata was consolidated is not found."""
    from vitcnn_store.store.grams import GramInfo, find_grams, read_blocks, read_vectors
    from vitcnn_store.store.index import consolidate_run

    k, _ = _full_gram(store, "r", "blocks.0", tile=8)
    r = open_store(store)["r"]
    state = source_state(r, "blocks.0", r.valid)
    states = {"blocks.0": state, "no.such.layer": state}
    found = find_grams(r, ["blocks.0", "no.such.layer"], "flatten", states)
    assert found[1] is None and found[0] is not None and found[0].meta is not None
    g = found[0]
    plain = GramInfo(g.url, g.run, g.layer, g.reduce, g.n, g.tile)
    rows, cols = np.array([0, 5, 9, 17]), np.array([19, 3, 8])
    single = GramReader(plain).block(rows, cols)
    np.testing.assert_array_equal(read_blocks([found[0], plain], rows, cols), [single, single])
    np.testing.assert_allclose(
        single, k[np.ix_(rows, cols)], rtol=1e-12, atol=1e-12 * np.abs(k).max()
    )
    # found[0]'s vectors come from the copy in its metadata document, plain's from the
    # row_mean and offset arrays: the same numbers.
    assert "vectors" in json.loads(g.meta[0])["attributes"]
    means = read_vectors([found[0], plain], "row_mean")
    np.testing.assert_array_equal(means[0], means[1])
    np.testing.assert_array_equal(read_vectors([found[0]], "offset")[0], np.zeros(20))
    consolidate_run(store, "r")  # the snapshot says complete ...
    zarr.open_array(store, path=gram_path("r", "blocks.0"), mode="r+").attrs["complete"] = False
    r = open_store(store)["r"]  # ... the Gram's own metadata, read fresh, does not
    assert find_grams(r, ["blocks.0"], "flatten", {"blocks.0": state}) == [None]


def test_the_snapshots_leave_out_the_vectors_copy(store: str) -> None:
    """A finished Gram's own zarr.json carries its row means and offsets (the read that
    checks it brings them); the run's and the root's consolidated metadata, which every
    command reads, do not, whether spliced by an analysis or consolidated whole."""
    from vitcnn_store.store.writer import consolidate

    run_cka(CKAConfig(store=store, run="r", batch_size=8, gram_tile=8, progress=False))
    own = json.loads((Path(store) / "r/_grams/blocks.0/gram/zarr.json").read_text())
    assert {"row_mean", "offset"} <= set(own["attributes"]["vectors"])

    def snapshots() -> list[dict]:
        run = json.loads((Path(store) / "r/zarr.json").read_text())
        root = json.loads((Path(store) / "zarr.json").read_text())
        flat = run["consolidated_metadata"]["metadata"]
        return [flat["_grams/blocks.0/gram"], root["consolidated_metadata"]["metadata"]]

    run_entry, root_meta = snapshots()  # spliced in by the analysis (refresh_derived)
    assert run_entry["attributes"]["complete"] is True and "vectors" not in run_entry["attributes"]
    assert "vectors" not in root_meta["r/_grams/blocks.0/gram"]["attributes"]
    consolidate(store, "r")  # the run and the root consolidated whole (extraction, repair)
    run_entry, root_meta = snapshots()
    assert run_entry["attributes"]["complete"] is True and "vectors" not in run_entry["attributes"]
    assert "vectors" not in root_meta["r/_grams/blocks.0/gram"]["attributes"]
    own = json.loads((Path(store) / "r/_grams/blocks.0/gram/zarr.json").read_text())
    assert "vectors" in own["attributes"]  # the Gram's own document keeps it
    # The snapshot still opens, and the Gram is still found and reused.
    cfg = CKAConfig(store=store, run="r", batch_size=8, gram_tile=8, seed=5, progress=False)
    again = run_cka(cfg)
    assert again.attrs["grams_computed"] == []
