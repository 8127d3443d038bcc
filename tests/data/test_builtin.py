"""Tests of the built-in image sets (vitcnn_store.data.builtin)."""

from __future__ import annotations

import pickle
import re
import socket
from collections import Counter

import numpy as np
import pytest

from vitcnn_store.data import PHOTO_NAMES, builtin_names, open_image_set
from vitcnn_store.data import builtin as B
from vitcnn_store.errors import ImageDecodeError, ImageSetError


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built-in sets must come from installed package files only."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("built-in sets must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_names() -> None:
    assert builtin_names() == ["digits", "faces", "photos"]
    with pytest.raises(ImageSetError, match=r"'nope'.*digits, faces, photos"):
        open_image_set("builtin:nope")
    with pytest.raises(ImageSetError, match="digits, faces, photos"):
        open_image_set("builtin:")


def test_photos_records() -> None:
    s = open_image_set("builtin:photos")
    assert len(s) == 16 * 24 >= 256
    assert s.label_names == PHOTO_NAMES == tuple(sorted(PHOTO_NAMES))
    assert {"astronaut", "coffee", "chelsea", "rocket", "camera", "china", "flower"} <= set(
        PHOTO_NAMES
    )
    assert Counter(r.label for r in s.records) == dict.fromkeys(range(16), 24)
    ids = [r.image_id for r in s.records]
    assert len(set(ids)) == len(ids)
    for r in s.records:
        m = re.fullmatch(r"photos/(\w+)/(\d\d)", r.image_id)
        assert m and PHOTO_NAMES[r.label] == m.group(1)
        assert r.source == f"builtin:{r.image_id}" and r.size == 0
    # the first records span every photo, so a small `limit` still has all classes
    assert {r.label for r in open_image_set("builtin:photos", limit=16).records} == set(range(16))


def test_photos_load_square_rgb_distinct() -> None:
    s = open_image_set("builtin:photos")
    seen = set()
    for i in range(0, len(s), 5):
        im = s.load(i)
        assert im.mode == "RGB" and im.width == im.height >= 160
        seen.add(np.asarray(im).tobytes())
    assert len(seen) == len(range(0, len(s), 5))  # no two sampled crops identical
    # the 24 crops of one photo differ from each other
    crops = [np.asarray(s.load(i)).tobytes() for i in range(0, len(s), 16)]
    assert len(set(crops)) == 24


def test_photos_deterministic() -> None:
    s = open_image_set("builtin:photos")
    first = [np.asarray(s.load(i)) for i in (0, 17, 383)]
    B._photo.cache_clear()  # regenerated from the package files, not the cache
    for i, a in zip((0, 17, 383), first, strict=True):
        np.testing.assert_array_equal(np.asarray(s.load(i)), a)
    assert open_image_set("builtin:photos").records == s.records


def test_crop_boxes_inside_photo() -> None:
    for h, w in [(512, 512), (300, 451), (1411, 1411), (150, 200)]:
        boxes = {B.photo_crop_box(h, w, k) for k in range(24)}
        assert len(boxes) == 24 or min(h, w) <= 160
        for top, left, side in boxes:
            assert top >= 0 and left >= 0 and top + side <= h and left + side <= w
            assert side >= min(160, h, w)


def test_photos_pickle_small() -> None:
    s = open_image_set("builtin:photos")
    data = pickle.dumps(s)
    assert len(data) < 100_000
    s2 = pickle.loads(data)
    assert s2 == s
    np.testing.assert_array_equal(np.asarray(s2.load(5)), np.asarray(s.load(5)))


def test_faces() -> None:
    import skimage.data

    s = open_image_set("builtin:faces")
    assert len(s) == 200 and s.label_names == ("non-face", "face")
    assert Counter(r.label for r in s.records) == {0: 100, 1: 100}
    assert [(r.image_id, r.label) for r in s.records[:3]] == [
        ("faces/0000", 1),
        ("faces/0100", 0),
        ("faces/0001", 1),
    ]
    assert sorted(r.image_id for r in s.records) == [f"faces/{i:04d}" for i in range(200)]
    src = skimage.data.lfw_subset()
    im = np.asarray(s.load(1))  # faces/0100
    assert im.shape == (25, 25, 3)
    np.testing.assert_array_equal(im[..., 0], im[..., 2])
    np.testing.assert_allclose(im[..., 0] / 255.0, src[100], atol=0.5 / 255 + 1e-9)
    np.testing.assert_array_equal(np.asarray(s.load(1)), im)
    assert s.check_all() == []


def test_digits() -> None:
    from sklearn.datasets import load_digits

    s = open_image_set("builtin:digits")
    d = load_digits()
    assert len(s) == 1797 and s.label_names == tuple("0123456789")
    assert [r.label for r in s.records] == d.target.tolist()
    assert s.records[42].image_id == "digits/0042"
    im = np.asarray(s.load(42))
    assert im.shape == (8, 8, 3) and im.dtype == np.uint8
    np.testing.assert_array_equal(im[..., 1], np.rint(d.images[42] * 255 / 16))
    assert max(int(np.asarray(s.load(i)).max()) for i in range(20)) == 255
    assert len(pickle.dumps(s)) < 100_000


@pytest.mark.parametrize(
    "ref",
    [
        "builtin:photos/astronaut/24",
        "builtin:photos/unicorn/00",
        "builtin:photos/astronaut",
        "builtin:faces/0200",
        "builtin:faces/-1",
        "builtin:digits/x",
        "builtin:other/1",
    ],
)
def test_bad_reference(ref: str) -> None:
    with pytest.raises(ImageDecodeError, match="unknown built-in image"):
        B.load_builtin(ref)
