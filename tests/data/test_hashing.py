"""Per-image content hashes: file bytes, built-in pixels, and the image-set hash over them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from vitcnn_store.data import hash_images, image_set_sha256, open_image_set
from vitcnn_store.data.builtin import load_builtin
from vitcnn_store.data.hashing import sha256_file, sha256_source


def test_file_hash_is_sha256_of_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # > one read block
    (tmp_path / "a.bin").write_bytes(data)
    assert sha256_file(str(tmp_path / "a.bin")) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(tmp_path / "missing.png")) == ""


def test_builtin_hash_is_sha256_of_decoded_pixels() -> None:
    ref = "builtin:faces/0003"
    pixels = np.asarray(load_builtin(ref))
    assert pixels.dtype == np.uint8 and pixels.shape[-1] == 3
    assert sha256_source(ref) == hashlib.sha256(pixels.tobytes()).hexdigest()


def test_folder_hashes_in_order_and_sensitive_to_content(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / f"{i:02d}.bmp"
        )
    s = open_image_set(str(tmp_path))
    threaded = hash_images(s, threads=8)
    assert threaded == hash_images(s, threads=1)
    assert threaded == [sha256_file(r.source) for r in s.records]
    set_hash = image_set_sha256(s, threaded)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "07.bmp")
    again = open_image_set(str(tmp_path))
    assert again.records == s.records  # ids, labels and sizes alike...
    assert image_set_sha256(again, hash_images(again)) != set_hash  # ...content is not


def test_load_hashed_hashes_the_bytes_it_decodes(tmp_path: Path) -> None:
    """The hash a worker compares is that of the very bytes it decoded, and equals the
    planning hash of an unchanged file or built-in image."""
    rng = np.random.default_rng(2)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    s = open_image_set(str(tmp_path))
    image, digest = s.load_hashed(0)
    assert digest == sha256_file(s.records[0].source) == hash_images(s)[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(s.load(0)))
    faces = open_image_set("builtin:faces", limit=2)
    image, digest = faces.load_hashed(1)
    assert digest == sha256_source(faces.records[1].source)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(faces.load(1)))
