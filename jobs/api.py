"""The Python API of extraction: ``vitcnn_store.extract(model, images, store, run, layers=...)``.

For notebooks and scripts: ``model`` is a timm name or any ``torch.nn.Module``;
the job is the same as ``vitcnn extract`` (same units, same store, same
checks, resume, checksums, content hashes and lease), run in this process
unless Ray workers or a cluster address are asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

from jobs.config import ExtractConfig
from vitcnn_store.models.factory import ModelSpec
from vitcnn_store.options import AUTO
from vitcnn_store.store.codecs import DEFAULT_COMPRESSION

if TYPE_CHECKING:
    import torch

    from vitcnn_store.store.reader import Run

__all__ = ["extract"]


def _reduce_items(reduce: Mapping[str, str] | Sequence[str] | None) -> tuple[str, ...]:
    if reduce is None:
        return ()
    if isinstance(reduce, Mapping):
        return tuple(f"{pattern}={how}" for pattern, how in reduce.items())
    if isinstance(reduce, str):
        return (reduce,)
    return tuple(reduce)


def extract(
    model: str | torch.nn.Module,
    images: str | PathLike[str],
    store: str | PathLike[str],
    run: str,
    *,
    layers: str | Sequence[str],
    transform: Callable[[Any], Any] | None = None,
    data_config: Mapping[str, Any] | None = None,
    attention: bool | str = False,
    attention_heads: bool = False,
    inputs: bool = False,
    reduce: Mapping[str, str] | Sequence[str] | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
    img_size: int | None = None,
    model_args: Mapping[str, Any] | None = None,
    seed: int = 0,
    dtype: str = "float16",
    compression: str = DEFAULT_COMPRESSION,
    chunk_size: int = 32,
    batch_size: int | None = None,
    limit: int | None = None,
    strict: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    workers: int | str = AUTO,
    cpus_per_worker: float | str = AUTO,
    gpus_per_worker: float | str = AUTO,
    device: str = "auto",
    autocast: bool = False,
    address: str | None = None,
    progress: bool = True,
    extra_attrs: Mapping[str, Any] | None = None,
) -> Run:
    """Extract ``layers`` of ``model`` over ``images`` into run ``run`` of ``store``.

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
        matching modules. Refused for a model without such modules.
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

    Other parameters are those of ``vitcnn extract`` (``--chunk-size`` is
    ``chunk_size``, ...).

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
    if isinstance(model, str):
        spec: Any = ModelSpec(
            model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            img_size=img_size,
            model_args=dict(model_args or {}),
            seed=seed,
        )
    else:
        if pretrained or checkpoint or img_size or model_args:
            from vitcnn_store.errors import UsageError

            raise UsageError(
                "pretrained, checkpoint, img_size and model_args build a timm model by name; "
                "a module is used as it is"
            )
        spec = model
    cfg = ExtractConfig(
        model=spec,
        images=str(images),
        store=str(store),
        run=run,
        layers=layers if isinstance(layers, str) else ",".join(layers),
        reduce=_reduce_items(reduce),
        attention=bool(attention),
        attention_heads=attention_heads,
        attention_layers=attention if isinstance(attention, str) else None,
        inputs=inputs,
        dtype=dtype,
        compression=compression,
        chunk_size=chunk_size,
        batch_size=batch_size,
        limit=limit,
        strict=strict,
        resume=resume,
        overwrite=overwrite,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        device=device,
        autocast=autocast,
        address=address,
        progress=progress,
        extra_attrs=dict(extra_attrs or {}),
        transform=transform,
        data_config=data_config,
    )
    from jobs.extract import extract as run_job
    from vitcnn_store.store import open_store

    run_job(cfg)
    return open_store(str(store))[run]
