"""Image sets as data: :class:`ImageRecord` (id, label, source, size) and :class:`ImageSet`.

An :class:`ImageSet` is a list of records — never the pixels — so it pickles
small and ships cheaply to worker processes, which decode images with
:meth:`ImageSet.load` (files through :mod:`~vitcnn_store.data.decode`, built-in
references through :mod:`~vitcnn_store.data.builtin`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vitcnn_store.data.builtin import load_builtin
from vitcnn_store.data.decode import load_image, read_image_file
from vitcnn_store.data.records import ImageRecord
from vitcnn_store.errors import ImageDecodeError

__all__ = ["ImageRecord", "ImageSet"]


def _rebuild_image_set(
    spec: str,
    ids: tuple[str, ...],
    labels: tuple[int, ...],
    sources: str | tuple[str, ...],
    sizes: tuple[int, ...],
    label_names: tuple[str, ...],
) -> ImageSet:
    if isinstance(sources, str):  # shared prefix: source == prefix + image_id
        sources = tuple(sources + i for i in ids)
    records = tuple(map(ImageRecord, ids, labels, sources, sizes))
    return ImageSet(spec, records, label_names)


@dataclass(frozen=True)
class ImageSet:
    """An ordered, labelled list of images; see :func:`open_image_set`.

    Examples
    --------
    >>> s = ImageSet("demo", (ImageRecord("a", 0, "builtin:digits/0000", 0),), ("zero",))
    >>> len(s), s.records[0].image_id
    (1, 'a')
    >>> s.load(0).size
    (8, 8)
    """

    spec: str
    records: tuple[ImageRecord, ...]
    label_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled column-wise, and when every source is one prefix + its id (folders,
        # built-ins) the prefix is stored once: a 50k-image folder pickles to about
        # the size of its ids, which matters because every Ray worker receives it.
        recs = self.records
        ids = tuple(r.image_id for r in recs)
        sources: str | tuple[str, ...] = tuple(r.source for r in recs)
        if recs and recs[0].source.endswith(recs[0].image_id):
            prefix = recs[0].source[: len(recs[0].source) - len(recs[0].image_id)]
            if all(r.source == prefix + r.image_id for r in recs):
                sources = prefix
        cols = (ids, tuple(r.label for r in recs), sources, tuple(r.size for r in recs))
        return (_rebuild_image_set, (self.spec, *cols, self.label_names))

    def load(self, index: int) -> Image.Image:
        """Decode image ``index`` as an 8-bit RGB :class:`PIL.Image.Image`.

        Raises
        ------
        ImageDecodeError
            The file is missing, empty, truncated, not an image or too large.
        """
        source = self.records[index].source
        if source.startswith("builtin:"):
            return load_builtin(source)
        return load_image(source)

    def load_hashed(self, index: int) -> tuple[Image.Image, str]:
        """Decode image ``index`` and return it with the content hash of what was decoded.

        A file is read once: its bytes are hashed and decoded from that one copy, so
        the hash is that of the pixels returned even if the file changes meanwhile
        (the worker compares it with the hash the run recorded at planning).

        Raises
        ------
        ImageDecodeError
            As :meth:`load`.
        """
        from vitcnn_store.data.hashing import sha256_pixels

        source = self.records[index].source
        if source.startswith("builtin:"):
            image = load_builtin(source)
            return image, sha256_pixels(image)
        data = read_image_file(source)
        return load_image(data), hashlib.sha256(data).hexdigest()

    def content_hashes(self, *, threads: int = 8, progress: bool = False) -> list[str]:
        """Per image: sha256 of the file's bytes (built-ins: of the decoded pixels).

        See :mod:`vitcnn_store.data.hashing`; ``""`` for files that cannot be read.
        """
        from vitcnn_store.data.hashing import hash_images

        return hash_images(self, threads=threads, progress=progress)

    def check_all(self, progress: bool = False) -> list[tuple[int, str]]:
        """Decode every image; return ``(index, reason)`` for each that fails.

        Parameters
        ----------
        progress : bool
            Show a tqdm progress bar on stderr.
        """
        indices: Any = range(len(self))
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc=f"checking {self.spec}", unit="img")
        failures = []
        for i in indices:
            try:
                self.load(i)
            except ImageDecodeError as e:
                failures.append((i, str(e)))
        return failures
