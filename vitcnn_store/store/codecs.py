"""Codec chains of format 2: fast compression, then a crc32c checksum on every chunk.

Every array's chain ends with zarr v3's standard ``crc32c`` codec, so any
conforming zarr v3 reader (zarr-python, tensorstore, zarrs, ...) detects a
damaged chunk instead of decoding garbage. The checksum is over the compressed
bytes, so it costs one pass over much less data than the activations.
"""

from __future__ import annotations

from typing import Any

from vitcnn_store.errors import UsageError

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_COMPRESSION",
    "checksummed",
    "has_checksum",
    "xarray_encoding",
]

COMPRESSIONS = ("none", "lz4", "zstd")
#: Compression of activation arrays unless asked otherwise. Chosen by measurement
#: (``benchmarks/codecs.py``, README): float16 activations barely compress (ViT-B
#: block outputs not at all with lz4, 8 % with zstd), and on a CPU-bound machine
#: the cycles compression takes come out of the forward pass.
DEFAULT_COMPRESSION = "none"


def checksummed(compression: str = DEFAULT_COMPRESSION) -> list[Any]:
    """The bytes-to-bytes codecs of an array: compression (if any), then ``crc32c``.

    ``none`` (the default for activations): the checksum only; ``lz4``: blosc-lz4
    level 1 with bit shuffle (cheap; 14 % smaller ResNet maps, ViT maps 5 %);
    ``zstd``: zstd level 1 (42 % smaller ResNet maps, 8 % ViT, at about 6× the CPU
    of lz4: for slow or paid storage). The table is in the README.

    Examples
    --------
    >>> [c.to_dict()["name"] for c in checksummed("zstd")]
    ['zstd', 'crc32c']
    """
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if compression == "lz4":
        # Bit shuffle: smaller and cheaper than byte shuffle on float16 maps (measured).
        return [BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"), Crc32cCodec()]
    if compression == "zstd":
        return [ZstdCodec(level=1), Crc32cCodec()]
    if compression == "none":
        return [Crc32cCodec()]
    raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")


def has_checksum(array: Any) -> bool:
    """Whether a zarr v3 array's codec chain ends with ``crc32c``."""
    codecs: list[Any] = list(getattr(array.metadata, "codecs", None) or [])
    return bool(codecs) and codecs[-1].to_dict().get("name") == "crc32c"


def xarray_encoding(dataset: Any, compression: str = "zstd") -> dict[str, dict[str, Any]]:
    """``encoding=`` for :meth:`xarray.Dataset.to_zarr` giving every variable a checksum.

    For writers of derived results (e.g. ``_analyses``) that go through xarray.
    Integer variables get fill value -1 when all their values are >= 0, else the
    smallest value of their dtype, so a missing chunk never reads as real data.
    """
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    for name, var in dataset.variables.items():
        enc: dict[str, Any] = {"compressors": checksummed(compression)}
        if var.dtype.kind in "iu":
            values = np.asarray(var.values)
            if var.dtype.kind == "i" and (values.size == 0 or values.min() >= 0):
                enc["fill_value"] = -1
            elif var.dtype.kind == "i":
                enc["fill_value"] = int(np.iinfo(var.dtype).min)
            else:
                enc["fill_value"] = int(np.iinfo(var.dtype).max)
        out[str(name)] = enc
    return out
