"""Per-head attention outputs (``--attention-heads``) against the heads computed by hand
from the block's own weights, and the per-head CKA-vs-distance analysis against numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_VIT, extract_tiny
from tests.helpers import module_outputs, snapshot
from vitcnn_store import open_store


def _heads_by_hand(model, x):  # type: ignore[no-untyped-def]
    """softmax(q kᵀ/√d) v per head of blocks.0.attn, from qkv on norm1's output."""
    import torch

    attn = model.blocks[0].attn
    inp = module_outputs(model, x, ["blocks.0.norm1"])["blocks.0.norm1"]
    b, n, _ = inp.shape
    h, d = attn.num_heads, attn.head_dim
    with torch.no_grad():
        qkv = attn.qkv(inp).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        p = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
    return (p @ v).numpy()  # (image, head, token, d)


def test_head_outputs_are_the_heads_context_vectors(tmp_path: Path) -> None:
    import torch

    url = tmp_path / "h.zarr"
    extract_tiny(
        url,
        "v",
        layers="preset:blocks",
        attention_heads=True,
        limit=16,
        dtype="float32",
        inputs=True,
    )
    run = open_store(str(url))["v"]
    assert "blocks.0.attn.norm" in run.layers and "blocks.1.attn.norm" in run.layers
    x = run["blocks.0.attn.norm"]
    assert x.attrs["heads"] == 3 and x.attrs["head_dim"] == 64
    assert x.attrs["head_output_of"] == "blocks.0.attn"
    from vitcnn_store.models import ModelSpec, build_model

    # The run's weights, rebuilt from its spec (random init from the recorded seed).
    model = build_model(
        ModelSpec(
            TINY_VIT["name"], img_size=TINY_VIT["img_size"], model_args=TINY_VIT["model_args"]
        )
    ).eval()
    inputs = torch.as_tensor(run.inputs.values).permute(0, 3, 1, 2).float()
    ref = _heads_by_hand(model, inputs)
    stored = x.values.reshape(16, x.shape[1], 3, 64).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(stored, ref, rtol=0, atol=1e-4)


def test_attention_heads_refusals(tmp_path: Path) -> None:
    from jobs.config import ExtractConfig
    from vitcnn_store.errors import LayerPatternError, UsageError
    from vitcnn_store.models import ModelSpec

    with pytest.raises(UsageError, match="--attention-layers needs"):
        ExtractConfig(
            model=ModelSpec("resnet18"),
            images="builtin:faces",
            store=str(tmp_path / "s"),
            run="r",
            attention_layers="blocks.*",
        ).validate()
    url = tmp_path / "r.zarr"
    extract_tiny(url, "kept", "resnet", limit=4)
    before = snapshot(url)
    with pytest.raises(LayerPatternError, match="--attention-heads"):
        extract_tiny(url, "r", "resnet", attention_heads=True, limit=4)
    assert snapshot(url) == before  # refused before anything is written


def _ref_hsic1(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    rk, rl = K.sum(1), L.sum(1)
    return float(
        (np.sum(K * L) + rk.sum() * rl.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rk @ rl)
        / (n * (n - 3))
    )


def test_per_head_cka_and_distance_equal_numpy(tmp_path: Path) -> None:
    """Per head, minibatch CKA with the ResNet's lower layers over the recorded batches, and
    the mean attention distance, both recomputed with plain numpy; the figure draws them."""
    from jobs.analyze.heads import HeadsConfig, run_heads
    from vitcnn_store.interface import plots

    url = str(tmp_path / "p.zarr")
    extract_tiny(
        url,
        "vit",
        layers="preset:blocks",
        attention=True,
        attention_heads=True,
        limit=24,
        dtype="float32",
    )
    extract_tiny(url, "resnet", "resnet", layers="preset:blocks", limit=24, dtype="float32")
    ds = run_heads(
        HeadsConfig(store=url, run="vit", run2="resnet", batch_size=8, progress=False)
    ).dataset
    store = open_store(url)
    vit, resnet = store["vit"], store["resnet"]
    assert ds["head_layer"].values.tolist() == ["blocks.0.attn.norm", "blocks.1.attn.norm"]
    lower = ds["layer_b"].values.tolist()
    assert lower and "layer4.1" not in lower  # up to half depth
    a, b = ds["batch_image"].values, ds["batch_image_b"].values
    assert a.shape == (3, 8)
    for j, layer in enumerate(ds["head_layer"].values.tolist()):
        x = vit[layer].values.astype(np.float64)
        for h in range(3):
            head = x[..., h * 64 : (h + 1) * 64].reshape(24, -1)
            for k, other in enumerate(lower):
                y = resnet[other].values.astype(np.float64).reshape(24, -1)
                kl = [(head[r] @ head[r].T, y[s] @ y[s].T) for r, s in zip(a, b, strict=True)]
                xy = sum(_ref_hsic1(K, L) for K, L in kl)
                xx = sum(_ref_hsic1(K, K) for K, _ in kl)
                yy = sum(_ref_hsic1(L, L) for _, L in kl)
                assert ds["cka"].values[j, h, k] == pytest.approx(xy / np.sqrt(xx * yy), abs=1e-9)
        attn = vit.attention(layer.removesuffix(".norm"))
        p = attn.values.astype(np.float64)
        yx = np.stack([attn["query_y"].values, attn["query_x"].values], 1).astype(np.float64)
        patch = ~np.isnan(yx).any(axis=1)
        d = np.linalg.norm(yx[patch][:, None] - yx[patch][None], axis=-1)
        ref = (p[:, :, patch][:, :, :, patch] * d).sum(-1).mean(axis=(0, 2))
        np.testing.assert_allclose(ds["mean_distance"].values[j], ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ds["cka_lower"].values, ds["cka"].values.mean(axis=2), atol=0)
    fig = plots.draw_heads(ds)
    points = [c.get_offsets() for c in fig.axes[0].collections]
    assert len(points) == 2 and all(len(p) == 3 for p in points)
    np.testing.assert_allclose(points[0][:, 0], ds["mean_distance"].values[0], atol=1e-12)


def test_heads_refusals(tmp_path: Path) -> None:
    from tests.jobs.test_analyze_common import cli

    url = str(tmp_path / "q.zarr")
    extract_tiny(url, "vit", layers="preset:blocks", attention_heads=True, limit=8)
    extract_tiny(url, "plain", layers="preset:blocks", limit=8)
    before = snapshot(url)
    assert cli(["analyze", "heads", url, "vit", "plain", "--no-progress"]) == 2  # no attention
    assert cli(["analyze", "heads", url, "plain", "vit", "--no-progress"]) == 2  # no heads
    assert cli(["analyze", "heads", url, "vit", "--no-progress"]) == 2  # no RUN2
    assert snapshot(url) == before
