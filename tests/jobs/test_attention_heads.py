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
    extract_tiny(url, "v", layers="preset:blocks", attention_heads=True, limit=16,
                 dtype="float32", inputs=True)  # fmt: skip
    run = open_store(str(url))["v"]
    assert "blocks.0.attn.norm" in run.layers and "blocks.1.attn.norm" in run.layers
    x = run["blocks.0.attn.norm"]
    assert x.attrs["heads"] == 3 and x.attrs["head_dim"] == 64
    assert x.attrs["head_output_of"] == "blocks.0.attn"
    from vitcnn_store.models import ModelSpec, build_model

    # The run's weights, rebuilt from its spec (random init from the recorded seed).
    model = build_model(ModelSpec(TINY_VIT["name"], img_size=TINY_VIT["img_size"],
                                  model_args=TINY_VIT["model_args"])).eval()  # fmt: skip
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
