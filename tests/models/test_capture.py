"""Capture: canonical layouts, coordinates, and leaving the model as found."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from vitcnn_store.errors import LayerPatternError
from vitcnn_store.models.capture import Capture, output_shapes, token_coordinates


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=48, depth=2, reg_tokens=2).eval()


def test_outputs_and_layouts(vit: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 48, 48)
    with Capture(vit, ["blocks.0", "patch_embed.proj", "head"], ["blocks.1.attn"]) as cap:
        acts, attn = cap(x)
        layouts = cap.describe(x[:1])
    assert acts["blocks.0"].shape == (2, 1 + 2 + 9, 192)
    assert acts["patch_embed.proj"].shape == (2, 3, 3, 192)  # NCHW -> NHWC
    assert acts["head"].shape == (2, 1000)
    assert attn["blocks.1.attn"].shape == (2, 3, 12, 12)
    torch.testing.assert_close(attn["blocks.1.attn"].sum(-1), torch.ones(2, 3, 12))
    assert layouts["blocks.0"].kind == "token"
    assert layouts["patch_embed.proj"].kind == "spatial"
    assert layouts["head"].kind == "pooled"
    assert layouts["patch_embed.proj"].depth_index < layouts["blocks.0"].depth_index
    kinds = list(layouts["blocks.0"].coords["token_kind"])
    assert kinds[:3] == ["cls", "reg", "reg"] and set(kinds[3:]) == {"patch"}
    np.testing.assert_array_equal(layouts["patch_embed.proj"].coords["x"], [8.0, 24.0, 40.0])


def test_model_left_as_found(vit: torch.nn.Module) -> None:
    fused_before = [m.fused_attn for m in (vit.blocks[0].attn, vit.blocks[1].attn)]
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        before = vit(x)
    with Capture(vit, ["blocks.0"], ["blocks.0.attn", "blocks.1.attn"]) as cap:
        assert not vit.blocks[0].attn.fused_attn
        cap(x)
    assert [m.fused_attn for m in (vit.blocks[0].attn, vit.blocks[1].attn)] == fused_before
    assert all(not m._forward_hooks for m in vit.modules())
    with torch.no_grad():
        torch.testing.assert_close(vit(x), before)


def test_hooks_removed_after_error(vit: torch.nn.Module) -> None:
    with pytest.raises((RuntimeError, AssertionError)), Capture(vit, ["blocks.0"]) as cap:
        cap(torch.randn(1, 3, 7, 7))  # wrong input size
    assert all(not m._forward_hooks for m in vit.modules())


def test_token_coordinates_of_16px_patches() -> None:
    model = timm.create_model("vit_tiny_patch16_224", depth=1)
    c = token_coordinates(model, 197, (224, 224))
    assert c["token_kind"][0] == "cls" and np.isnan(c["token_x"][0])
    assert c["token_x"][1] == 8.0 and c["token_y"][1] == 8.0
    assert c["token_x"][14] == 216.0 and c["token_y"][15] == 24.0


def test_unknown_and_non_attention_modules(vit: torch.nn.Module) -> None:
    with pytest.raises(LayerPatternError, match="no module"):
        Capture(vit, ["nope"])
    with pytest.raises(LayerPatternError, match="does not expose its attention probabilities"):
        Capture(vit, [], ["blocks.0"])


def test_output_shapes(vit: torch.nn.Module) -> None:
    shapes = output_shapes(vit, torch.zeros(1, 3, 48, 48))
    assert shapes["blocks.1.mlp.fc1"] == (1, 12, 768)
    assert all(not m._forward_hooks for m in vit.modules())


def test_outputs_are_copies_safe_from_in_place_ops() -> None:
    # A ResNet block adds its shortcut onto bn2's output in place, then ReLUs in place.
    model = timm.create_model("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    with Capture(model, ["layer1.0.bn2", "layer1.0"]) as cap:
        acts, _ = cap(x)
    block = model.layer1[0]
    with torch.no_grad():
        stem = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        branch = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(stem)))))
    torch.testing.assert_close(acts["layer1.0.bn2"], branch.permute(0, 2, 3, 1))
    assert not torch.equal(acts["layer1.0.bn2"], acts["layer1.0"])


def test_cast_in_hook(vit: torch.nn.Module) -> None:
    with Capture(vit, ["blocks.0"], ["blocks.0.attn"], dtype=torch.float16) as cap:
        acts, attn = cap(torch.randn(1, 3, 48, 48))
    assert acts["blocks.0"].dtype == attn["blocks.0.attn"].dtype == torch.float16


class _TwiceAndArgmax(torch.nn.Module):
    """A block applied twice per forward (shared weights), then an argmax."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.head(self.block(self.block(x)))
        return h, h.argmax(-1)


class _ArgMax(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


def test_a_module_called_twice_per_forward_is_refused_naming_it() -> None:
    model = _TwiceAndArgmax().eval()
    with Capture(model, ["head"]) as cap:
        acts, _ = cap(torch.randn(2, 5, 4))  # a module run once is fine
    assert acts["head"].shape == (2, 5, 3)
    with (
        Capture(model, ["block", "head"]) as cap,
        pytest.raises(LayerPatternError, match=r"^layer 'block' runs 2 times in one forward pass"),
    ):
        cap(torch.randn(2, 5, 4))
    assert not model.block._forward_hooks  # hooks removed after the refusal


def test_integer_outputs_are_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), _ArgMax()).eval()
    with (
        Capture(model, ["1"]) as cap,
        pytest.raises(
            LayerPatternError, match=r"'1' outputs int64 values .* only floating-point outputs"
        ),
    ):
        cap(torch.randn(2, 5, 4))
