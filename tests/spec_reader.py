"""A reader of vitcnn stores written from docs/format.md alone.

It uses only the JSON metadata files, numpy, ``google_crc32c`` and, for the
compressed chains, numcodecs' zstd and blosc decompressors: no zarr, no
xarray, no vitcnn_store. It reads local stores (paths), which is what the
suite builds; every step a remote reader would take is one object read by key
(listing is needed only where the spec says so). The sections named in the
docstrings are those of docs/format.md. tests/test_spec_reader.py checks
everything it reads against zarr-python and xarray.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import blosc, zstd

__all__ = ["ChecksumError", "SpecStore", "find_result_group"]

_NUMERIC = {
    "bool": "|b1",
    "int8": "|i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "uint8": "|u1",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
}
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ChecksumError(ValueError):
    """A chunk whose crc32c does not match its bytes (§5)."""


def _json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return dict(json.load(f))


def _fill(meta: dict[str, Any]) -> Any:
    value = meta["fill_value"]
    if meta["data_type"] == "string":
        return str(value)
    return _SPECIAL_FLOATS.get(value, value) if isinstance(value, str) else value


def _vlen_utf8(data: bytes, count: int) -> np.ndarray:
    """§5.1: uint32 LE item count, then per item a uint32 LE byte length and its UTF-8."""
    n = int.from_bytes(data[:4], "little")
    if n != count:
        raise ValueError(f"vlen-utf8 chunk holds {n} items, its chunk shape {count}")
    out, pos = [], 4
    for _ in range(n):
        size = int.from_bytes(data[pos : pos + 4], "little")
        out.append(data[pos + 4 : pos + 4 + size].decode("utf-8"))
        pos += 4 + size
    return np.array(out, dtype=object)


def _decode_chunk(raw: bytes, meta: dict[str, Any], where: str) -> np.ndarray:
    """Undo the codec chain, last codec first (§5); a chunk is always full-size."""
    shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    data = raw
    codecs = meta["codecs"]
    for codec in reversed(codecs[1:]):  # the bytes-to-bytes codecs
        name = codec["name"]
        if name == "crc32c":
            body, stored = data[:-4], data[-4:]
            if google_crc32c.value(body).to_bytes(4, "little") != stored:
                raise ChecksumError(f"crc32c mismatch in chunk {where}")
            data = body
        elif name == "zstd":
            data = bytes(zstd.decompress(data))
        elif name == "blosc":  # the blosc frame records its own shuffle and type size
            data = bytes(blosc.decompress(data))
        else:
            raise ValueError(f"{where}: codec {name!r} is not in the format")
    first = codecs[0]
    if first["name"] == "vlen-utf8":
        return _vlen_utf8(data, math.prod(shape)).reshape(shape)
    if first["name"] != "bytes":
        raise ValueError(f"{where}: array-to-bytes codec {first['name']!r} is not in the format")
    dtype = np.dtype(_NUMERIC[meta["data_type"]])
    if (first.get("configuration") or {}).get("endian") == "big":
        dtype = dtype.newbyteorder(">")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


class SpecStore:
    """A local vitcnn store read through its files, as §1-§9 describe them."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.meta = _json(self.root / "zarr.json")
        if self.meta.get("node_type") != "group" or self.meta.get("zarr_format") != 3:
            raise ValueError(f"{root} is not a zarr v3 group")
        fmt = self.meta["attributes"].get("vitcnn_store.format")
        if fmt not in (1, 2):
            raise ValueError(f"store format {fmt!r} is not one this reader knows")

    def metadata(self, path: str) -> dict[str, Any]:
        """The ``zarr.json`` of the node at ``path`` (``""`` is the root)."""
        return _json(self.root / path / "zarr.json")

    def attrs(self, path: str) -> dict[str, Any]:
        return dict(self.metadata(path).get("attributes", {}))

    def runs(self) -> list[str]:
        """§3: run names from the run registry ``_runs/<seq>`` (no listing); for a store
        without one, from the root's consolidated metadata when present, otherwise the
        root's child folders holding a group ``zarr.json``. Names starting with ``_`` or
        ``.`` are not runs."""
        consolidated = self.meta.get("consolidated_metadata")
        registry = self.root / "_runs"
        if (registry / "0000000000" / "zarr.json").is_file():
            names, seq = [], 0
            while (registry / f"{seq:010d}" / "zarr.json").is_file():
                entry = self.metadata(f"_runs/{seq:010d}")["attributes"]["vitcnn_store.runs"]
                names += [n for n in entry if (self.root / n / "zarr.json").is_file()]
                seq += 1
            names = sorted(set(names))
        elif consolidated:
            names = [
                k
                for k, m in consolidated["metadata"].items()
                if "/" not in k and m.get("node_type") == "group"
            ]
        else:
            names = [
                p.name
                for p in self.root.iterdir()
                if (p / "zarr.json").is_file() and self.metadata(p.name)["node_type"] == "group"
            ]
        return sorted(n for n in names if not n.startswith(("_", ".")))

    def created_runs(self) -> list[str]:
        """§6.1: runs whose own ``zarr.json`` says ``vitcnn_store.created`` (format 2)."""
        return [r for r in self.runs() if self.attrs(r).get("vitcnn_store.created") is True]

    def read(self, path: str, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """Array ``path`` (or a region of it: step-1 slices), every chunk read checked.

        §5: the regular grid; chunk key ``c/i/j/...``; chunks at the edge are full-size
        and their part beyond the array is ignored; a missing chunk is the fill value.
        """
        meta = self.metadata(path)
        if meta.get("node_type") != "array":
            raise ValueError(f"{path} is not an array")
        shape = tuple(meta["shape"])
        chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        region = region or tuple(slice(0, s) for s in shape)
        bounds = [sl.indices(s)[:2] for sl, s in zip(region, shape, strict=True)]
        dtype = object if meta["data_type"] == "string" else _NUMERIC[meta["data_type"]]
        out = np.full([b - a for a, b in bounds], _fill(meta), dtype=dtype)
        grid = [range(a // c, -(-b // c)) for (a, b), c in zip(bounds, chunks, strict=True)]
        for idx in np.ndindex(*[len(g) for g in grid]):
            cidx = [g[i] for g, i in zip(grid, idx, strict=True)]
            key = "c" + "".join(f"{sep}{i}" for i in cidx) if cidx else "c"
            file = self.root / path / key
            if not file.is_file():
                continue  # never written: the fill value
            chunk = _decode_chunk(file.read_bytes(), meta, f"{path}/{key}")
            src, dst = [], []
            for ci, c, (a, b) in zip(cidx, chunks, bounds, strict=True):
                lo, hi = max(a, ci * c), min(b, (ci + 1) * c)
                src.append(slice(lo - ci * c, hi - ci * c))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = chunk[tuple(src)]
        return out

    # -- what a run holds ----------------------------------------------------------------

    def image_index(self, run: str, image_id: str) -> int:
        """§4.3: the index of an image along ``image``, found by its stable id."""
        ids = self.read(f"{run}/image_id")
        hits = np.flatnonzero(ids == image_id)
        if hits.size != 1:
            raise KeyError(f"image id {image_id!r} in run {run!r}: {hits.size} matches")
        return int(hits[0])

    def rows(self, path: str, start: int, stop: int) -> np.ndarray:
        """Images ``start:stop`` of an image-indexed array (only their chunks are read)."""
        ndim = len(self.metadata(path)["shape"])
        return self.read(path, (slice(start, stop), *([slice(None)] * (ndim - 1))))

    def usable(self, run: str) -> np.ndarray:
        """§4.5/§9.1: images in done units that decoded."""
        chunk = int(self.attrs(run)["chunk_size"])
        done = self.read(f"{run}/done")
        n = int(self.attrs(run)["n_images"])
        return np.repeat(done, chunk)[:n] & ~self.read(f"{run}/failed")

    def gram(self, run: str, layer: str, reduce: str = "flatten") -> tuple[np.ndarray, np.ndarray]:
        """§9.1: ``(X Xᵀ, its row means over the usable images)`` from a stored Gram."""
        suffix = "" if reduce == "flatten" else f"_{reduce}"
        base = f"{run}/_grams/{layer}"
        if self.attrs(f"{base}/gram{suffix}").get("complete") is not True:
            raise ValueError(f"Gram of {run}/{layer} is not complete")
        g = self.read(f"{base}/gram{suffix}")
        g = np.where(np.isnan(g), g.T, g)  # lower tiles are not stored
        n = g.shape[0]
        try:
            offset = self.read(f"{base}/offset{suffix}")
        except FileNotFoundError:  # a Gram stored unshifted
            offset = np.zeros(n)
        row_mean = self.read(f"{base}/row_mean{suffix}")
        usable = ~np.isnan(row_mean)
        k = g + offset[:, None] + offset[None, :]
        return k, row_mean + offset + offset[usable].mean()

    def gram_vectors(
        self, run: str, layer: str, reduce: str = "flatten"
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """§9.1: ``(row_mean, offset)`` from the Gram's ``vectors`` attribute, or None
        when it carries no copy (then the arrays are the only source)."""
        suffix = "" if reduce == "flatten" else f"_{reduce}"
        copy = self.attrs(f"{run}/_grams/{layer}/gram{suffix}").get("vectors")
        if not isinstance(copy, dict) or copy.get("encoding") != "base64 of float64, little endian":
            return None
        row_mean = np.frombuffer(base64.b64decode(copy["row_mean"]), dtype="<f8")
        offset = np.frombuffer(base64.b64decode(copy["offset"]), dtype="<f8")
        return row_mean, offset

    def gram_digest(self, run: str, layer: str, usable: np.ndarray) -> str:
        """§9.1: ``source.digest`` recomputed from what the run records (its manifest's
        creation id, ``done`` and the fingerprint column of ``unit_record``)."""
        done = self.read(f"{run}/done")
        records = self.read(f"{run}/unit_record")
        creation = self.attrs(run)["vitcnn_store.manifest"]["creation_id"]
        units = [[bool(d), int(records[u, 1])] for u, d in enumerate(done)]
        payload = {
            "creation_id": creation,
            "units": units,
            "usable": hashlib.sha256(np.packbits(usable).tobytes()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def find_result_group(store: SpecStore, run: str, analysis: str, array: str) -> str:
    """§9: the group holding the latest stored result of ``analysis`` with array ``array``.

    Walks ``<run>/_analyses`` by its ``zarr.json`` files (no path below it is assumed):
    a candidate is a group with a child array ``array`` whose ``parameters`` attribute,
    when present, names ``analysis``; of several, the latest ``computed_at`` wins.
    """
    base = store.root / run / "_analyses"
    found: list[tuple[str, str]] = []
    for dirpath, _, files in os.walk(base):
        if "zarr.json" not in files:
            continue
        group = Path(dirpath).relative_to(store.root).as_posix()
        meta = store.metadata(group)
        if meta.get("node_type") != "group" or not (Path(dirpath) / array / "zarr.json").is_file():
            continue
        params = meta.get("attributes", {}).get("parameters")
        if isinstance(params, dict) and params.get("analysis") not in (None, analysis):
            continue
        found.append((str(meta.get("attributes", {}).get("computed_at", "")), group))
    if not found:
        raise KeyError(f"no {analysis} result with a {array!r} array under {run}/_analyses")
    return max(found)[1]
