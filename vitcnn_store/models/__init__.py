"""Models: build timm models by name and name their layers."""

from vitcnn_store.models.factory import (
    ModelSpec,
    build_model,
    data_config,
    make_transform,
    weights_sha256,
)
from vitcnn_store.models.layers import (
    PRESETS,
    attention_modules,
    expand_layers,
    match_patterns,
    model_family,
    module_names,
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
    "module_names",
    "pattern_regex",
    "weights_sha256",
]
