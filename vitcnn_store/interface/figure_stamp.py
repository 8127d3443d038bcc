"""Which stored result a figure shows, recorded in the PNG itself.

``vitcnn analyze`` stamps each figure it draws with the result's group and the
digest of its stored arrays (a PNG ``tEXt`` chunk, keyword
``vitcnn_store.result``). A rerun that reuses the result finds the stamp and
leaves the figure alone: nothing is redrawn and matplotlib is not imported. A
missing, unstamped or differently stamped figure is drawn again. Plain PNG
chunk reading and writing (zlib's crc32): no imaging library.

Examples
--------
>>> import tempfile, pathlib
>>> png = pathlib.Path(tempfile.mkdtemp()) / "f.png"
>>> _ = png.write_bytes(_SIGNATURE + _chunk(b"IHDR", bytes(13)) + _chunk(b"IEND", b""))
>>> stamp_figure(png, {"group": "v/_analyses/cka/abc", "digest": "sha256:00"})
>>> read_stamp(png)
{'digest': 'sha256:00', 'group': 'v/_analyses/cka/abc'}
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

__all__ = ["STAMP_KEYWORD", "read_stamp", "stamp_figure"]

#: ``tEXt`` keyword of the stamp.
STAMP_KEYWORD = b"vitcnn_store.result"
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _chunks(raw: bytes) -> list[tuple[bytes, bytes, int, int]]:
    """``(kind, data, start, end)`` of each chunk of PNG bytes ``raw``."""
    if not raw.startswith(_SIGNATURE):
        raise ValueError("not a PNG")
    out, at = [], len(_SIGNATURE)
    while at + 12 <= len(raw):
        (length,) = struct.unpack(">I", raw[at : at + 4])
        kind = raw[at + 4 : at + 8]
        end = at + 12 + length
        out.append((kind, raw[at + 8 : at + 8 + length], at, end))
        at = end
        if kind == b"IEND":
            break
    return out


def read_stamp(path: str | Path) -> dict[str, Any] | None:
    """The stamp of the PNG at ``path``; None when it is missing, unreadable or unstamped."""
    try:
        raw = Path(path).read_bytes()
        for kind, data, _, _ in _chunks(raw):
            if kind == b"tEXt" and data.startswith(STAMP_KEYWORD + b"\0"):
                stamp = json.loads(data[len(STAMP_KEYWORD) + 1 :].decode("latin-1"))
                return stamp if isinstance(stamp, dict) else None
    except (OSError, ValueError, struct.error):
        return None
    return None


def stamp_figure(path: str | Path, stamp: dict[str, Any]) -> None:
    """Record ``stamp`` (plain JSON) in the PNG at ``path``, after its header chunk,
    replacing an earlier stamp; the file is replaced whole (written beside it, renamed)."""
    path = Path(path)
    raw = path.read_bytes()
    chunks = _chunks(raw)
    text = json.dumps(stamp, sort_keys=True, separators=(",", ":")).encode("latin-1")
    kept = [
        raw[s:e]
        for kind, data, s, e in chunks
        if not (kind == b"tEXt" and data.startswith(STAMP_KEYWORD + b"\0"))
    ]
    ours = _chunk(b"tEXt", STAMP_KEYWORD + b"\0" + text)
    tmp = path.with_name(f".{path.name}.stamp")
    tmp.write_bytes(_SIGNATURE + kept[0] + ours + b"".join(kept[1:]))
    tmp.replace(path)
