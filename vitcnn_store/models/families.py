"""What the blocks of a model family look like, by module path alone (no torch).

The ViT, ResNet (V1, timm's ``ResNet``) and pre-activation ResNet (V2, timm's
``ResNetV2``: the BiT ResNets of the paper) families are residual networks: a
block adds the output of one or more *branches* f(z) onto its *skip path* z.
Knowing which module path is which is needed in three places — the layer
presets, the skip-ratio analysis and the default layer of localization — and
is written down here only. Everything works on a mapping ``{module path: module type name}``: the
whole model's (``{n: type(m).__name__ for n, m in model.named_modules()}``) at
extraction, or a run's stored layers (with their ``module_type`` attribute)
when reading a store written before roles were recorded.

Roles
-----
Extraction records, on every stored layer of a known family, attributes that
say what the layer is (:func:`layer_roles`):

``role``
    ``stream`` (the residual stream: the stem or input tokens, and each block's
    output), ``branch`` (a branch output f(z), before it is added), ``shortcut``
    (a projection on the skip path: ResNet ``downsample``), ``inner`` (anything
    else inside a block) or ``other`` (outside the blocks: patch embedding,
    final norm, head).
``block``
    The block path the layer belongs to (absent for the stem and ``other``).
``branches``
    On a block output: its branch outputs, in the order they are added.
``branch``, ``skip_input``
    On a branch output: the branch's name (``attn``/``mlp`` for ViT,
    ``residual`` for ResNet) and the layers whose *sum* is the representation z
    on the skip path of that branch.

ViT block ``i`` computes ``x' = x + ls1(attn(norm1(x)))`` then
``x'' = x' + ls2(mlp(norm2(x')))``: the attention branch's z is the block
input (``norm_pre`` for block 0, else ``blocks.{i-1}``), the MLP branch's z is
``x' = z + (attention branch output)``. The branch outputs are ``ls1``/``ls2``
when layer scale is on and ``attn``/``mlp`` when ``ls1``/``ls2`` are
identities (timm's default). ResNet block ``layerK.M`` adds its residual
branch (ending at ``se`` when squeeze-excitation is on, else ``bn3`` for
bottlenecks, ``bn2`` for basic blocks) onto its input, or onto the
``downsample`` of it when the block has one; timm's V1 blocks then apply a
ReLU to the sum, so a V1 block output is ReLU(z + f(z)), not z + f(z).

ResNetV2 block ``stages.S.blocks.M`` (:class:`timm.models.resnetv2.PreActBottleneck`)
computes ``p = norm1(x)`` (norm and ReLU: the pre-activation), then
``x + conv3(norm3(conv2(norm2(conv1(p)))))``, or ``downsample(p) + ...`` when the
block has a projection: z is the block input (``stem`` for the first block, else
the previous block) or ``downsample``, f(z) ends at ``conv3`` (``conv2`` for
``PreActBasic``), and the block output is exactly z + f(z), with no activation
after the sum. ResNetV2 built with ``preact=False`` (timm's hybrid-ViT
backbone, blocks of type ``Bottleneck``) ends its branch at ``norm3`` and
applies a ReLU after the sum, as V1 does (:func:`output_activation`).

Presets
-------
:func:`preset_layers`: ``blocks`` the residual stream; ``paper`` the taps the
paper's analyses need (skip ratios: each branch output and its skip input);
``all`` every layer the paper's CKA heatmaps draw — for ViT each block's
``norm1``, ``attn``, ``norm2``, ``mlp.fc1``, ``mlp.act``, ``mlp`` and output;
for ResNets the end of each conv unit inside a block (V1: ``act1``, ``act2``
after conv→BN→ReLU, and the branch output; V2: ``conv1``, ``conv2`` after
norm→ReLU→conv, and ``conv3``), each ``downsample`` and each block output; both
starting at the stem. Counts: ViT-B/16 85, ViT-L/16 169, ResNet-50 and BiT
R50x1 69 (1 + 16 blocks × 4 + 4 projections), BiT R152x2 205.

Examples
--------
>>> vit = {"norm_pre": "Identity", "blocks.0": "Block", "blocks.0.attn": "Attention",
...        "blocks.0.ls1": "Identity", "blocks.0.mlp": "Mlp", "blocks.0.ls2": "Identity"}
>>> [(b.name, b.output, b.skip_input) for b in branches(VIT, vit)]
[('attn', 'blocks.0.attn', ('norm_pre',)), ('mlp', 'blocks.0.mlp', ('norm_pre', 'blocks.0.attn'))]
>>> layer_roles(VIT, vit)["blocks.0"]
{'role': 'stream', 'block': 'blocks.0', 'branches': ['blocks.0.attn', 'blocks.0.mlp']}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BRANCH",
    "CNN_FAMILIES",
    "FAMILIES",
    "INNER",
    "OTHER",
    "PRESET_NAMES",
    "RESNET",
    "RESNETV2",
    "ROLES",
    "ROLE_ATTRS",
    "SHORTCUT",
    "STREAM",
    "VIT",
    "Branch",
    "blocks",
    "branches",
    "branches_from_roles",
    "infer_family",
    "is_block_output",
    "is_residual_stream",
    "layer_roles",
    "output_activation",
    "preset_layers",
    "stem",
    "stored_roles",
]

VIT, RESNET, RESNETV2 = "vit", "resnet", "resnetv2"
FAMILIES = (VIT, RESNET, RESNETV2)
CNN_FAMILIES = (RESNET, RESNETV2)
PRESET_NAMES = ("blocks", "paper", "all")

STREAM, BRANCH, SHORTCUT, INNER, OTHER = "stream", "branch", "shortcut", "inner", "other"
ROLES = (STREAM, BRANCH, SHORTCUT, INNER, OTHER)
ROLE_ATTRS = ("role", "block", "branches", "branch", "skip_input")  # layer attributes we write

_STEM = {VIT: "norm_pre", RESNET: "maxpool", RESNETV2: "stem"}
_BLOCK = {
    VIT: re.compile(r"blocks\.(\d+)"),
    RESNET: re.compile(r"layer(\d+)\.(\d+)"),
    RESNETV2: re.compile(r"stages\.(\d+)\.blocks\.(\d+)"),
}
_BLOCK_NAME = {RESNET: "layer{}.{}", RESNETV2: "stages.{}.blocks.{}"}
_FIRST_STAGE = {RESNET: 1, RESNETV2: 0}
# timm's ResNetV2 block types (ConvNeXt and Swin share the stages.N.blocks.M paths).
_RESNETV2_BLOCKS = ("PreActBottleneck", "PreActBasic", "Bottleneck")
# Block outputs of families without roles too (e.g. ConvNeXt/Swin ``stages.N.blocks.M``).
_ANY_BLOCK = re.compile(r"(?:.*\.)?(?:blocks|layer\d+|stages\.\d+\.blocks)\.\d+")
_IDENTITY = "Identity"


@dataclass(frozen=True)
class Branch:
    """One residual branch: its output f(z) and the layers whose sum is z."""

    block: str
    name: str
    output: str
    skip_input: tuple[str, ...]


def stem(family: str) -> str:
    """The residual stream's first tensor: ViT input tokens, ResNet stem output.

    Examples
    --------
    >>> stem(RESNET)
    'maxpool'
    """
    return _STEM[family]


def _block_key(family: str, name: str) -> tuple[str, tuple[int, ...]] | None:
    """The block ``name`` lies in (or is), with its sort key; None outside blocks."""
    m = _BLOCK[family].match(name)
    if m is None or (len(name) > m.end() and name[m.end()] != "."):
        return None
    return m.group(0), tuple(int(g) for g in m.groups())


def blocks(family: str, modules: Iterable[str]) -> list[str]:
    """Block paths of ``family`` among ``modules`` (any module inside counts), in order.

    Examples
    --------
    >>> blocks(RESNET, ["layer2.0.bn2", "layer1.1", "layer1.0", "fc"])
    ['layer1.0', 'layer1.1', 'layer2.0']
    """
    found = {k for name in modules if (k := _block_key(family, name)) is not None}
    return [name for name, _ in sorted(found, key=lambda k: k[1])]


def _branch_output(block: str, scale: str, inner: str, modules: Mapping[str, str]) -> str:
    """ViT branch output: the layer-scale module unless it is an identity."""
    scaled, plain = f"{block}.{scale}", f"{block}.{inner}"
    if scaled in modules and modules[scaled] not in (_IDENTITY, ""):
        return scaled
    if plain in modules or scaled not in modules:
        return plain
    return scaled  # an identity layer scale stored instead of its input: same values


def _cnn_branch_end(family: str, block: str, modules: Mapping[str, str]) -> str:
    """The last module of a ResNet block's residual branch (by module type, else by name)."""
    kind = modules.get(block, "")
    if family == RESNETV2:
        if kind == "Bottleneck":  # preact=False: conv → norm, the ReLU after the sum
            return f"{block}.norm3"
        if kind == "PreActBasic" or (
            not kind and f"{block}.conv3" not in modules and f"{block}.conv2" in modules
        ):
            return f"{block}.conv2"
        return f"{block}.conv3"
    if f"{block}.se" in modules:
        return f"{block}.se"
    if f"{block}.bn3" in modules or kind == "Bottleneck":
        return f"{block}.bn3"
    return f"{block}.bn2"


def _cnn_inner_units(family: str, block: str, modules: Mapping[str, str]) -> list[str]:
    """Where each conv unit of a ResNet block ends, before the branch's last unit."""
    kind = modules.get(block, "")
    three = f"{block}.conv3" in modules or kind in ("Bottleneck", "PreActBottleneck")
    units = (1, 2) if three else (1,)
    if family == RESNETV2 and kind != "Bottleneck":
        return [f"{block}.conv{i}" for i in units]  # norm → ReLU → conv
    if family == RESNETV2:
        return [f"{block}.norm{i}" for i in units]  # conv → norm+ReLU (preact=False)
    return [f"{block}.act{i}" for i in units]  # conv → BN → ReLU


def output_activation(family: str | None, block_type: str = "") -> str:
    """What a block applies to z + f(z): ``"relu"`` for timm's ResNet V1 blocks (and
    ResNetV2 ``Bottleneck``, ``preact=False``), ``""`` for ViT and pre-activation blocks.

    Examples
    --------
    >>> output_activation(RESNET), output_activation(RESNETV2, "PreActBottleneck")
    ('relu', '')
    """
    if family == RESNET or (family == RESNETV2 and block_type == "Bottleneck"):
        return "relu"
    return ""


def branches(family: str, modules: Mapping[str, str]) -> list[Branch]:
    """Every residual branch of ``family``'s blocks found in ``modules``, in forward order.

    Examples
    --------
    >>> r = {"maxpool": "MaxPool2d", "layer1.0": "BasicBlock", "layer2.0": "BasicBlock",
    ...      "layer2.0.downsample": "Sequential"}
    >>> [(b.output, b.skip_input) for b in branches(RESNET, r)]
    [('layer1.0.bn2', ('maxpool',)), ('layer2.0.bn2', ('layer2.0.downsample',))]
    """
    names = blocks(family, modules)
    out: list[Branch] = []
    if family == VIT:
        for i, block in enumerate(names):
            z = stem(VIT) if i == 0 else names[i - 1]
            attn = _branch_output(block, "ls1", "attn", modules)
            mlp = _branch_output(block, "ls2", "mlp", modules)
            out += [Branch(block, "attn", attn, (z,)), Branch(block, "mlp", mlp, (z, attn))]
    elif family in CNN_FAMILIES:
        keys = {name: _block_key(family, name)[1] for name in names}  # type: ignore[index]
        for block in names:
            stage, index = keys[block]
            if f"{block}.downsample" in modules:
                z = f"{block}.downsample"
            elif index > 0:
                z = _BLOCK_NAME[family].format(stage, index - 1)
            elif stage == _FIRST_STAGE[family]:
                z = stem(family)
            else:  # a stage's first block takes the previous stage's last block
                before = [j for s, j in keys.values() if s == stage - 1]
                z = _BLOCK_NAME[family].format(stage - 1, max(before) if before else 0)
            end = _cnn_branch_end(family, block, modules)
            out.append(Branch(block, "residual", end, (z,)))
    return out


def layer_roles(family: str | None, modules: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Role attributes (see the module docstring) of every module; empty for other families.

    The one rule for roles: :func:`vitcnn_store.models.layers.model_roles` applies it to a
    torch model at extraction, :func:`stored_roles` to the stored layers of an older run.

    Examples
    --------
    >>> roles = layer_roles(RESNET, {"maxpool": "", "layer1.0": "BasicBlock",
    ...                              "layer1.0.bn2": "", "layer1.0.conv1": "", "fc": ""})
    >>> roles["layer1.0.bn2"]["skip_input"], roles["layer1.0.conv1"], roles["fc"]
    (['maxpool'], {'role': 'inner', 'block': 'layer1.0'}, {'role': 'other'})
    """
    if family not in FAMILIES:
        return {}
    roles: dict[str, dict[str, Any]] = {}
    for name in modules:
        key = _block_key(family, name)
        roles[name] = {"role": OTHER} if key is None else {"role": INNER, "block": key[0]}
    roles[stem(family)] = {"role": STREAM}
    found = branches(family, modules)
    for block in blocks(family, modules):
        outputs = [b.output for b in found if b.block == block]
        roles[block] = {"role": STREAM, "block": block, "branches": outputs}
        if family in CNN_FAMILIES and f"{block}.downsample" in modules:
            roles[f"{block}.downsample"] = {"role": SHORTCUT, "block": block}
    for b in found:
        roles[b.output] = {
            "role": BRANCH,
            "block": b.block,
            "branch": b.name,
            "skip_input": list(b.skip_input),
        }
    return {name: attrs for name, attrs in roles.items() if name in modules}


def infer_family(names: Iterable[str], types: Mapping[str, str] | None = None) -> str | None:
    """The family whose block names appear among ``names`` (stores without roles).

    ResNetV2 shares its block paths (``stages.N.blocks.M``) with ConvNeXt and
    Swin, so it is inferred only from ``types`` (module type names) that say so.

    Examples
    --------
    >>> infer_family(["norm_pre", "blocks.0"]), infer_family(["stem", "stages.0.blocks.0"])
    ('vit', None)
    >>> infer_family(["stages.0.blocks.0"], {"stages.0.blocks.0": "PreActBottleneck"})
    'resnetv2'
    """
    names = list(names)
    for family in (VIT, RESNET):
        if blocks(family, names):
            return family
    types = types or {}
    if any(types.get(b) in _RESNETV2_BLOCKS for b in blocks(RESNETV2, names)):
        return RESNETV2
    return None


def stored_roles(
    family: str | None, layers: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Role attributes of stored layers: as recorded, else derived from their names.

    ``layers`` maps each stored layer to its attributes. A store written before
    roles were recorded gets them from the name rules over the stored layers
    (and their ``module_type``), ``family`` inferred from the names when None.

    Examples
    --------
    >>> stored_roles(None, {"norm_pre": {}, "blocks.0.attn": {}, "blocks.0": {}})["blocks.0"]
    {'role': 'stream', 'block': 'blocks.0', 'branches': ['blocks.0.attn', 'blocks.0.mlp']}
    """
    if all("role" in attrs for attrs in layers.values()):
        return {name: dict(attrs) for name, attrs in layers.items()}
    types = {name: str(attrs.get("module_type", "")) for name, attrs in layers.items()}
    family = family if family in FAMILIES else infer_family(layers, types)
    derived = layer_roles(family, types)
    return {
        name: dict(attrs) if "role" in attrs else {**attrs, **derived.get(name, {})}
        for name, attrs in layers.items()
    }


def branches_from_roles(roles: Mapping[str, Mapping[str, Any]]) -> tuple[list[Branch], list[str]]:
    """The branches described by stored role attributes, and the branch outputs not stored.

    A block's branches are those its stored output lists, or else those stored
    branch outputs name as theirs. Branches come in forward order.

    Examples
    --------
    >>> roles = {"blocks.0": {"role": "stream", "block": "blocks.0",
    ...                       "branches": ["blocks.0.attn", "blocks.0.mlp"]},
    ...          "blocks.0.mlp": {"role": "branch", "block": "blocks.0", "branch": "mlp",
    ...                           "skip_input": ["norm_pre", "blocks.0.attn"]}}
    >>> found, missing = branches_from_roles(roles)
    >>> [b.output for b in found], missing
    (['blocks.0.mlp'], ['blocks.0.attn'])
    """
    expected: dict[str, list[str]] = {}
    for name, attrs in roles.items():
        block = attrs.get("block")
        if attrs.get("role") == STREAM and block:
            expected.setdefault(str(block), [])
            expected[str(block)] += [str(o) for o in attrs.get("branches", [])]
        elif attrs.get("role") == BRANCH and block:
            expected.setdefault(str(block), [])
            if name not in expected[str(block)]:
                expected[str(block)].append(name)
    found, missing = [], []
    for block, outputs in expected.items():
        for output in dict.fromkeys(outputs):
            branch = roles.get(output, {})
            if branch.get("role") != BRANCH:
                missing.append(output)
                continue
            skip = tuple(str(s) for s in branch.get("skip_input", []))
            found.append(Branch(block, str(branch.get("branch", "")), output, skip))
    return found, missing


def is_block_output(name: str, attrs: Mapping[str, Any] | None = None) -> bool:
    """Whether a layer is a block's output: by its role, else by the name rules.

    Examples
    --------
    >>> is_block_output("stages.2.blocks.5"), is_block_output("blocks.3.attn")
    (True, False)
    """
    if attrs is not None and "role" in attrs:
        return attrs["role"] == STREAM and "block" in attrs
    return bool(_ANY_BLOCK.fullmatch(name))


def is_residual_stream(name: str, attrs: Mapping[str, Any] | None = None) -> bool:
    """Whether a layer is on the residual stream (stem or block output), not a branch.

    Examples
    --------
    >>> is_residual_stream("norm_pre"), is_residual_stream("blocks.0.mlp")
    (True, False)
    """
    if attrs is not None and "role" in attrs:
        return bool(attrs["role"] == STREAM)
    return name in _STEM.values() or is_block_output(name)


def preset_layers(family: str, modules: Mapping[str, str], preset: str) -> list[str]:
    """Module paths of a preset: ``blocks``, ``paper`` or ``all`` (module docstring).

    ``paper``: for ViT, each block's ``norm1``, attention, ``norm2``, MLP hidden
    activation, MLP and output (and the layer-scale outputs when layer scale is
    on); for ResNets, each block's branch output and output, with its
    ``downsample`` when it has one. ``all`` adds, for ViT, ``mlp.fc1`` (the MLP
    hidden layer before its activation) and, for ResNets, the end of every conv
    unit inside a block. All start at the stem; the order is the blocks' order.

    Examples
    --------
    >>> preset_layers(VIT, {"norm_pre": "", "blocks.0": "Block"}, "blocks")
    ['norm_pre', 'blocks.0']
    >>> v2 = {"stem": "", "stages.0.blocks.0": "PreActBasic",
    ...       "stages.0.blocks.0.conv1": "", "stages.0.blocks.0.conv2": ""}
    >>> preset_layers(RESNETV2, v2, "all")
    ['stem', 'stages.0.blocks.0.conv1', 'stages.0.blocks.0.conv2', 'stages.0.blocks.0']
    """
    names = blocks(family, modules)
    out = [stem(family)]
    if preset == "blocks":
        return out + names
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}: {', '.join(PRESET_NAMES)}")
    every = preset == "all"
    found = {(b.block, b.name): b.output for b in branches(family, modules)}
    for block in names:
        if family == VIT:
            hidden = [f"{block}.mlp.fc1"] if every and f"{block}.mlp.fc1" in modules else []
            taps = [
                f"{block}.norm1",
                f"{block}.attn",
                found[block, "attn"],
                f"{block}.norm2",
                *hidden,
                f"{block}.mlp.act",
                f"{block}.mlp",
                found[block, "mlp"],
            ]
        else:
            units = [u for u in _cnn_inner_units(family, block, modules) if u in modules]
            units = units if every else []
            shortcut = [f"{block}.downsample"] if f"{block}.downsample" in modules else []
            taps = [*units, *shortcut, found[block, "residual"]]
        out += [*dict.fromkeys(taps), block]
    return out
