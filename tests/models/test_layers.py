"""Layer patterns and presets."""

from __future__ import annotations

import re

import pytest
import timm
from hypothesis import given
from hypothesis import strategies as st

from vitcnn_store.errors import LayerPatternError
from vitcnn_store.models import attention_modules, expand_layers, model_roles, pattern_regex


@pytest.fixture(scope="module")
def vit() -> object:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)


@pytest.fixture(scope="module")
def resnet() -> object:
    return timm.create_model("resnet18")


@pytest.mark.parametrize(
    ("pattern", "path", "hit"),
    [
        ("blocks.*", "blocks.3", True),
        ("blocks.*", "blocks.3.attn", False),
        ("blocks.*.attn", "blocks.3.attn", True),
        ("layer*.*", "layer2.1", True),
        ("layer*.*", "layer2.1.conv1", False),
        ("**.attn", "blocks.11.attn", True),
        ("blocks.**", "blocks.1.mlp.fc1", True),
        ("blocks.1", "blocks.11", False),
    ],
)
def test_pattern_semantics(pattern: str, path: str, hit: bool) -> None:
    assert bool(pattern_regex(pattern).fullmatch(path)) is hit


component = st.text(alphabet="abc0123_", min_size=1, max_size=4)


@given(st.lists(component, min_size=1, max_size=4))
def test_single_star_stays_in_one_component(parts: list[str]) -> None:
    path = ".".join(parts)
    stars = ".".join("*" for _ in parts)
    assert pattern_regex(stars).fullmatch(path)
    assert not pattern_regex(stars).fullmatch(path + ".x")
    assert pattern_regex("**").fullmatch(path)
    assert pattern_regex(re.escape(path).replace("\\", "")).fullmatch(path)


def test_vit_presets(vit: object) -> None:
    assert expand_layers(vit, "preset:blocks") == ["norm_pre", "blocks.0", "blocks.1"]
    paper = expand_layers(vit, "preset:paper")
    for tap in ["norm1", "attn", "norm2", "mlp.act", "mlp"]:
        assert f"blocks.1.{tap}" in paper
    assert len(paper) == 1 + 2 * 6


def test_resnet_presets(resnet: object) -> None:
    blocks = expand_layers(resnet, "preset:blocks")
    assert blocks[0] == "maxpool" and blocks[1:3] == ["layer1.0", "layer1.1"] and len(blocks) == 9
    paper = expand_layers(resnet, "preset:paper")
    assert {"layer1.0.bn2", "layer2.0.downsample", "layer4.1"} <= set(paper)


def test_comma_lists_deduplicate_in_definition_order(vit: object) -> None:
    assert expand_layers(vit, "blocks.1, blocks.*,blocks.0") == ["blocks.0", "blocks.1"]


def test_no_match_lists_near_matches(vit: object) -> None:
    with pytest.raises(LayerPatternError, match=r"near matches: .*blocks\.1"):
        expand_layers(vit, "block.1")


def test_unknown_preset_and_family(vit: object) -> None:
    with pytest.raises(LayerPatternError, match="preset:blocks"):
        expand_layers(vit, "preset:nope")
    convnext = timm.create_model("convnext_atto")
    with pytest.raises(LayerPatternError, match="ViT"):
        expand_layers(convnext, "preset:paper")


def test_attention_modules(vit: object, resnet: object) -> None:
    assert attention_modules(vit) == ["blocks.0.attn", "blocks.1.attn"]
    assert attention_modules(resnet) == []


def _old_resnet_paper(model: object) -> list[str]:
    """preset:paper for ResNets as it was written before families.py (regression guard)."""
    names = ["maxpool"]
    for i in range(1, 5):
        for j, block in enumerate(getattr(model, f"layer{i}")):
            name = f"layer{i}.{j}"
            if block.downsample is not None:
                names.append(f"{name}.downsample")
            names += [f"{name}.{'bn3' if hasattr(block, 'bn3') else 'bn2'}", name]
    return names


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_paper_preset_unchanged(name: str) -> None:
    model = timm.create_model(name)
    assert set(expand_layers(model, "preset:paper")) == set(_old_resnet_paper(model))


def test_layer_scale_and_squeeze_excitation_branch_outputs() -> None:
    # With layer scale on, the branch adds ls1(attn(...)): the preset stores ls1 and the
    # roles name it as the branch output; attn stays a tap of the block.
    deit3 = timm.create_model("deit3_small_patch16_224", depth=1, img_size=32)
    paper = expand_layers(deit3, "preset:paper")
    assert {"blocks.0.attn", "blocks.0.ls1", "blocks.0.ls2", "blocks.0.mlp"} <= set(paper)
    roles = model_roles(deit3)
    assert roles["blocks.0.ls2"]["skip_input"] == ["norm_pre", "blocks.0.ls1"]
    assert roles["blocks.0.attn"]["role"] == "inner"
    se = timm.create_model("seresnet50")
    assert "layer1.0.se" in expand_layers(se, "preset:paper")
    assert model_roles(se)["layer1.0.se"]["skip_input"] == ["layer1.0.downsample"]


def test_roles_of_real_models(vit: object, resnet: object) -> None:
    roles = model_roles(vit)
    assert roles["norm_pre"] == {"role": "stream"}
    assert roles["blocks.1"]["branches"] == ["blocks.1.attn", "blocks.1.mlp"]
    assert roles["blocks.1.mlp"]["skip_input"] == ["blocks.0", "blocks.1.attn"]
    assert roles["blocks.0.norm1"] == {"role": "inner", "block": "blocks.0"}
    assert roles["head"] == {"role": "other"} and roles["blocks"] == {"role": "other"}
    roles = model_roles(resnet)
    assert roles["layer1.0.bn2"]["skip_input"] == ["maxpool"]
    assert roles["layer2.0.bn2"]["skip_input"] == ["layer2.0.downsample"]
    assert roles["layer2.0.downsample"] == {"role": "shortcut", "block": "layer2.0"}
    assert roles["layer3.0.downsample.0"] == {"role": "inner", "block": "layer3.0"}
    assert model_roles(timm.create_model("convnext_atto")) == {}


@pytest.mark.parametrize(
    ("name", "kwargs", "count"),
    [
        # The counts docs/science.md and families.py state for the paper's models.
        ("vit_base_patch16_224", {}, 1 + 12 * 7),
        ("vit_large_patch16_224", {}, 1 + 24 * 7),
        ("vit_huge_patch14_224", {}, 1 + 32 * 7),
        ("resnet50", {}, 1 + 16 * 4 + 4),
        ("resnetv2_50x1_bit", {}, 1 + 16 * 4 + 4),
        ("resnetv2_152x2_bit", {}, 1 + 50 * 4 + 4),
        # Tiny models: one block per stage; resnetv2_18's first block has no projection.
        ("vit_tiny_patch16_224", {"depth": 2, "img_size": 32}, 1 + 2 * 7),
        ("resnet50", {"layers": [1, 1, 1, 1]}, 1 + 4 * 4 + 4),
        ("resnetv2_50", {"layers": [1, 1, 1, 1]}, 1 + 4 * 4 + 4),
        ("resnetv2_18", {"layers": [1, 1, 1, 1]}, 1 + 4 * 3 + 3),
    ],
)
def test_all_preset_counts(name: str, kwargs: dict[str, object], count: int) -> None:
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    every = expand_layers(model, "preset:all")
    assert len(every) == count
    assert set(expand_layers(model, "preset:paper")) <= set(every)  # skip ratios still work


def test_all_preset_layers_of_each_family() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    assert expand_layers(vit, "preset:all") == [
        "norm_pre",
        "blocks.0",
        "blocks.0.norm1",
        "blocks.0.attn",
        "blocks.0.norm2",
        "blocks.0.mlp",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.act",
    ]
    v1 = timm.create_model("resnet50", layers=[1, 1, 1, 1])
    assert [n for n in expand_layers(v1, "preset:all") if n.startswith("layer1")] == [
        "layer1.0",
        "layer1.0.act1",
        "layer1.0.act2",
        "layer1.0.bn3",
        "layer1.0.downsample",
    ]
    v2 = timm.create_model("resnetv2_50x1_bit")
    assert [n for n in expand_layers(v2, "preset:all") if n.startswith("stages.0.blocks.0")] == [
        "stages.0.blocks.0",
        "stages.0.blocks.0.downsample",
        "stages.0.blocks.0.conv1",
        "stages.0.blocks.0.conv2",
        "stages.0.blocks.0.conv3",
    ]
    roles = model_roles(v2)
    assert roles["stages.1.blocks.0.conv3"]["skip_input"] == ["stages.1.blocks.0.downsample"]
    assert roles["stages.0.blocks.1.conv3"]["skip_input"] == ["stages.0.blocks.0"]
    assert roles["stem"] == {"role": "stream"} and roles["norm"] == {"role": "other"}
