"""Layer names: glob patterns over ``model.named_modules()`` paths and presets.

A pattern is matched against whole module paths: ``*`` matches within one path
component, ``**`` across components (``blocks.*`` is each block, ``blocks.*.attn``
each attention module, ``layer*.*`` each ResNet bottleneck, ``**.attn`` every
module named ``attn``). Presets name the residual stream (``preset:blocks``),
the taps of the paper's analyses (``preset:paper``) and every layer of the
paper's CKA heatmaps (``preset:all``) for the ViT, ResNet and ResNetV2 (BiT)
families, whose block structure is written down in
:mod:`vitcnn_store.models.families`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from vitcnn_store.errors import LayerPatternError
from vitcnn_store.models import families

if TYPE_CHECKING:
    import torch

__all__ = [
    "PRESETS",
    "attention_modules",
    "expand_layers",
    "match_patterns",
    "model_family",
    "model_roles",
    "module_names",
    "module_types",
    "pattern_regex",
]

PRESETS = tuple(f"preset:{name}" for name in families.PRESET_NAMES)


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Compile a layer pattern to a regex over full module paths.

    Examples
    --------
    >>> bool(pattern_regex("blocks.*").fullmatch("blocks.3"))
    True
    >>> bool(pattern_regex("blocks.*").fullmatch("blocks.3.attn"))
    False
    >>> bool(pattern_regex("**.attn").fullmatch("blocks.3.attn"))
    True
    """
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(
        ".*" if p == "**" else "[^.]*" if p == "*" else re.escape(p) for p in parts if p
    )
    return re.compile(regex)


def match_patterns(names: Sequence[str], patterns: str, what: str) -> list[str]:
    """The ``names`` matching comma-separated ``patterns``, in the order of ``names``.

    A pattern matching nothing raises :class:`LayerPatternError` naming ``what``
    was searched and listing the first candidates.

    Examples
    --------
    >>> match_patterns(["blocks.0.attn", "blocks.1.attn"], "blocks.1.*", "attention module")
    ['blocks.1.attn']
    """
    chosen: set[str] = set()
    for pattern in _split(patterns):
        regex = pattern_regex(pattern)
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
            raise LayerPatternError(f"{pattern!r} matches no {what} (they are: {shown})")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def module_names(model: torch.nn.Module) -> list[str]:
    """Every capturable module path, in definition order (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def model_family(model: torch.nn.Module) -> str | None:
    """``"vit"``, ``"resnet"`` (V1) or ``"resnetv2"`` (pre-activation, BiT) for the
    families with presets, else ``None``."""
    from timm.models.resnet import ResNet
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return families.VIT
    if isinstance(model, ResNet):
        return families.RESNET
    if isinstance(model, ResNetV2):
        return families.RESNETV2
    return None


def attention_modules(model: torch.nn.Module) -> list[str]:
    """Paths of the attention modules whose softmax probabilities can be captured.

    These are timm's attention modules: they have a ``fused_attn`` switch and
    apply ``attn_drop`` to the softmax output on the unfused path.
    """
    return [
        name
        for name, m in model.named_modules()
        if name and hasattr(m, "fused_attn") and hasattr(m, "attn_drop") and hasattr(m, "qkv")
    ]


def module_types(model: torch.nn.Module) -> dict[str, str]:
    """``{module path: type name}`` of every module: what :mod:`.families` reads."""
    return {name: type(m).__name__ for name, m in model.named_modules() if name}


def model_roles(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Role attributes (stream/branch/shortcut/inner/other, block, skip inputs) of every
    module of a ViT, ResNet or ResNetV2, recorded on the stored layers; empty for other
    families.

    The rule is :func:`vitcnn_store.models.families.layer_roles`; this only reads its
    inputs (family and module types) off the torch model.
    """
    return families.layer_roles(model_family(model), module_types(model))


def _preset(model: torch.nn.Module, preset: str) -> list[str]:
    family = model_family(model)
    if family is None:
        raise LayerPatternError(
            f"{preset} is defined for the ViT (vit_*, deit_*), ResNet (resnet*) and ResNetV2 "
            f"(resnetv2_*, BiT) families, "
            f"not {type(model).__name__}; give module path patterns instead "
            "(see `vitcnn layers`)"
        )
    return families.preset_layers(family, module_types(model), preset.removeprefix("preset:"))


def _split(patterns: str | Iterable[str]) -> list[str]:
    items = patterns.split(",") if isinstance(patterns, str) else list(patterns)
    out = [p.strip() for p in items if p.strip()]
    if not out:
        raise LayerPatternError("no layer patterns given")
    return out


def expand_layers(model: torch.nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Resolve comma-separated patterns and presets to module paths.

    The result keeps definition order and has no duplicates. A pattern that
    matches nothing raises :class:`LayerPatternError` listing near matches.

    Examples
    --------
    >>> import timm
    >>> m = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32)
    >>> expand_layers(m, "blocks.*")
    ['blocks.0', 'blocks.1']
    """
    names = module_names(model)
    chosen: set[str] = set()
    for pattern in _split(patterns):
        if pattern.startswith("preset:"):
            if pattern not in PRESETS:
                raise LayerPatternError(
                    f"unknown preset {pattern!r}; known presets: {', '.join(PRESETS)}"
                )
            chosen.update(_preset(model, pattern))
            continue
        regex = pattern_regex(pattern)
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            near = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            hint = f"; near matches: {', '.join(near)}" if near else ""
            raise LayerPatternError(
                f"layer pattern {pattern!r} matches no module of {type(model).__name__}{hint}"
                " (list them with `vitcnn layers MODEL`)"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]
