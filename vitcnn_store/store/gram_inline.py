"""A finished Gram's row means and offsets, kept in the Gram's own ``zarr.json`` too.

A reader must read a Gram's ``zarr.json`` fresh (its ``complete`` flag and source
digest; :func:`vitcnn_store.store.grams.find_grams`), and then needs the Gram's
``row_mean`` and ``offset`` vectors before any tile. On object storage those are
two more requests a Gram. So :func:`~vitcnn_store.store.grams.finish_gram` also
writes both vectors, exactly (float64 bytes, base64), into the Gram's ``vectors``
attribute, in the same write that sets ``complete``: the read that checks the
Gram brings them. The ``row_mean``/``offset`` arrays stay the format's (plain
zarr and xarray read them; older Grams have only them), and are what a reader
uses when the attribute is absent.

Only Grams of at most :data:`INLINE_MAX` images carry the copy (2 × 64 KiB of
float64 then, ~175 kB of text), and the run's and the root's consolidated
metadata leave it out (:func:`lean_entry`): every command reads those snapshots,
only a CKA reads a Gram's own document.

Examples
--------
>>> import numpy as np
>>> attr = encode_vectors(np.array([1.0, np.nan]), np.array([0.5, -2.0]))
>>> row_mean, offset = decode_vectors({VECTORS_ATTR: attr}, 2)
>>> row_mean.tolist()[0], offset.tolist()
(1.0, [0.5, -2.0])
>>> decode_vectors({VECTORS_ATTR: attr}, 3) is None  # another size: not this Gram's
True
>>> decode_vectors({"complete": True}, 2) is None  # an older Gram: read the arrays
True
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "INLINE_MAX",
    "VECTORS_ATTR",
    "decode_vectors",
    "encode_vectors",
    "is_gram",
    "lean_entry",
]

#: The attribute of ``gram`` (``gram_gap``, ...) holding the copy.
VECTORS_ATTR = "vectors"
#: Images up to which a Gram carries the copy.
INLINE_MAX = 8192
_ENCODING = "base64 of float64, little endian"


def _encode(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f8").tobytes()).decode("ascii")


def _decode(text: Any, n: int) -> np.ndarray | None:
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None
    if len(raw) != 8 * n:
        return None
    return np.frombuffer(raw, dtype="<f8").astype(np.float64)


def encode_vectors(row_mean: np.ndarray, offset: np.ndarray | None) -> dict[str, str]:
    """The ``vectors`` attribute of a Gram with these row means and offsets (None: a
    Gram stored unshifted, without offsets)."""
    out = {"encoding": _ENCODING, "row_mean": _encode(row_mean)}
    if offset is not None:
        out["offset"] = _encode(offset)
    return out


def decode_vectors(attrs: Mapping[str, Any], n: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(row_mean, offset)`` from a Gram's attributes (offset None: not stored), or
    None when the Gram carries no readable copy of ``n`` values (then read the arrays)."""
    attr = attrs.get(VECTORS_ATTR)
    if not isinstance(attr, Mapping) or attr.get("encoding") != _ENCODING:
        return None
    row_mean = _decode(attr.get("row_mean"), n)
    if row_mean is None:
        return None
    if "offset" not in attr:
        return row_mean, None
    offset = _decode(attr.get("offset"), n)
    return None if offset is None else (row_mean, offset)


def is_gram(path: str) -> bool:
    """Whether ``path`` (inside a run, or the store) lies in a run's Gram cache."""
    return "/_grams/" in f"/{path}"


def lean_entry(path: str, node: dict[str, Any]) -> dict[str, Any]:
    """A consolidated-metadata entry for the node at ``path`` (inside a run or the
    store): a Gram's without its ``vectors`` copy, any other as it is.

    Examples
    --------
    >>> node = {"node_type": "array", "attributes": {"complete": True, "vectors": {}}}
    >>> lean_entry("_grams/blocks.0/gram", node)["attributes"]
    {'complete': True}
    >>> lean_entry("blocks.0/activation", node) is node
    True
    """
    attrs = node.get("attributes")
    if not is_gram(path) or not isinstance(attrs, dict) or VECTORS_ATTR not in attrs:
        return node
    return {**node, "attributes": {k: v for k, v in attrs.items() if k != VECTORS_ATTR}}
