"""The attention job equals the kernels on the loaded attention arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.analyze.attention import AttentionConfig, run_attention
from tests.jobs.test_analyze_common import cli, ids, make_run
from vitcnn_store import open_store
from vitcnn_store.analysis.attention import (
    attention_entropy,
    cls_attention_map,
    mean_attention_distance,
)


@pytest.mark.parametrize("renormalize", [False, True])
def test_attention_matches_kernels(synth: str, renormalize: bool) -> None:
    cfg = AttentionConfig(
        store=synth,
        run="vit",
        renormalize=renormalize,
        progress=False,
        name=f"att-{renormalize}",
    )
    ds = run_attention(cfg).dataset
    run = open_store(synth)["vit"]
    valid = run.valid
    assert ds["layer"].values.tolist() == run.attention_layers == ["blocks.0.attn", "blocks.1.attn"]
    for j, layer in enumerate(run.attention_layers):
        a = run.attention(layer)
        attn = a.values[valid]
        yx = np.stack([a["query_y"].values, a["query_x"].values], axis=1)
        kw = {"renormalize": renormalize}
        np.testing.assert_allclose(
            ds["mean_distance"].values[j],
            mean_attention_distance(attn, yx, **kw),
            rtol=1e-10,
            atol=1e-8,
        )
        np.testing.assert_allclose(
            ds["entropy"].values[j], attention_entropy(attn, yx, **kw), rtol=1e-10, atol=1e-10
        )
        np.testing.assert_allclose(
            ds["cls_attention"].values[j],
            cls_attention_map(attn, yx, 0, **kw),
            rtol=1e-10,
            atol=1e-10,
        )
    assert ds.attrs["renormalize"] is renormalize and ds.attrs["n"] == 47
    assert ds["mean_distance"].dims == ("layer", "head")
    assert ds["cls_attention"].dims == ("layer", "head", "grid_y", "grid_x")
    assert ds["grid_y"].values.tolist() == [2.0, 6.0]
    # Baseline: uniform attention on the synthetic 2×2 grid of 4-px patches plus CLS.
    # Patch pairs: 4 at 0 px, 8 at 4 px, 4 at 4√2 px, so the mean pair distance is
    # (32 + 16√2) / 16; without renormalization 4 of the 5 keys count.
    pair = (32 + 16 * np.sqrt(2)) / 16
    expected = pair if renormalize else pair * 4 / 5
    np.testing.assert_allclose(
        ds["uniform_distance"].values, [expected] * 2, rtol=1e-12, atol=1e-12
    )
    ent = np.log(4) if renormalize else 4 / 5 * np.log(5)
    np.testing.assert_allclose(ds["uniform_entropy"].values, [ent] * 2, rtol=1e-12, atol=1e-12)
    assert "2×2 grid of 4-px patches" in ds.attrs["baseline"]


def test_attention_only_groups_borrow_token_positions(tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    make_run(url, "v", ids(16), attention_only=True, inputs=False)
    ds = run_attention(AttentionConfig(store=url, run="v", progress=False)).dataset
    assert np.isfinite(ds["mean_distance"].values).all()


def test_no_attention_is_one_line_error(synth: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["analyze", "attention", synth, "resnet", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--attention" in err and len(err.splitlines()) == 1
    assert cli(["analyze", "attention", synth, "vit", "--layers", "x.*", "--no-progress"]) == 2


@pytest.fixture(scope="module")
def tiny_vit_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real tiny ViT (random init) extracted in-process with its attention."""
    from tests.conftest import extract_tiny

    url = str(tmp_path_factory.mktemp("att") / "vit.zarr")
    extract_tiny(url, "vit", "vit", layers="preset:blocks", attention=True, limit=12, chunk_size=6)
    return url


def test_cls_key_mass_end_to_end(tiny_vit_store: str, tmp_path: Path) -> None:
    """CLS-key mass per head from a real extraction, against numpy on the stored arrays;
    the convention is chosen on the command line and recorded in the result."""
    url = tiny_vit_store
    assert (
        cli(
            [
                "analyze",
                "attention",
                url,
                "vit",
                "--renormalize",
                "--name",
                "att_r",
                "--no-progress",
                "--figures",
                str(tmp_path),
            ]
        )
        == 0
    )
    run = open_store(url)["vit"]
    for renormalize in (False, True):
        name = "att_r" if renormalize else "att"
        cfg = AttentionConfig(
            store=url, run="vit", renormalize=renormalize, name=name, progress=False
        )
        ds = run_attention(cfg).dataset
        assert ds["cls_key_mass"].dims == ("layer", "head")
        assert ds.attrs["renormalize"] is renormalize
        assert ("rescaled away" if renormalize else "dropped, not renormalized") in ds.attrs[
            "cls_key"
        ]
        for j, layer in enumerate(run.attention_layers):
            a = run.attention(layer)
            attn = np.asarray(a.values, dtype=np.float64)
            kinds = np.asarray(a["key_kind"].values).astype(str)
            patch, cls = kinds == "patch", int(np.flatnonzero(kinds == "cls")[0])
            expected = attn[:, :, patch, cls].mean(axis=(0, 2))
            np.testing.assert_allclose(
                ds["cls_key_mass"].values[j], expected, rtol=1e-10, atol=1e-10
            )
            np.testing.assert_allclose(
                ds["prefix_key_mass"].values[j], expected, rtol=1e-10, atol=1e-10
            )
            # Distances follow the convention: dropped mass, or rows rescaled to sum 1.
            rows = attn[:, :, patch][:, :, :, patch]
            if renormalize:
                rows = rows / rows.sum(axis=-1, keepdims=True)
            yx = np.stack([a["key_y"].values, a["key_x"].values], axis=1)[patch].astype(float)
            dist = np.linalg.norm(yx[:, None] - yx[None], axis=-1)
            mad = np.einsum("nhqk,qk->h", rows, dist) / (rows.shape[0] * rows.shape[2])
            np.testing.assert_allclose(ds["mean_distance"].values[j], mad, rtol=1e-10, atol=1e-8)
        # A random-init ViT's heads spread over all 5 tokens: CLS gets about a fifth.
        assert 0.05 < float(ds["cls_key_mass"].mean()) < 0.5


def test_distance_interval_is_the_bootstrap_of_per_image_distances(synth: str) -> None:
    """Each image's mean distance from plain numpy, resampled by a loop drawing from the
    same stream as the kernel (row b: ``integers(0, n, (B, n))[b]``), percentiles."""
    ds = run_attention(
        AttentionConfig(
            store=synth, run="vit", bootstrap=200, ci_level=0.8, progress=False, name="att-ci"
        )
    ).dataset
    run = open_store(synth)["vit"]
    per_layer = []
    for layer in run.attention_layers:
        a = run.attention(layer)
        attn = a.values[run.valid].astype(np.float64)
        yx = np.stack([a["query_y"].values, a["query_x"].values], axis=1).astype(np.float64)
        patch = ~np.isnan(yx).any(axis=1)
        p = attn[:, :, patch][:, :, :, patch]
        d = np.linalg.norm(yx[patch][:, None] - yx[patch][None], axis=-1)
        per_layer.append((p * d).sum(axis=-1).mean(axis=-1))  # (image, head)
    values = np.stack(per_layer, axis=1)  # (image, layer, head)
    n = values.shape[0]
    draws = np.random.default_rng(0).integers(0, n, size=(200, n))
    reps = np.stack([values[d].mean(axis=0) for d in draws])
    np.testing.assert_allclose(
        ds["mean_distance_lo"].values, np.percentile(reps, 10, axis=0), rtol=0, atol=1e-8
    )
    np.testing.assert_allclose(
        ds["mean_distance_hi"].values, np.percentile(reps, 90, axis=0), rtol=0, atol=1e-8
    )
    assert (ds["mean_distance_lo"] <= ds["mean_distance"]).all()
    assert (ds["mean_distance"] <= ds["mean_distance_hi"]).all()
    assert ds.attrs["ci_level"] == 0.8 and ds.attrs["bootstrap_resamples"] == 200
    none = run_attention(
        AttentionConfig(store=synth, run="vit", bootstrap=0, progress=False, name="att-noci")
    ).dataset
    assert "mean_distance_lo" not in none
