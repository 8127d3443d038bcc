"""Top images per channel: the streaming job equals a plain numpy sort over the whole layer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jobs.analyze.top_images import TopImagesConfig, run_top_images, scored_positions
from tests.jobs.test_analyze_common import cli, ids, make_run  # noqa: F401
from tests.serve.conftest import snapshot
from vitcnn_store import open_store
from vitcnn_store.analysis.top_images import chunk_top_k, merge_top_k


def reference(x: np.ndarray, images: np.ndarray, positions: np.ndarray, k: int) -> tuple:
    """Per channel: every image's max over ``positions``, a full sort by (-score, image)."""
    n, _, c = x.shape
    out = np.zeros((3, min(k, n), c))
    for ch in range(c):
        scored = sorted(
            ((float(x[i, positions, ch].max()), int(images[i]), i) for i in range(n)),
            key=lambda s: (-s[0], s[1]),
        )[:k]
        for r, (score, image, row) in enumerate(scored):
            where = positions[int(np.argmax(x[row, positions, ch]))]
            out[:, r, ch] = score, image, where
    return out[0], out[1].astype(int), out[2].astype(int)


def test_kernel_merge_equals_one_sort_whatever_the_chunking() -> None:
    rng = np.random.default_rng(0)
    # float16 with few distinct values: many ties, broken by the lower image index.
    x = rng.integers(-3, 4, size=(37, 6, 5)).astype(np.float16)
    positions = np.array([1, 2, 4, 5])
    want = reference(x, np.arange(37), positions, 7)
    for bounds in ([0, 37], [0, 8, 16, 24, 32, 37], [0, 3, 30, 37]):
        parts = [
            chunk_top_k(x[a:b], np.arange(a, b), positions, 7)
            for a, b in itertools.pairwise(bounds)
        ]
        top = parts[0]
        for p in parts[1:]:
            top = merge_top_k(top, p, 7)
        np.testing.assert_array_equal(top.value, want[0])
        np.testing.assert_array_equal(top.image, want[1])
        np.testing.assert_array_equal(top.position, want[2])
        values = x.astype(np.float64)
        np.testing.assert_allclose(top.mean, values.mean(axis=(0, 1)), rtol=0, atol=1e-12)
        np.testing.assert_allclose(top.std, values.std(axis=(0, 1)), rtol=0, atol=1e-12)


def test_kernel_pooled_layer_has_no_position() -> None:
    x = np.array([[[1.0, 4.0]], [[2.0, 3.0]], [[2.0, 5.0]]])
    top = chunk_top_k(x, np.array([0, 1, 2]), np.zeros(0, dtype=int), k=2)
    assert top.image.tolist() == [[1, 2], [2, 0]] and (top.position == -1).all()


def test_job_equals_numpy_reference_on_every_layer(synth: str) -> None:
    result = run_top_images(TopImagesConfig(store=synth, run="vit", k=5, progress=False))
    ds = result.dataset
    run = open_store(synth)["vit"]
    usable = np.flatnonzero(run.valid)  # image 5 failed: never a top image
    assert ds["layer"].values.tolist() == run.layers and ds.attrs["k"] == 5
    for j, layer in enumerate(run.layers):
        x = run[layer]
        positions, ys, _ = scored_positions(x)
        values = x.values[usable].reshape(usable.size, -1, x.shape[-1])
        value, image, where = reference(values, usable, positions, 5)
        c = x.shape[-1]
        assert int(ds["n_channels"][j]) == c
        np.testing.assert_array_equal(ds["value"].values[j, :c].T, value)
        np.testing.assert_array_equal(ds["image"].values[j, :c].T, image)
        np.testing.assert_array_equal(ds["position"].values[j, :c].T, where)
        np.testing.assert_array_equal(ds["position_y"].values[j, :c].T, ys[where])
        assert (ds["image"].values[j, c:] == -1).all()
        assert 5 not in ds["image"].values[j]
        flat = values.astype(np.float64)
        np.testing.assert_allclose(
            ds["mean"].values[j, :c], flat.mean(axis=(0, 1)), rtol=0, atol=1e-9
        )
    # Token layers score patch tokens only: CLS (token 0) is never where a channel fires.
    assert (ds["position"].values[ds["image"].values >= 0] > 0).all()


def test_spatial_layers_and_reuse(synth: str) -> None:
    cfg = TopImagesConfig(store=synth, run="resnet", k=3, progress=False)
    first = run_top_images(cfg)
    run = open_store(synth)["resnet"]
    layer = run.layers[-1]
    x = run[layer]
    positions, _, xs = scored_positions(x)
    assert positions.size == x.shape[1] * x.shape[2]
    j = first.dataset["layer"].values.tolist().index(layer)
    values = x.values.reshape(x.shape[0], -1, x.shape[-1])
    value, image, where = reference(values, np.arange(x.shape[0]), positions, 3)
    np.testing.assert_array_equal(first.dataset["value"].values[j, : x.shape[-1]].T, value)
    np.testing.assert_array_equal(first.dataset["image"].values[j, : x.shape[-1]].T, image)
    np.testing.assert_array_equal(first.dataset["position_x"].values[j, : x.shape[-1]].T, xs[where])
    assert run_top_images(cfg).reused


def test_cli_writes_a_labelled_result_and_refuses_bad_k(synth: str) -> None:
    before = snapshot(synth)
    assert cli(["analyze", "top-images", synth, "vit", "--k", "0", "--no-progress"]) == 2
    assert cli(["analyze", "top-images", synth, "vit", "--layers", "nope.*"]) == 2
    assert snapshot(synth) == before
    argv = ["analyze", "top-images", synth, "vit", "--layers", "blocks.*", "--k", "2"]
    assert cli([*argv, "--name", "top2", "--no-progress"]) == 0
    ds = open_store(synth)["vit"].analysis("top2")
    assert ds.attrs["analysis"] == "top-images" and ds.sizes["rank"] == 2
    assert "maximum over positions" in ds.attrs["statistic"]


def test_incomplete_run_needs_allow_incomplete(synth: str) -> None:
    with pytest.raises(Exception, match="allow-incomplete"):
        run_top_images(TopImagesConfig(store=synth, run="partial", progress=False))
    ds = run_top_images(
        TopImagesConfig(store=synth, run="partial", allow_incomplete=True, progress=False)
    ).dataset
    images = ds["image"].values
    assert set(images[images >= 0].tolist()) <= set(range(8)) | set(range(16, 24))
