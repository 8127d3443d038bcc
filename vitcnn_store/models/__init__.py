"""Models: build timm models by name, name their layers, know their families' blocks."""

from vitcnn_store.models.factory import (
    ModelSpec,
    build_model,
    data_config,
    make_transform,
    pretrained_hub_id,
    weights_sha256,
)
from vitcnn_store.models.layers import (
    PRESETS,
    attention_modules,
    expand_layers,
    match_patterns,
    model_family,
    model_roles,
    module_names,
    module_types,
    pattern_regex,
)

__all__ = [
    "PRESETS",
    "ModelSpec",
    "attention_modules",
    "build_model",
    "data_config",
    "expand_layers",
    "make_transform",
    "match_patterns",
    "model_family",
    "model_roles",
    "module_names",
    "module_types",
    "pattern_regex",
    "pretrained_hub_id",
    "weights_sha256",
]
