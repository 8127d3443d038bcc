"""The run's template: get the model once, read the image set, describe every array.

A dry-run forward pass on one real image gives every array's shape and
coordinates (and refuses weights that overflow float16 or give NaN before
anything is written); the model's weights hash, the preprocessing and the
images' content hashes make the provenance. The model is a timm name
(:class:`~vitcnn_store.models.ModelSpec`, built here once) or any
``torch.nn.Module`` handed in from Python; either way the driver keeps the one
module it hashed and the workers run that module. Nothing here writes to the
store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.sizing import JobShape, shape_job
from jobs.worker import ExtractionPlan
from vitcnn_store._version import FORMAT_VERSION, __version__
from vitcnn_store.data import ImageSet, image_set_sha256, open_image_set
from vitcnn_store.errors import LayerPatternError, ModelError, UsageError, VitcnnError
from vitcnn_store.models import (
    ModelSpec,
    attention_modules,
    build_model,
    data_config,
    expand_layers,
    match_patterns,
    model_family,
    model_roles,
    pretrained_hub_id,
    weights_sha256,
)
from vitcnn_store.models.capture import Capture, LayerLayout
from vitcnn_store.models.fingerprint import callable_fingerprint, module_sha256
from vitcnn_store.models.reduce import (
    ResolvedReduction,
    assign_reductions,
    reduced_attrs,
    resolve_reduction,
)
from vitcnn_store.store import ArraySpec
from vitcnn_store.store.layout import check_layer_name
from vitcnn_store.store.writer import check_peaks

if TYPE_CHECKING:
    import torch

    from jobs.config import ExtractConfig

__all__ = ["RunTemplate", "array_specs", "plan_extraction"]


@dataclass(frozen=True)
class RunTemplate:
    """What the driver derives once: the workers' plan, the model and what the run records.

    ``image_sha256`` stays on the driver (it can be large); the plan and the
    model travel to every worker.
    """

    plan: ExtractionPlan
    provenance: dict[str, Any]
    specs: list[ArraySpec]
    image_sha256: list[str]
    #: Images per chunk (= work unit): the option, capped at the number of images.
    chunk_size: int
    model: Any = None  # the driver's torch.nn.Module (hashed: weights_sha256)
    #: Seconds of each step of planning (model, template, weights hash, image hashes).
    timings: dict[str, float] = field(default_factory=dict)


def _select_attention(model: Any, cfg: ExtractConfig) -> list[str]:
    if not cfg.attention:
        return []
    available = attention_modules(model)
    if not available:
        raise LayerPatternError(
            f"--attention: {type(model).__name__} has no attention module that exposes its "
            "probabilities the way timm's do (a `fused_attn` switch, `qkv` and an `attn_drop` "
            "applied to the softmax); leave --attention out"
        )
    if not cfg.attention_layers:
        return available
    return match_patterns(available, cfg.attention_layers, "attention module (--attention-layers)")


def _head_layers(model: Any, cfg: ExtractConfig) -> dict[str, dict[str, Any]]:
    """``--attention-heads``: per attention module, the layer holding its heads' outputs
    and the attributes that say how to split it into heads.

    In timm's attention ``x = (softmax(q kᵀ) v)`` is transposed to (token, head, d),
    flattened to channels and passed through ``norm`` (an identity unless
    ``scale_norm``) before ``proj``: the output of ``<module>.norm`` is every head's
    context vector, channel ``h · head_dim + d``. A module whose ``norm`` is not an
    identity mixes the heads there and is refused.
    """
    import torch

    if not cfg.attention_heads:
        return {}
    available = attention_modules(model)
    if cfg.attention_layers:
        available = match_patterns(
            available, cfg.attention_layers, "attention module (--attention-layers)"
        )
    modules = dict(model.named_modules())
    out: dict[str, dict[str, Any]] = {}
    for name in available:
        module = modules[name]
        norm = getattr(module, "norm", None)
        heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
        if not isinstance(norm, torch.nn.Identity) or not heads or not head_dim:
            raise LayerPatternError(
                f"--attention-heads: {name!r} ({type(module).__name__}) has no identity "
                "`norm` before its output projection (scale_norm mixes the heads) or does not "
                "say its num_heads/head_dim; leave --attention-heads out"
            )
        out[f"{name}.norm"] = {
            "head_output_of": name,
            "heads": int(heads),
            "head_dim": int(head_dim),
            "channel_layout": "head * head_dim + d (per-head context vectors before proj)",
        }
    if not out:
        raise LayerPatternError(
            f"--attention-heads: {type(model).__name__} has no timm attention module"
        )
    return out


def _attention_coords(lay: LayerLayout) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """Token coordinates of an attention map, once along ``query`` and once along ``key``."""
    out: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    for axis in ("query", "key"):
        for name, values in lay.coords.items():
            out[f"{axis}_{name.removeprefix('token_')}"] = ((axis,), values)
    return out


def array_specs(
    layouts: dict[str, LayerLayout],
    input_size: tuple[int, int, int],
    inputs: bool,
    roles: Mapping[str, Mapping[str, Any]] | None = None,
    extra_attrs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[ArraySpec]:
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
            **(extra_attrs or {}).get(group, {}),  # reduction, unreduced_shape (reduce.py)
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
        _, h, w = input_size
        specs.append(
            ArraySpec(
                "",
                "input",
                ("input_y", "input_x", "rgb"),
                (h, w, 3),
                {
                    "input_y": (("input_y",), (np.arange(h) + 0.5).astype(np.float32)),
                    "input_x": (("input_x",), (np.arange(w) + 0.5).astype(np.float32)),
                },
            )
        )
    return specs


def _model_provenance(cfg: ExtractConfig, model: Any) -> dict[str, Any]:
    spec = cfg.model
    if isinstance(spec, ModelSpec):
        return {
            "model": spec.name,
            "model_args": dict(spec.model_args),
            "img_size": spec.img_size,
            "weights_source": spec.weights_source,
            "weights_seed": spec.seed if spec.weights_source == "random-init" else None,
            "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
            # Where timm's pretrained weights came from (their hash is weights_sha256).
            "weights_hub_id": pretrained_hub_id(model) if spec.pretrained else None,
        }
    return {
        "model": cfg.model_name,
        "model_class": cfg.model_name,
        "model_args": {},
        "img_size": None,
        # A module handed in from Python: its weights are whatever it holds, and the
        # hash below is what identifies them; module_sha256 identifies the whole module
        # (its submodules' settings and buffers too), which --resume compares.
        "weights_source": "module",
        "module_sha256": module_sha256(model),
        "weights_seed": None,
        "checkpoint": None,
        "weights_hub_id": None,
    }


def _provenance(
    cfg: ExtractConfig,
    shape: JobShape,
    model: Any,
    sha: str,
    dcfg: dict[str, Any],
    images: ImageSet,
    hashes: list[str],
    layers: list[str],
    attention: list[str],
) -> dict[str, Any]:
    import timm
    import torch

    out = {
        **_model_provenance(cfg, model),
        "model_family": model_family(model),
        "weights_sha256": sha,
        **dcfg,
        "input_normalized": cfg.transform is None,
        "image_set": images.spec,
        "image_set_sha256": image_set_sha256(images, hashes),
        "n_images": len(images),
        "label_names": list(images.label_names),
        "layers": layers,
        "attention_layers": attention,
        "inputs": cfg.inputs,
        "dtype": cfg.dtype,
        "compression": cfg.compression,
        "chunk_size": shape.chunk_size,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "code_version": __version__,
        "format": FORMAT_VERSION,
        **dict(cfg.extra_attrs),
    }
    if cfg.reduce:
        out["reductions"] = list(cfg.reduce)
    return out


def _get_model(cfg: ExtractConfig) -> torch.nn.Module:
    """The model: built from its timm name, or the module handed in (put in eval mode)."""
    import torch

    if isinstance(cfg.model, ModelSpec):
        return build_model(cfg.model)
    if not isinstance(cfg.model, torch.nn.Module):
        raise UsageError(
            f"model must be a timm model name or a torch.nn.Module, got {type(cfg.model).__name__}"
        )
    return cfg.model.eval()


def _preprocessing(
    cfg: ExtractConfig, model: torch.nn.Module
) -> tuple[dict[str, Any], Callable[[Any], Any] | None]:
    """The data config recorded in provenance, and the custom transform if one was given."""
    if cfg.transform is not None:
        # A fingerprint without memory addresses: --resume compares it in another process.
        return {"transform": callable_fingerprint(cfg.transform)}, cfg.transform
    if cfg.data_config is not None:
        keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        missing = [k for k in ("input_size", "mean", "std") if k not in cfg.data_config]
        if missing:
            raise UsageError(f"data_config lacks {', '.join(missing)} (timm's keys: {keys})")
        from timm.data import resolve_data_config

        return data_config_from(resolve_data_config(args=dict(cfg.data_config))), None
    img_size = cfg.model.img_size if isinstance(cfg.model, ModelSpec) else _built_size(model)
    if not isinstance(cfg.model, ModelSpec) and not _has_timm_config(model):
        raise UsageError(
            f"{type(model).__name__} has no timm data config: pass transform= (PIL image -> "
            "CHW float tensor) or data_config={'input_size': (3, H, W), 'mean': ..., 'std': ...}"
        )
    return data_config(model, img_size), None


def _built_size(model: Any) -> int | None:
    """The input size a timm ViT handed in as a module was built for (its pretrained
    config may say another): ``patch_embed.img_size``."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    return int(size) if isinstance(size, int) else None


def _has_timm_config(model: Any) -> bool:
    return bool(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None))


def data_config_from(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded, JSON-safe subset of a timm data config."""
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


def _first_image(images: ImageSet, transform: Callable[[Any], Any]) -> Any:
    """The first decodable image, preprocessed, as a batch of one (None if none decode)."""
    from vitcnn_store.errors import ImageDecodeError

    for i in range(min(len(images), 8)):
        try:
            x = transform(images.load(i))
        except ImageDecodeError:
            continue
        if not hasattr(x, "ndim") or x.ndim != 3:
            raise UsageError(
                f"the transform must return a CHW tensor, got {getattr(x, 'shape', type(x))}"
            )
        return x.unsqueeze(0)
    return None


def _reductions(
    cfg: ExtractConfig, layers: list[str], layouts: dict[str, LayerLayout]
) -> tuple[dict[str, ResolvedReduction], dict[str, LayerLayout], dict[str, dict[str, Any]]]:
    """Resolve ``--reduce`` on the template's layouts: the workers' reductions, the
    reduced layouts and the attributes recording them."""
    resolved: dict[str, ResolvedReduction] = {}
    attrs: dict[str, dict[str, Any]] = {}
    out = dict(layouts)
    for name, reduction in assign_reductions(layers, cfg.reduce).items():
        lay = layouts[name]
        fitted, kind, shape, coords = resolve_reduction(
            name, reduction, lay.kind, lay.shape, lay.coords
        )
        resolved[name] = fitted
        out[name] = replace(lay, kind=kind, shape=shape, coords=coords)
        attrs[name] = reduced_attrs(fitted, lay.shape)
    return resolved, out, attrs


def plan_extraction(
    cfg: ExtractConfig, images: ImageSet | None = None, shape: JobShape | None = None
) -> RunTemplate:
    """Get the model once and derive the run's template and the workers' plan.

    ``cfg`` is validated already (:func:`jobs.extract.extract` validates it once).
    ``images`` and ``shape``: the image set and the job's size, when the caller has
    them already (the job opens the set and sizes itself before importing torch, to
    refuse a missing folder early). The plan says what to extract; where (device,
    threads) is the job's :class:`~jobs.sizing.ExecutionPlan`, given to the workers
    beside it.
    """
    import torch

    clock = _Clock()
    if images is None:
        images = open_image_set(cfg.images, limit=cfg.limit)
    if shape is None:
        shape = shape_job(len(images), cfg.chunk_size)
    clock.lap("image set")
    model = _get_model(cfg)
    clock.lap("model")
    layers = expand_layers(model, cfg.layers)
    attention = _select_attention(model, cfg)
    heads = _head_layers(model, cfg)
    layers += [name for name in heads if name not in layers]
    for name in [*layers, *attention]:
        check_layer_name(name)
    dcfg, custom = _preprocessing(cfg, model)
    if custom is not None:
        transform = custom
    else:
        from vitcnn_store.models import make_transform

        transform = make_transform(dcfg)
    x = _first_image(images, transform)
    if x is None:
        if "input_size" not in dcfg:
            raise UsageError("none of the first images decode: cannot find the transform's size")
        x = torch.zeros(1, *dcfg["input_size"])
    input_size = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    dcfg.setdefault("input_size", list(input_size))
    with Capture(model, layers, attention) as cap:
        # The template comes from a real image, so weights that overflow float16 or
        # give NaN are refused here, before anything is written.
        try:
            acts, attn = cap(x)
        except VitcnnError:  # the capture's own refusals (a layer it cannot store) as they are
            raise
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{cfg.model_name} fails on a preprocessed image: {first}") from e
        check_peaks(((k, float(v.abs().max())) for k, v in {**acts, **attn}.items()), cfg.dtype)
        layouts = cap.layouts(acts, attn, (input_size[1], input_size[2]))
    layers = sorted(layers, key=lambda n: layouts[n].depth_index)
    resolved, layouts, reduce_attrs = _reductions(cfg, layers, layouts)
    for name, attrs in heads.items():
        reduce_attrs[name] = {**reduce_attrs.get(name, {}), **attrs}
    clock.lap("template")
    sha = weights_sha256(model)
    clock.lap("weights hash")
    is_cnn = not attention_modules(model) and any(
        isinstance(m, torch.nn.Conv2d) for m in model.modules()
    )
    hashes = images.content_hashes(progress=cfg.progress)
    clock.lap("image hashes")
    provenance = _provenance(cfg, shape, model, sha, dcfg, images, hashes, layers, attention)
    plan = ExtractionPlan(
        weights_sha256=sha,
        data_config=None if custom is not None else dcfg,
        images=images,
        url=cfg.store,
        run=cfg.run,
        layers=tuple(layers),
        attention_layers=tuple(attention),
        inputs=cfg.inputs,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size or shape.chunk_size,
        input_size=input_size,
        autocast=cfg.autocast,
        channels_last=is_cnn,
        transform=custom,
        reductions=resolved,
    )
    specs = array_specs(layouts, input_size, cfg.inputs, model_roles(model), reduce_attrs)
    return RunTemplate(
        plan=plan,
        provenance=provenance,
        specs=specs,
        image_sha256=hashes,
        chunk_size=shape.chunk_size,
        model=model,
        timings=clock.laps,
    )


class _Clock:
    """Seconds between successive laps, by name."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._now()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
