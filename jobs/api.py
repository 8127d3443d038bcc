"""The Python API of extraction: ``vitcnn_store.extract(model, images, store, run, layers=...)``.

For notebooks and scripts: ``model`` is a timm name or any ``torch.nn.Module``;
the job is the same as ``vitcnn extract`` (same units, same store, same
checks, resume, checksums, content hashes and lease), run in this process
unless Ray workers or a cluster address are asked for.

The keywords are the fields of :class:`~jobs.config.ExtractConfig` (the one
declaration of every extraction option and its default, which the CLI reads
too) and, for a timm name, those of :class:`~vitcnn_store.models.ModelSpec`;
nothing here re-declares them. :func:`extract_config` turns the Python-friendly
forms (a list of layers, a dict of reductions, ``attention="blocks.*"``, paths)
into the config.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, fields
from os import PathLike
from typing import TYPE_CHECKING, Any

from jobs.config import ExtractConfig
from vitcnn_store.errors import UsageError
from vitcnn_store.models.factory import ModelSpec

if TYPE_CHECKING:
    import torch

    from vitcnn_store.store.reader import Run

__all__ = ["KEYWORDS", "MODEL_KEYWORDS", "extract", "extract_config"]

#: The config's fields that :func:`extract`'s positional arguments fill.
POSITIONAL = ("model", "images", "store", "run")
#: :class:`ModelSpec`'s fields but its name: keywords that build a timm model by name.
MODEL_KEYWORDS = tuple(f.name for f in fields(ModelSpec) if f.name != "name")
#: Every keyword of :func:`extract`: the config's other fields, then the model's.
KEYWORDS = (
    *(f.name for f in fields(ExtractConfig) if f.name not in POSITIONAL),
    *MODEL_KEYWORDS,
)
#: ``seed`` only seeds a random initialisation: a module handed in has its weights
#: already, and a seed given with one is ignored (as it always was), not refused.
_BUILD_BY_NAME = tuple(k for k in MODEL_KEYWORDS if k != "seed")


def _joined(layers: str | Sequence[str]) -> str:
    return layers if isinstance(layers, str) else ",".join(layers)


def _reduce_items(reduce: Mapping[str, str] | Sequence[str] | None) -> tuple[str, ...]:
    if reduce is None:
        return ()
    if isinstance(reduce, Mapping):
        return tuple(f"{pattern}={how}" for pattern, how in reduce.items())
    if isinstance(reduce, str):
        return (reduce,)
    return tuple(reduce)


#: The Python-friendly form a keyword may take, turned into the config field's value.
_FROM_PYTHON: dict[str, Callable[[Any], Any]] = {
    "layers": _joined,
    "reduce": _reduce_items,
    "extra_attrs": lambda attrs: dict(attrs or {}),
}
#: How the signature shows those keywords (and the positional ones).
_SHOWN_TYPES = {
    "model": "str | torch.nn.Module",
    "images": "str | PathLike[str]",
    "store": "str | PathLike[str]",
    "layers": "str | Sequence[str]",
    "attention": "bool | str",
    "reduce": "Mapping[str, str] | Sequence[str] | None",
}


def _model(model: str | torch.nn.Module, options: Mapping[str, Any]) -> Any:
    """A timm name built with ``options`` (ModelSpec's fields), or the module as it is."""
    if isinstance(model, str):
        return ModelSpec(model, **{**options, "model_args": dict(options.get("model_args") or {})})
    if any(options.get(k) for k in _BUILD_BY_NAME):
        names = ", ".join(_BUILD_BY_NAME[:-1]) + f" and {_BUILD_BY_NAME[-1]}"
        raise UsageError(f"{names} build a timm model by name; a module is used as it is")
    return model


def extract_config(
    model: str | torch.nn.Module,
    images: str | PathLike[str],
    store: str | PathLike[str],
    run: str,
    **options: Any,
) -> ExtractConfig:
    """The :class:`ExtractConfig` that :func:`extract` runs (not validated yet: the job
    validates it once).

    Examples
    --------
    >>> cfg = extract_config("resnet18", "builtin:faces", "acts.zarr", "r18",
    ...                      layers=["layer1", "layer2"], reduce={"layer*": "mean"},
    ...                      attention="blocks.*", lease_ttl=30.0, seed=3)
    >>> cfg.layers, cfg.reduce, cfg.attention, cfg.attention_layers, cfg.lease_ttl
    ('layer1,layer2', ('layer*=mean',), True, 'blocks.*', 30.0)
    >>> cfg.model.seed, cfg.chunk_size  # the config's own default
    (3, 32)
    >>> extract_config("resnet18", "builtin:faces", "acts.zarr", "r18", chunk=8)
    Traceback (most recent call last):
    ...
    TypeError: extract() got an unexpected keyword argument 'chunk'
    """
    for name in options:
        if name not in KEYWORDS:
            raise TypeError(f"extract() got an unexpected keyword argument {name!r}")
    spec = _model(model, {k: options.pop(k) for k in MODEL_KEYWORDS if k in options})
    attention = options.pop("attention", False)
    if isinstance(attention, str):  # attention="PATTERNS": --attention --attention-layers
        if options.get("attention_layers") is not None:
            raise UsageError("give attention='PATTERNS' or attention_layers, not both")
        options["attention_layers"] = attention
    values = {k: _FROM_PYTHON.get(k, _as_given)(v) for k, v in options.items()}
    return ExtractConfig(
        model=spec,
        images=str(images),
        store=str(store),
        run=run,
        attention=bool(attention),
        **values,
    )


def _as_given(value: Any) -> Any:
    return value


def extract(
    model: str | torch.nn.Module,
    images: str | PathLike[str],
    store: str | PathLike[str],
    run: str,
    *,
    layers: str | Sequence[str],
    **options: Any,
) -> Run:
    """Extract ``layers`` of ``model`` over ``images`` into run ``run`` of ``store``.

    Every other keyword is a field of :class:`jobs.config.ExtractConfig` with its
    default there (``help(vitcnn_store.extract)`` shows them all); each is the
    ``vitcnn extract`` option of the same name (``chunk_size`` is ``--chunk-size``,
    ``lease_ttl`` is ``--lease-ttl``, ...).

    Parameters
    ----------
    model
        A timm model name (built here; ``pretrained``, ``checkpoint``,
        ``img_size``, ``model_args`` and ``seed`` say how), or any
        ``torch.nn.Module`` (used as it is, in eval mode; the run records its
        class and the sha256 of its state dict).
    images
        A folder, a ``path[,label]`` CSV manifest, or ``builtin:NAME``.
    store, run
        The store (path or fsspec URL) and the run's name in it.
    layers
        Module path patterns over ``model.named_modules()`` (``*`` within one
        component, ``**`` across) and, for ViT and ResNet models, presets
        (``preset:blocks``, ``preset:paper``); a string (comma-separated) or a list.
    transform, data_config
        Preprocessing of a module that is not a timm model: a callable from a
        PIL image to a CHW float tensor, or a timm-style data config
        (``input_size``, ``mean``, ``std``, optionally ``interpolation``,
        ``crop_pct``, ``crop_mode``). timm models (and modules carrying a timm
        ``pretrained_cfg``) need neither.
    attention
        ``True`` stores the softmax probabilities of every attention module
        that exposes them the way timm's do; a string restricts it to the
        matching modules (as ``attention_layers`` does). Refused for a model
        without such modules.
    attention_heads
        Also store every such module's per-head outputs (context vectors before
        the output projection) as layer ``<module>.norm`` (``--attention-heads``).
    reduce
        Reductions at extraction: ``{"blocks.*": "cls"}`` or
        ``["layer*.*=pool:2"]`` (``cls``, ``mean`` or ``pool:K``).
    workers
        ``"auto"`` (default): in this process unless ``address``/``RAY_ADDRESS``
        names a cluster or the machine has several GPUs; ``0``: in this
        process; ``N``: N Ray actors.
    extra_attrs
        Extra provenance recorded in the run's attributes.

    Returns
    -------
    Run
        The run, opened for reading: ``run["blocks.3"]`` is a lazy DataArray.

    Examples
    --------
    >>> import torch, vitcnn_store
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> run = vitcnn_store.extract(
    ...     net, "builtin:faces", "acts.zarr", "mine", layers="*",
    ...     data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3},
    ... )  # doctest: +SKIP
    >>> run["0"].dims  # doctest: +SKIP
    ('image', 'y', 'x', 'channel')
    """
    cfg = extract_config(model, images, store, run, layers=layers, **options)
    from jobs.extract import extract as run_job
    from vitcnn_store.store import open_store

    run_job(cfg)
    return open_store(str(store))[run]


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return inspect.Parameter.empty


def _signature() -> inspect.Signature:
    """:func:`extract`'s signature as ``help()`` and notebooks show it: every keyword with
    its default, read from the config's and the model's fields (declared there only)."""
    by_name = {f.name: f for f in (*fields(ExtractConfig), *fields(ModelSpec))}
    kinds = dict.fromkeys(POSITIONAL, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [
        inspect.Parameter(
            name,
            kinds.get(name, inspect.Parameter.KEYWORD_ONLY),
            # layers is required here: the API names what to extract (the CLI has a preset).
            default=inspect.Parameter.empty if name in (*POSITIONAL, "layers") else _default(f),
            annotation=_SHOWN_TYPES.get(name, f.type),
        )
        for name in (*POSITIONAL, *KEYWORDS)
        for f in (by_name[name],)
    ]
    return inspect.Signature(params, return_annotation="Run")


extract.__signature__ = _signature()  # type: ignore[attr-defined]
