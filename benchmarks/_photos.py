"""A folder of real JPEG photographs for the benchmarks (no download: the built-in set)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def photo_folder(n: int) -> str:
    """A folder of ``n`` JPEG photographs (``builtin:photos`` crops saved at quality 90).

    Made once per machine under the temp folder, then reused.
    """
    from vitcnn_store.data import open_image_set

    folder = Path(tempfile.gettempdir()) / f"vitcnn-bench-photos-{n}"
    if not folder.exists() or len(list(folder.glob("*.jpg"))) < n:
        folder.mkdir(exist_ok=True)
        images = open_image_set("builtin:photos", limit=n)
        for i in range(n):
            images.load(i).save(folder / f"{i:04d}.jpg", quality=90)
    return str(folder)
