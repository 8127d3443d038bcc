"""Content hashes of images: what ``--resume`` compares to refuse changed images.

A file's hash is the sha256 of its bytes; a built-in image's is the sha256 of its
decoded pixels (8-bit RGB, row-major ``(height, width, 3)``). Files are hashed
on a thread pool: :mod:`hashlib` releases the GIL while it hashes, so reading
and hashing overlap across files. An unreadable file hashes to ``""`` (it fails
later, at decode, and is recorded then).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from vitcnn_store.data.builtin import load_builtin
from vitcnn_store.errors import ImageDecodeError

if TYPE_CHECKING:
    from PIL import Image

    from vitcnn_store.data.imageset import ImageSet

__all__ = [
    "DEFAULT_THREADS",
    "hash_images",
    "image_set_sha256",
    "sha256_file",
    "sha256_pixels",
    "sha256_source",
]

DEFAULT_THREADS = 8  # I/O-bound: more threads than cores keep a disk or NFS busy
_BLOCK = 1 << 20


def sha256_file(path: str) -> str:
    """sha256 hex digest of a file's bytes; ``""`` if it cannot be read.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = pathlib.Path(folder, "a.bin")
    ...     _ = path.write_bytes(b"abc")
    ...     sha256_file(str(path))[:16], sha256_file(folder + "/missing")
    ('ba7816bf8f01cfea', '')
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def sha256_pixels(image: Image.Image) -> str:
    """sha256 hex digest of an image's 8-bit RGB pixels, row-major ``(height, width, 3)``:
    the content hash of a built-in image."""
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return hashlib.sha256(pixels.tobytes()).hexdigest()


def sha256_source(source: str) -> str:
    """The content hash of one record's source: a file path or a ``builtin:`` reference."""
    if source.startswith("builtin:"):
        try:
            return sha256_pixels(load_builtin(source))
        except ImageDecodeError:
            return ""
    return sha256_file(source)


def hash_images(
    image_set: ImageSet, *, threads: int = DEFAULT_THREADS, progress: bool = False
) -> list[str]:
    """Content hash of every image of ``image_set``, in order."""
    sources = [r.source for r in image_set.records]
    bar = None
    if progress and len(sources) > 1000:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(sources),
            unit="img",
            desc="hashing images",
            file=sys.stderr,
            dynamic_ncols=True,
        )
    out: list[str] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for digest in pool.map(sha256_source, sources, chunksize=64):
            out.append(digest)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out


def image_set_sha256(image_set: ImageSet, hashes: Sequence[str]) -> str:
    """sha256 over ``(image_id, label, image_sha256)`` of every image, in order.

    Each image contributes ``json.dumps([image_id, label, image_sha256])`` plus a
    newline, UTF-8 encoded: the same on every machine. It changes when any image
    is renamed, relabelled, reordered, added, removed or edited.
    """
    h = hashlib.sha256()
    for record, digest in zip(image_set.records, hashes, strict=True):
        h.update(json.dumps([record.image_id, record.label, digest], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()
