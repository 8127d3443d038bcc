"""Build timm models by name: random init, timm pretrained weights or a local checkpoint.

A :class:`ModelSpec` is the small, picklable description that travels to Ray
workers; every worker rebuilds the identical model from it (random init is
seeded, so two processes get the same weights, which resume relies on).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcnn_store.errors import CheckpointError, ModelError, UnknownModelError, UsageError
from vitcnn_store.options import check_options, option

if TYPE_CHECKING:
    import torch

__all__ = [
    "ModelSpec",
    "build_model",
    "carries_weights",
    "data_config",
    "make_transform",
    "parse_model_arg",
    "pretrained_hub_id",
    "weights_sha256",
]


def parse_model_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--model-arg``: VALUE a Python literal, else a string.

    Examples
    --------
    >>> parse_model_arg("depth=2"), parse_model_arg("act_layer=gelu")
    (('depth', 2), ('act_layer', 'gelu'))
    """
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise UsageError("--model-arg wants KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word is a string


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a timm name plus where the weights come from.

    Parameters
    ----------
    name
        Any timm model name (``vit_base_patch16_224``, ``resnet50``, with or
        without a pretrained tag).
    pretrained
        Load timm's pretrained weights (needs the hub or a filled cache).
    checkpoint
        Path of a local ``.safetensors`` / ``.pth`` state dict.
    img_size
        Input resolution; passed to the model where its family takes it, and
        always to the preprocessing.
    model_args
        Extra keyword arguments for :func:`timm.create_model` (e.g. ``depth=2``).
    seed
        Seed of the random initialisation (used when no weights are loaded).
    """

    name: str = option(
        flag="model",
        action="positional",
        metavar="model",
        parse=str,
        help="timm model name, e.g. vit_base_patch16_224 or resnet50",
    )
    pretrained: bool = option(
        False,
        flag="--pretrained",
        action="true",
        exclusive="weights",
        help="timm pretrained weights",
    )
    checkpoint: str | None = option(
        None,
        flag="--checkpoint",
        parse=str,
        metavar="PATH",
        exclusive="weights",
        help="local .safetensors/.pth weights",
    )
    img_size: int | None = option(
        None,
        flag="--img-size",
        parse=int,
        check="positive",
        metavar="N",
        help="input resolution",
    )
    model_args: Mapping[str, Any] = option(
        flag="--model-arg",
        parse=parse_model_arg,
        action="append",
        collect=dict,
        metavar="KEY=VALUE",
        default_factory=dict,
        help="keyword argument for timm.create_model, VALUE a Python literal (repeatable)",
    )
    seed: int = option(0, flag="--seed", parse=int, help="seed of random-init weights")

    def __post_init__(self) -> None:
        if self.pretrained and self.checkpoint:
            raise ModelError("give either --pretrained or --checkpoint, not both")
        check_options(self)
        for key in self.model_args:
            if carries_weights(key):
                raise ModelError(
                    f"--model-arg {key} would load weights that the run's provenance does not "
                    "record: use --checkpoint PATH for local weights or --pretrained for timm's"
                )

    @property
    def weights_source(self) -> str:
        """``random-init``, ``timm-pretrained`` or ``checkpoint``."""
        if self.checkpoint:
            return "checkpoint"
        return "timm-pretrained" if self.pretrained else "random-init"


#: ``timm.create_model`` keyword arguments that load or select weights.
_WEIGHT_PREFIXES = ("pretrained", "checkpoint")


def carries_weights(key: str) -> bool:
    """Whether a ``timm.create_model`` keyword argument loads or selects weights.

    ``pretrained``, ``pretrained_cfg``, ``pretrained_cfg_overlay``,
    ``pretrained_strict``, ``checkpoint_path``, ... must go through
    ``--pretrained``/``--checkpoint`` so provenance records them.

    Examples
    --------
    >>> carries_weights("checkpoint_path"), carries_weights("pretrained_cfg_overlay")
    (True, True)
    >>> carries_weights("depth")
    False
    """
    return key.lower().startswith(_WEIGHT_PREFIXES)


def _check_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    arch = name.split(".")[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest timm names: {', '.join(close)}" if close else ""
    raise UnknownModelError(f"unknown model {name!r}{hint}")


def _create(spec: ModelSpec) -> torch.nn.Module:
    import timm

    kwargs = dict(spec.model_args)
    if spec.img_size is not None:
        kwargs.setdefault("img_size", spec.img_size)
    try:
        try:
            return timm.create_model(spec.name, pretrained=spec.pretrained, **kwargs)
        except TypeError as e:
            # CNN families take any input size and have no img_size argument.
            if "img_size" in str(e) and "img_size" not in spec.model_args:
                kwargs.pop("img_size")
                return timm.create_model(spec.name, pretrained=spec.pretrained, **kwargs)
            raise
    except TypeError as e:
        raise ModelError(f"cannot build {spec.name} with {kwargs}: {e}") from e
    except (OSError, RuntimeError) as e:
        if spec.pretrained:
            raise ModelError(
                f"could not load timm pretrained weights for {spec.name} ({e}); "
                "check network access or pass --checkpoint PATH"
            ) from e
        raise


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # weights_only refuses any pickled object that is not plain tensors/containers,
        # which is exactly the code payload we must never run.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refused to load {path}: not a plain weights file ({first}); "
            "only tensors are loaded (weights_only=True)"
        ) from e
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    state = _read_state_dict(path)
    # timm's own filter resamples position embeddings to the model's grid (and maps
    # original-repo key names), exactly as timm does when loading pretrained weights.
    filter_fn: Callable[..., dict[str, Any]] | None = getattr(
        sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None
    )
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:
            msg = f"checkpoint {path} does not fit {type(model).__name__}: {e}"
            raise CheckpointError(msg) from e
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:4])}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:4])}")
        raise CheckpointError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the model described by ``spec`` in eval mode on the CPU.

    Examples
    --------
    >>> m = build_model(ModelSpec("vit_tiny_patch16_224", img_size=32, model_args={"depth": 1}))
    >>> m.training
    False
    """
    import torch

    _check_name(spec.name)
    if spec.checkpoint or spec.pretrained:
        model = _create(spec)
    else:
        # Seed the initialisation without disturbing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = _create(spec)
    if spec.checkpoint:
        _load_checkpoint(model, Path(spec.checkpoint).expanduser())
    return model.eval()


def pretrained_hub_id(model: torch.nn.Module) -> str | None:
    """The Hugging Face hub repository timm loads ``pretrained=True`` weights from
    (``timm/<architecture>.<tag>``), or None when the model's config names none.

    Examples
    --------
    >>> m = build_model(ModelSpec("resnet18", img_size=32))
    >>> pretrained_hub_id(m)
    'timm/resnet18.a1_in1k'
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg["hf_hub_id"]) if cfg.get("hf_hub_id") else None


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes) in key order."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_config(model: torch.nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """timm's eval preprocessing for ``model``, honouring the actual input size.

    ``resolve_data_config(model=m)`` reports the pretrained size, not a custom
    ``img_size``, so the size is passed explicitly.
    """
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    if img_size is not None:
        args["input_size"] = (3, img_size, img_size)
    cfg = resolve_data_config(args=args, model=model)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


def make_transform(cfg: Mapping[str, Any]) -> Callable[[Any], torch.Tensor]:
    """The PIL-image → normalised CHW float tensor transform of ``cfg``."""
    from timm.data import create_transform

    return create_transform(
        input_size=tuple(cfg["input_size"]),
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
        is_training=False,
    )
