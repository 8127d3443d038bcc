"""The run's template: build the model once, read the image set, describe every array.

A dry-run forward pass on one real image gives every array's shape and
coordinates; the model's weights hash, the preprocessing and the images'
content hashes make the provenance. Nothing here writes to the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.worker import ExtractionPlan
from vitcnn_store._version import FORMAT_VERSION, __version__
from vitcnn_store.capture import Capture, LayerLayout
from vitcnn_store.data import ImageSet, image_set_sha256, open_image_set
from vitcnn_store.errors import LayerPatternError
from vitcnn_store.models import (
    attention_modules,
    build_model,
    data_config,
    expand_layers,
    layer_roles,
    match_patterns,
    model_family,
    pretrained_hub_id,
    weights_sha256,
)
from vitcnn_store.store import ArraySpec
from vitcnn_store.store.writer import check_peaks

if TYPE_CHECKING:
    from jobs.extract import ExtractConfig

__all__ = ["RunTemplate", "array_specs", "plan_extraction"]


@dataclass(frozen=True)
class RunTemplate:
    """What the driver derives once: the workers' plan and everything the run records.

    ``image_sha256`` stays on the driver (it can be large); the plan travels to
    every worker.
    """

    plan: ExtractionPlan
    provenance: dict[str, Any]
    specs: list[ArraySpec]
    image_sha256: list[str]


def _select_attention(model: Any, cfg: ExtractConfig) -> list[str]:
    if not cfg.attention:
        return []
    available = attention_modules(model)
    if not available:
        raise LayerPatternError(f"--attention: {type(model).__name__} has no attention modules")
    if not cfg.attention_layers:
        return available
    return match_patterns(available, cfg.attention_layers, "attention module (--attention-layers)")


def _attention_coords(lay: LayerLayout) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """Token coordinates of an attention map, once along ``query`` and once along ``key``."""
    out: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    for axis in ("query", "key"):
        for name, values in lay.coords.items():
            out[f"{axis}_{name.removeprefix('token_')}"] = ((axis,), values)
    return out


def array_specs(
    layouts: dict[str, LayerLayout], dcfg: dict[str, Any], inputs: bool,
    roles: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[ArraySpec]:  # fmt: skip
    """Every array of the run, in forward order, with its group's attributes."""
    # Group order = forward order; depth_fraction is the paper's normalised layer number.
    groups: dict[str, int] = {}
    for key, _ in sorted(layouts.items(), key=lambda kv: kv[1].depth_index):
        groups.setdefault(key.split("/")[0], len(groups))
    denom = max(len(groups) - 1, 1)
    has_activation = {k.split("/")[0] for k, lay in layouts.items() if lay.kind != "attention"}
    specs = []
    for key, lay in layouts.items():
        group = key.split("/")[0]
        attrs: dict[str, Any] = {
            "depth_index": groups[group],
            "depth_fraction": groups[group] / denom,
            "module_type": lay.module_type,
            **(roles or {}).get(group, {}),  # role, block, branches / skip_input (families.py)
        }
        if lay.kind != "attention":
            attrs["kind"] = lay.kind
            coords = {
                name: ((name,) if name in lay.dims else ("token",), v)
                for name, v in lay.coords.items()
            }
            specs.append(ArraySpec(group, "activation", lay.dims, lay.shape, coords, attrs))
        else:
            if group not in has_activation:
                attrs["kind"] = "attention"  # a group holding only attention still needs a kind
            specs.append(
                ArraySpec(group, "attention", lay.dims, lay.shape, _attention_coords(lay), attrs)
            )
    if inputs:
        _, h, w = dcfg["input_size"]
        specs.append(
            ArraySpec("", "input", ("input_y", "input_x", "rgb"), (h, w, 3), {
                "input_y": (("input_y",), (np.arange(h) + 0.5).astype(np.float32)),
                "input_x": (("input_x",), (np.arange(w) + 0.5).astype(np.float32)),
            })
        )  # fmt: skip
    return specs


def _provenance(
    cfg: ExtractConfig, sha: str, dcfg: dict[str, Any], images: ImageSet, hashes: list[str],
    family: str | None, layers: list[str], attention: list[str],
) -> dict[str, Any]:  # fmt: skip
    import timm
    import torch

    spec = cfg.model
    return {
        "model": spec.name,
        "model_family": family,
        "model_args": dict(spec.model_args),
        "img_size": spec.img_size,
        "weights_source": spec.weights_source,
        "weights_seed": spec.seed if spec.weights_source == "random-init" else None,
        "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
        "weights_sha256": sha,
        **dcfg,
        "input_normalized": True,
        "image_set": images.spec,
        "image_set_sha256": image_set_sha256(images, hashes),
        "n_images": len(images),
        "label_names": list(images.label_names),
        "layers": layers,
        "attention_layers": attention,
        "inputs": cfg.inputs,
        "dtype": cfg.dtype,
        "compression": cfg.compression,
        "chunk_size": cfg.chunk_size,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "code_version": __version__,
        "format": FORMAT_VERSION,
        **dict(cfg.extra_attrs),
    }


def _resolve_device(cfg: ExtractConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if cfg.gpus_per_worker > 0 else "cpu"


def _first_image(images: ImageSet, dcfg: dict[str, Any]) -> Any:
    """The first decodable image, preprocessed, as a batch of one (zeros if none decode)."""
    import torch

    from vitcnn_store.errors import ImageDecodeError
    from vitcnn_store.models import make_transform

    transform = make_transform(dcfg)
    for i in range(min(len(images), 8)):
        try:
            return transform(images.load(i)).unsqueeze(0)
        except ImageDecodeError:
            continue
    return torch.zeros(1, *dcfg["input_size"])


def plan_extraction(cfg: ExtractConfig) -> RunTemplate:
    """Build the model once and derive the run's template and the workers' plan."""
    import torch

    cfg.validate()
    images = open_image_set(cfg.images, limit=cfg.limit)
    model = build_model(cfg.model)
    layers = expand_layers(model, cfg.layers)
    attention = _select_attention(model, cfg)
    dcfg = data_config(model, cfg.model.img_size)
    with Capture(model, layers, attention) as cap:
        # The template comes from a real image, so weights that overflow float16 or
        # give NaN are refused here, before anything is written.
        x = _first_image(images, dcfg)
        acts, attn = cap(x)
        check_peaks(((k, float(v.abs().max())) for k, v in {**acts, **attn}.items()), cfg.dtype)
        layouts = cap.describe(x)
    layers = sorted(layers, key=lambda n: layouts[n].depth_index)
    sha = weights_sha256(model)
    is_cnn = not attention_modules(model) and any(
        isinstance(m, torch.nn.Conv2d) for m in model.modules()
    )
    hashes = images.content_hashes(progress=cfg.progress)
    provenance = _provenance(cfg, sha, dcfg, images, hashes, model_family(model), layers, attention)
    # Where timm's pretrained weights came from (their hash is weights_sha256).
    provenance["weights_hub_id"] = pretrained_hub_id(model) if cfg.model.pretrained else None
    plan = ExtractionPlan(
        model=cfg.model,
        weights_sha256=sha,
        data_config=dcfg,
        images=images,
        url=cfg.store,
        run=cfg.run,
        layers=tuple(layers),
        attention_layers=tuple(attention),
        inputs=cfg.inputs,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size or cfg.chunk_size,
        device=_resolve_device(cfg),
        autocast=cfg.autocast,
        threads=max(1, int(cfg.cpus_per_worker)),
        channels_last=is_cnn,
    )
    specs = array_specs(layouts, dcfg, cfg.inputs, layer_roles(model))
    return RunTemplate(plan, provenance, specs, hashes)


def with_threads(template: RunTemplate, threads: int) -> RunTemplate:
    """The same template with another torch thread count for the workers (benchmarks)."""
    return replace(template, plan=replace(template.plan, threads=threads))
