"""The options of an extraction job: one table for the CLI, the Python API and validation.

Each field of :class:`ExtractConfig` declares its flag, parser, choices and
bounds once (:func:`vitcnn_store.options.option`); ``vitcnn extract``,
``vitcnn submit extract`` and :func:`vitcnn_store.extract` all build this
config, and :meth:`ExtractConfig.validate` refuses bad values the same way
whichever made it. This module stays light (no torch, zarr or Ray): the CLI
imports it to build its parser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vitcnn_store.errors import UsageError
from vitcnn_store.models.factory import ModelSpec
from vitcnn_store.models.reduce import parse_reduce_item
from vitcnn_store.options import AUTO, check_options, option
from vitcnn_store.store.codecs import COMPRESSIONS, DEFAULT_COMPRESSION

__all__ = ["DEVICES", "DTYPES", "PYTHON_ONLY", "ExtractConfig"]

DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
#: Seconds a crashed job's lease keeps its run locked (docs/format.md §7).
DEFAULT_LEASE_TTL = 120.0
#: The fields without a command-line flag: extra provenance, and the preprocessing of a
#: module handed in from Python (every other field is a ``vitcnn extract`` option).
PYTHON_ONLY = ("extra_attrs", "transform", "data_config")


@dataclass(frozen=True)
class ExtractConfig:
    """Options of ``vitcnn extract`` (see its ``--help``) and of :func:`vitcnn_store.extract`.

    ``model`` is a :class:`~vitcnn_store.models.ModelSpec` (a timm name and its
    weights) or, from Python, any ``torch.nn.Module``; a module that is not a
    timm model comes with ``transform`` (PIL image → CHW float tensor) or a
    timm-style ``data_config``.

    Examples
    --------
    >>> cfg = ExtractConfig(ModelSpec("resnet18"), "builtin:faces", "acts.zarr", "r18")
    >>> cfg.workers, cfg.cpus_per_worker, cfg.compression
    ('auto', 'auto', 'none')
    >>> cfg = ExtractConfig(ModelSpec("resnet18"), "builtin:faces", "a.zarr", "r", chunk_size=0)
    >>> cfg.validate()
    Traceback (most recent call last):
    ...
    vitcnn_store.errors.UsageError: --chunk-size must be positive, got 0
    """

    model: Any = option(flag="model", nested=ModelSpec)  # noqa: RUF009 (a field specifier)
    images: str = option(flag="--images", parse=str, help="folder, CSV manifest, or builtin:NAME")
    store: str = option(flag="--store", parse=str, help="store path or fsspec URL")
    run: str = option(flag="--run", parse=str, help="run name inside the store")
    layers: str = option(
        "preset:blocks",
        flag="--layers",
        parse=str,
        metavar="PATTERNS",
        help="comma-separated module path patterns and presets",
    )
    reduce: tuple[str, ...] = option(
        (),
        flag="--reduce",
        parse=parse_reduce_item,
        action="append",
        metavar="PATTERN=HOW",
        help="store a reduction of the matching layers: cls (the CLS token), mean (or gap: "
        "over patch tokens or positions) or pool:K (K×K average pool); repeatable",
    )
    attention: bool = option(
        False, flag="--attention", action="true", help="store attention probabilities"
    )
    attention_layers: str | None = option(
        None,
        flag="--attention-layers",
        parse=str,
        metavar="PATTERNS",
        help="restrict --attention to these attention modules",
    )
    attention_heads: bool = option(
        False,
        flag="--attention-heads",
        action="true",
        help="store each attention module's per-head outputs (the heads' context vectors "
        "before the output projection) as layer <module>.norm, channel = head × head_dim + d",
    )
    inputs: bool = option(
        False, flag="--inputs", action="true", help="store the preprocessed input"
    )
    dtype: str = option(
        "float16", flag="--dtype", parse=str, choices=DTYPES, help="dtype of stored arrays"
    )
    compression: str = option(
        DEFAULT_COMPRESSION,
        flag="--compression",
        parse=str,
        choices=COMPRESSIONS,
        help="chunk compression (every chunk is checksummed either way): none, blosc-lz4 or "
        "zstd level 1; see the README's codec table",
    )
    chunk_size: int = option(
        32, flag="--chunk-size", parse=int, check="positive", help="images per chunk (= work unit)"
    )
    batch_size: int | None = option(
        None,
        flag="--batch-size",
        parse=int,
        check="positive",
        help="forward batch size (default: the chunk size)",
    )
    limit: int | None = option(
        None,
        flag="--limit",
        parse=int,
        check="positive",
        metavar="N",
        help="use only the first N images",
    )
    strict: bool = option(
        False,
        flag="--strict",
        action="true",
        help="stop before writing if any image fails to decode",
    )
    resume: bool = option(
        False, flag="--resume", action="true", exclusive="mode", help="continue an existing run"
    )
    overwrite: bool = option(
        False, flag="--overwrite", action="true", exclusive="mode", help="replace an existing run"
    )
    workers: int | str = option(
        AUTO,
        flag="--workers",
        parse=int,
        auto=True,
        check="non-negative",
        metavar="N",
        note=" (0 runs in this process, N >= 1 on N Ray actors)",
        help="Ray actors; auto: in this process on a machine without a cluster address, one "
        "actor per GPU with several GPUs, sized from the cluster's resources with --address; "
        "0: in this process",
    )
    cpus_per_worker: float | str = option(
        AUTO,
        flag="--cpus-per-worker",
        parse=float,
        auto=True,
        check="positive",
        metavar="C",
        help="CPUs (torch threads) per worker; auto: workers × threads cover every CPU",
    )
    gpus_per_worker: float | str = option(
        AUTO,
        flag="--gpus-per-worker",
        parse=float,
        auto=True,
        check="non-negative",
        metavar="G",
        help="GPUs per Ray actor; auto: 1 where the cluster has GPUs, else 0",
    )
    device: str = option(
        "auto",
        flag="--device",
        parse=str,
        choices=DEVICES,
        help="auto: cuda where a GPU is available",
    )
    autocast: bool = option(False, flag="--autocast", action="true", help="bf16 autocast on CUDA")
    address: str | None = option(
        None,
        flag="--address",
        parse=str,
        help="Ray address (default: RAY_ADDRESS; none: run here); for submit, the job server "
        "http://HEAD:8265",
    )
    progress: bool = option(True, flag="--no-progress", action="false", help="no progress bar")
    lease_ttl: float = option(
        DEFAULT_LEASE_TTL,
        flag="--lease-ttl",
        parse=float,
        check="positive",
        metavar="SECONDS",
        help="how long after a crash its run stays locked before --resume may take over",
    )
    # Python only (no flag, PYTHON_ONLY): extra provenance, and the preprocessing of a
    # custom module.
    extra_attrs: Mapping[str, Any] = field(default_factory=dict)
    transform: Callable[[Any], Any] | None = None
    data_config: Mapping[str, Any] | None = None

    def validate(self) -> None:
        """Refuse bad options with one line naming the flag (bad input: exit 2)."""
        from vitcnn_store.store.layout import check_name

        check_options(self)
        check_name(self.run)
        for item in self.reduce:
            parse_reduce_item(item)
        if self.attention_layers and not (self.attention or self.attention_heads):
            raise UsageError("--attention-layers needs --attention or --attention-heads")
        if self.transform is not None and self.data_config is not None:
            raise UsageError("give either transform or data_config, not both")
        if self.transform is not None and not callable(self.transform):
            raise UsageError("transform must be a callable: PIL image -> CHW float tensor")

    @property
    def model_name(self) -> str:
        """What the run records as its model: the timm name, or the module's class."""
        if isinstance(self.model, ModelSpec):
            return self.model.name
        cls = type(self.model)
        return f"{cls.__module__}.{cls.__qualname__}"
