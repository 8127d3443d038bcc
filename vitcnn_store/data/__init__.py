"""Image data: decoding image files and opening image sets.

This layer knows image files, manifests and built-in sets — not models, torch,
zarr or Ray. An image set is opened from what the user typed (a folder, a
``path[,label]`` manifest, or ``builtin:NAME``) into an :class:`ImageSet`: a
picklable list of :class:`ImageRecord` (id, label, source, size) whose images
are decoded to 8-bit RGB on demand by :meth:`ImageSet.load` and hashed by
:meth:`ImageSet.content_hashes`. Modules import one way:
``records`` ← ``decode``, ``builtin`` ← ``imageset``, ``hashing`` ← ``images``.

Examples
--------
>>> from vitcnn_store.data import builtin_names, open_image_set
>>> builtin_names()
['digits', 'faces', 'photos']
>>> s = open_image_set("builtin:photos", limit=16)
>>> len(s), s.records[0].image_id, s.load(0).mode
(16, 'photos/astronaut/00', 'RGB')
"""

from vitcnn_store.data.builtin import PHOTO_NAMES, builtin_names
from vitcnn_store.data.decode import load_image
from vitcnn_store.data.hashing import hash_images, image_set_sha256
from vitcnn_store.data.images import IMAGE_EXTENSIONS, MANIFEST_EXTENSIONS, open_image_set
from vitcnn_store.data.imageset import ImageSet
from vitcnn_store.data.records import ImageRecord

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "PHOTO_NAMES",
    "ImageRecord",
    "ImageSet",
    "builtin_names",
    "hash_images",
    "image_set_sha256",
    "load_image",
    "open_image_set",
]
