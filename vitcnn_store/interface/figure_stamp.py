"""Which stored result a figure shows, recorded in the PNG itself.

Each figure of a result is stamped with what it was drawn from (a PNG ``tEXt``
chunk, keyword ``vitcnn_store.result``): the result's group, the digest of its
stored arrays, when it was computed, and the version of the plotting code
(:data:`vitcnn_store.interface.plots.PLOTS_VERSION`). ``vitcnn analyze`` and
``vitcnn report`` keep a figure whose stamp matches the result they would draw
(an analysis that reuses its result then imports no matplotlib); a missing,
unstamped or differently stamped figure is drawn again. The stamp is written by
the PNG encoder with the figure (:func:`stamp_text`) and read back here with
plain PNG chunk parsing: no imaging library.

Examples
--------
>>> import tempfile, pathlib
>>> png = pathlib.Path(tempfile.mkdtemp()) / "f.png"
>>> stamp = {"group": "v/_analyses/cka/abc", "digest": "sha256:00"}
>>> from PIL import Image, PngImagePlugin  # written as plots._save writes figures
>>> info = PngImagePlugin.PngInfo()
>>> info.add_text(STAMP_KEYWORD.decode("latin-1"), stamp_text(stamp))
>>> Image.new("RGB", (2, 2)).save(png, format="PNG", pnginfo=info)
>>> read_stamp(png)
{'digest': 'sha256:00', 'group': 'v/_analyses/cka/abc'}
>>> read_stamp(png.with_name("missing.png")) is None
True
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

__all__ = ["STAMP_KEYWORD", "read_stamp", "stamp_text"]

#: ``tEXt`` keyword of the stamp.
STAMP_KEYWORD = b"vitcnn_store.result"
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunks(raw: bytes) -> list[tuple[bytes, bytes]]:
    """``(kind, data)`` of each chunk of PNG bytes ``raw``."""
    if not raw.startswith(_SIGNATURE):
        raise ValueError("not a PNG")
    out, at = [], len(_SIGNATURE)
    while at + 12 <= len(raw):
        (length,) = struct.unpack(">I", raw[at : at + 4])
        kind = raw[at + 4 : at + 8]
        end = at + 12 + length
        out.append((kind, raw[at + 8 : at + 8 + length]))
        at = end
        if kind == b"IEND":
            break
    return out


def read_stamp(path: str | Path) -> dict[str, Any] | None:
    """The stamp of the PNG at ``path``; None when it is missing, unreadable or unstamped."""
    try:
        raw = Path(path).read_bytes()
        for kind, data in _chunks(raw):
            if kind == b"tEXt" and data.startswith(STAMP_KEYWORD + b"\0"):
                stamp = json.loads(data[len(STAMP_KEYWORD) + 1 :].decode("latin-1"))
                return stamp if isinstance(stamp, dict) else None
    except (OSError, ValueError, struct.error):
        return None
    return None


def stamp_text(stamp: dict[str, Any]) -> str:
    """The text of the ``tEXt`` chunk that records ``stamp`` (plain JSON, ASCII)."""
    return json.dumps(stamp, sort_keys=True, separators=(",", ":"))
