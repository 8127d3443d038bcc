"""Built-in image sets, made only from files shipped inside scikit-image and scikit-learn.

Nothing is downloaded: every source below is read from the installed packages
(scikit-image functions that would need ``pooch`` downloads are not used). Records
carry a ``"builtin:<image_id>"`` reference instead of pixels; :func:`load_builtin`
regenerates the pixels deterministically and caches the source arrays per process.

========  =====  =============================================================
name      n      content
========  =====  =============================================================
photos    384    24 square crops (4 scales × 6 positions, side ≥ 160 px) of each
                 of 16 photographs; label = photo (:data:`PHOTO_NAMES`)
faces     200    ``skimage.data.lfw_subset()`` 25×25 gray; label 1 = face, 0 = not
digits    1797   ``sklearn.datasets.load_digits()`` 8×8 gray scaled to 0..255; 0–9
========  =====  =============================================================

Records are ordered so that the first N (``limit``) are spread over all classes:
photos go crop by crop across photos (``photos/astronaut/00``,
``photos/brick/00``, ...), faces alternate face / non-face (``faces/0000``,
``faces/0100``, ``faces/0001``, ...); ids keep the index in the source array.

Examples
--------
>>> from vitcnn_store.data import open_image_set
>>> s = open_image_set("builtin:faces")
>>> len(s), s.label_names, s.records[1].image_id, s.records[1].label
(200, ('non-face', 'face'), 'faces/0100', 0)
>>> s.load(0).mode
'RGB'
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from PIL import Image

from vitcnn_store.data.records import ImageRecord
from vitcnn_store.errors import ImageDecodeError, ImageSetError

__all__ = ["PHOTO_NAMES", "builtin_names", "builtin_records", "load_builtin", "photo_crop_box"]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return np.asarray(getattr(skimage.data, name)())

    return load


def _motorcycle() -> np.ndarray:
    import skimage.data

    return np.asarray(skimage.data.stereo_motorcycle()[0])  # left view of the stereo pair


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(filename))

    return load


# Real photographs bundled with the installed packages (checked offline), sorted by
# name: the label of a crop is the index here. Drawings (logo, horse, colorwheel),
# scans of text and images needing optional downloads are left out.
_PHOTO_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "brick": _skimage("brick"),
    "camera": _skimage("camera"),
    "chelsea": _skimage("chelsea"),
    "china": _sklearn("china.jpg"),
    "coffee": _skimage("coffee"),
    "coins": _skimage("coins"),
    "flower": _sklearn("flower.jpg"),
    "grass": _skimage("grass"),
    "gravel": _skimage("gravel"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "moon": _skimage("moon"),
    "motorcycle": _motorcycle,
    "retina": _skimage("retina"),
    "rocket": _skimage("rocket"),
}
#: Source photographs of ``builtin:photos``; index = label.
PHOTO_NAMES: tuple[str, ...] = tuple(_PHOTO_LOADERS)

# Crop geometry in integers only, so boxes are identical on every platform.
_CROP_SCALES_PCT = (90, 75, 60, 45)  # side as % of the photo's short side
_CROP_POSITIONS_Q = ((2, 2), (0, 0), (4, 0), (0, 4), (4, 4), (2, 0))  # (x, y) in quarters
_MIN_SIDE = 160
_CROPS_PER_PHOTO = len(_CROP_SCALES_PCT) * len(_CROP_POSITIONS_Q)


@functools.cache
def _photo(name: str) -> np.ndarray:
    """The full photo as a read-only (H, W, 3) uint8 array, cached per process."""
    a = _PHOTO_LOADERS[name]()
    if a.ndim == 2:
        a = np.stack([a, a, a], axis=-1)
    a = np.ascontiguousarray(a[..., :3], dtype=np.uint8)
    a.setflags(write=False)
    return a


def photo_crop_box(height: int, width: int, k: int) -> tuple[int, int, int]:
    """Crop ``k`` of a ``height``×``width`` photo as ``(top, left, side)``.

    Crops go scale-major: k // 6 picks the side (90, 75, 60, 45 % of the short side,
    never below 160 px unless the photo is smaller), k % 6 the position (centre,
    four corners, top-centre).

    Examples
    --------
    >>> photo_crop_box(512, 512, 0), photo_crop_box(300, 451, 23)
    ((26, 26, 460), (0, 145, 160))
    """
    short = min(height, width)
    side = max(short * _CROP_SCALES_PCT[k // len(_CROP_POSITIONS_Q)] // 100, min(short, _MIN_SIDE))
    qx, qy = _CROP_POSITIONS_Q[k % len(_CROP_POSITIONS_Q)]
    return (height - side) * qy // 4, (width - side) * qx // 4, side


@functools.lru_cache(maxsize=1)
def _faces() -> np.ndarray:
    import skimage.data

    # float64 in [0, 1] as shipped (despite its docstring saying uint8)
    a = np.clip(np.rint(np.asarray(skimage.data.lfw_subset()) * 255.0), 0, 255)
    out = a.astype(np.uint8)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # values are integers 0..16
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images.setflags(write=False)
    return images, np.asarray(d.target, dtype=np.int64)


Records = tuple[tuple[ImageRecord, ...], tuple[str, ...]]


def _photos_set() -> Records:
    records = [
        ImageRecord(f"photos/{name}/{k:02d}", label, f"builtin:photos/{name}/{k:02d}", 0)
        for k in range(_CROPS_PER_PHOTO)
        for label, name in enumerate(PHOTO_NAMES)
    ]
    return tuple(records), PHOTO_NAMES


def _faces_set() -> Records:
    n = len(_faces())
    half = n // 2  # skimage: the first 100 images are faces, the last 100 non-faces
    order = [i for pair in zip(range(half), range(half, n), strict=True) for i in pair]
    records = [
        ImageRecord(f"faces/{i:04d}", 1 if i < half else 0, f"builtin:faces/{i:04d}", 0)
        for i in order
    ]
    return tuple(records), ("non-face", "face")


def _digits_set() -> Records:
    _, target = _digits()
    records = [
        ImageRecord(f"digits/{i:04d}", int(t), f"builtin:digits/{i:04d}", 0)
        for i, t in enumerate(target)
    ]
    return tuple(records), tuple(str(d) for d in range(10))


_SETS: dict[str, Callable[[], Records]] = {
    "digits": _digits_set,
    "faces": _faces_set,
    "photos": _photos_set,
}


def builtin_names() -> list[str]:
    """Names of the built-in sets, for ``builtin:NAME``.

    Examples
    --------
    >>> builtin_names()
    ['digits', 'faces', 'photos']
    """
    return sorted(_SETS)


def builtin_records(spec: str) -> Records:
    """Records and label names of ``builtin:NAME`` (no pixels are read; see :func:`load_builtin`).

    Raises
    ------
    ImageSetError
        Unknown name; the message lists the known ones.
    """
    name = spec.removeprefix("builtin:")
    if name not in _SETS:
        raise ImageSetError(
            f"unknown built-in image set {name!r}: expected builtin:NAME with NAME one of "
            f"{', '.join(builtin_names())}"
        )
    return _SETS[name]()


def load_builtin(ref: str) -> Image.Image:
    """Regenerate one built-in image from its ``"builtin:<image_id>"`` reference.

    Examples
    --------
    >>> load_builtin("builtin:photos/astronaut/00").size
    (460, 460)
    """
    parts = ref.removeprefix("builtin:").split("/")
    try:
        if parts[0] == "photos" and len(parts) == 3 and parts[1] in _PHOTO_LOADERS:
            photo = _photo(parts[1])
            k = int(parts[2]) if parts[2].isdigit() else -1
            if not 0 <= k < _CROPS_PER_PHOTO:
                raise IndexError(k)
            top, left, side = photo_crop_box(photo.shape[0], photo.shape[1], k)
            return Image.fromarray(photo[top : top + side, left : left + side])
        if parts[0] in ("faces", "digits") and len(parts) == 2 and parts[1].isdigit():
            stack = _faces() if parts[0] == "faces" else _digits()[0]
            gray = stack[int(parts[1])]
            return Image.fromarray(np.stack([gray, gray, gray], axis=-1))
    except (ValueError, IndexError):
        pass
    raise ImageDecodeError(f"unknown built-in image reference {ref!r}")
