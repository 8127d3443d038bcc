"""Model-family knowledge: block structure, roles, and their fallback for older stores."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm

from vitcnn_store.models import families, module_types
from vitcnn_store.models.families import (
    BRANCH,
    STREAM,
    Branch,
    branches,
    branches_from_roles,
    is_block_output,
    is_residual_stream,
    layer_roles,
    stored_roles,
)


def test_family_module_never_imports_torch() -> None:
    code = (
        "import sys; from vitcnn_store.models import families; "
        "print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_vit_branches_chain_the_residual_stream() -> None:
    modules = {"norm_pre": "Identity"}
    for i in range(3):
        modules |= {
            f"blocks.{i}": "Block",
            f"blocks.{i}.attn": "Attention",
            f"blocks.{i}.mlp": "Mlp",
            f"blocks.{i}.ls1": "Identity",
        }
    found = branches("vit", modules)
    assert found[2] == Branch("blocks.1", "attn", "blocks.1.attn", ("blocks.0",))
    assert found[5] == Branch("blocks.2", "mlp", "blocks.2.mlp", ("blocks.1", "blocks.2.attn"))
    scaled = {**modules, "blocks.0.ls1": "LayerScale"}
    assert branches("vit", scaled)[0].output == "blocks.0.ls1"


def test_resnet_first_block_of_a_stage_takes_the_previous_stage() -> None:
    modules = {
        "maxpool": "",
        "layer1.0": "Bottleneck",
        "layer1.1": "Bottleneck",
        "layer2.0": "Bottleneck",
        "layer2.0.bn3": "",
    }
    found = {b.block: b for b in branches("resnet", modules)}
    assert found["layer1.1"].skip_input == ("layer1.0",)
    assert found["layer2.0"].skip_input == ("layer1.1",)  # no downsample stored
    assert found["layer1.0"].output == "layer1.0.bn3"  # a bottleneck, by its module type


@pytest.mark.parametrize(
    ("model", "family", "kwargs"),
    [
        ("vit_tiny_patch16_224", "vit", {"depth": 3, "img_size": 32}),
        ("deit3_small_patch16_224", "vit", {"depth": 2, "img_size": 32}),
        ("resnet18", "resnet", {}),
        ("resnet50", "resnet", {}),
        ("resnetv2_50", "resnetv2", {"layers": [1, 1, 1, 1]}),
        ("resnetv2_18", "resnetv2", {"layers": [1, 2, 1, 1]}),
    ],
)
def test_old_store_fallback_equals_recorded_roles(
    model: str, family: str, kwargs: dict[str, object]
) -> None:
    """A preset:paper run read without role attributes finds the same branches."""
    from vitcnn_store.models import expand_layers, model_roles

    m = timm.create_model(model, **kwargs)
    types = module_types(m)
    stored = expand_layers(m, "preset:paper")
    recorded = model_roles(m)
    new_store = {n: {"module_type": types[n], **recorded[n]} for n in stored}
    old_store = {n: {"module_type": types[n]} for n in stored}
    new, new_missing = branches_from_roles(stored_roles(family, new_store))
    old, old_missing = branches_from_roles(stored_roles(None, old_store))
    assert new == old and new_missing == old_missing == []
    per_block = 2 if family == "vit" else 1
    assert len(new) == per_block * len(families.blocks(family, types))


def test_missing_branch_outputs_are_named() -> None:
    stored = {"norm_pre": {}, "blocks.0": {}, "blocks.0.mlp": {}, "blocks.1": {}}
    found, missing = branches_from_roles(stored_roles("vit", stored))
    assert [b.output for b in found] == ["blocks.0.mlp"]
    assert missing == ["blocks.0.attn", "blocks.1.attn", "blocks.1.mlp"]


def test_roles_tell_stream_from_branch() -> None:
    roles = layer_roles(
        "vit", {"norm_pre": "", "blocks.0": "", "blocks.0.attn": "", "blocks.0.mlp": "", "norm": ""}
    )
    assert [n for n, a in roles.items() if is_residual_stream(n, a)] == ["norm_pre", "blocks.0"]
    assert roles["blocks.0.attn"]["role"] == BRANCH and roles["blocks.0"]["role"] == STREAM
    assert [n for n, a in roles.items() if is_block_output(n, a)] == ["blocks.0"]
    # Without roles (other families, older stores) the name rules decide.
    assert is_block_output("stages.1.blocks.0") and not is_block_output("stages.1.downsample")
    assert is_residual_stream("maxpool") and not is_residual_stream("layer1.0.bn3")


def test_presets_of_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        families.preset_layers("vit", {"blocks.0": ""}, "everything")


def test_resnetv2_first_block_takes_the_stem_and_branches_end_at_the_last_conv() -> None:
    modules = {
        "stem": "Sequential",
        "stages.0.blocks.0": "PreActBasic",
        "stages.0.blocks.1": "PreActBasic",
        "stages.1.blocks.0": "PreActBottleneck",
        "stages.1.blocks.0.downsample": "DownsampleConv",
        "stages.2.blocks.0": "Bottleneck",
    }
    found = {b.block: b for b in branches("resnetv2", modules)}
    assert found["stages.0.blocks.0"].skip_input == ("stem",)
    assert found["stages.0.blocks.1"].skip_input == ("stages.0.blocks.0",)
    assert found["stages.1.blocks.0"].skip_input == ("stages.1.blocks.0.downsample",)
    assert found["stages.2.blocks.0"].skip_input == ("stages.1.blocks.0",)
    assert [found[b].output.rsplit(".", 1)[1] for b in found] == [
        "conv2",
        "conv2",
        "conv3",
        "norm3",
    ]
    assert families.output_activation("resnetv2", "PreActBottleneck") == ""
    assert families.output_activation("resnetv2", "Bottleneck") == "relu"
    assert families.output_activation("resnet", "BasicBlock") == "relu"


def test_resnetv2_is_inferred_from_module_types_only() -> None:
    """ConvNeXt and Swin share the stages.N.blocks.M paths: names alone say nothing."""
    names = ["stem", "stages.0.blocks.0"]
    assert families.infer_family(names) is None
    assert families.infer_family(names, {"stages.0.blocks.0": "ConvNeXtBlock"}) is None
    assert families.infer_family(names, {"stages.0.blocks.0": "PreActBottleneck"}) == "resnetv2"
