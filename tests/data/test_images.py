"""Tests of vitcnn_store.data.images: folders, manifests, decoding, hashing, pickling."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vitcnn_store.data import ImageRecord, ImageSet, load_image, open_image_set
from vitcnn_store.errors import ImageDecodeError, ImageSetError


def _png(path: Path, color: int | tuple[int, ...] = 128, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (6, 4), color).save(path)
    return path


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


# -- folders -------------------------------------------------------------------------


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "set"
    _png(root / "dog" / "b.png")
    _png(root / "cat" / "sub" / "deep.PNG")  # recursive, extension case-insensitive
    Image.new("RGB", (5, 5)).save(root / "cat" / "a.jpg")
    _png(root / "cat" / ".hidden.png")  # hidden file
    _png(root / ".cache" / "x.png")  # hidden folder
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "data.npy").write_bytes(b"\x93NUMPY")
    return root


def test_folder_with_class_subfolders(class_folder: Path) -> None:
    s = open_image_set(str(class_folder))
    assert [r.image_id for r in s.records] == ["cat/a.jpg", "cat/sub/deep.PNG", "dog/b.png"]
    assert [r.label for r in s.records] == [0, 0, 1]
    assert s.label_names == ("cat", "dog")
    assert s.spec == str(class_folder)
    for r in s.records:
        assert Path(r.source).is_absolute()
        assert r.size == Path(r.source).stat().st_size > 0
        assert Path(r.source) == class_folder / r.image_id
    assert len(s) == 3
    assert s.load(1).mode == "RGB"


def test_folder_without_classes(tmp_path: Path) -> None:
    _png(tmp_path / "top.png")
    _png(tmp_path / "a" / "x.bmp")
    _png(tmp_path / "a" / "y.tif")
    s = open_image_set(str(tmp_path))
    assert [r.image_id for r in s.records] == ["a/x.bmp", "a/y.tif", "top.png"]
    assert {r.label for r in s.records} == {-1}
    assert s.label_names == ()


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageSetError, match="does not exist"):
        open_image_set(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    _png(tmp_path / "empty" / ".hidden.png")
    with pytest.raises(ImageSetError, match=r"no images in folder .*empty.*\.png"):
        open_image_set(str(tmp_path / "empty"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ImageSetError, match=r"not a folder or a manifest.*builtin:NAME"):
        open_image_set(str(tmp_path / "x.json"))


def test_limit(class_folder: Path) -> None:
    s = open_image_set(str(class_folder), limit=2)
    assert [r.image_id for r in s.records] == ["cat/a.jpg", "cat/sub/deep.PNG"]
    assert s.label_names == ("cat", "dog")
    assert len(open_image_set(str(class_folder), limit=100)) == 3
    for bad in (0, -3):
        with pytest.raises(ImageSetError, match="limit"):
            open_image_set(str(class_folder), limit=bad)


# -- manifests -----------------------------------------------------------------------


def test_manifest_int_labels_relative_and_absolute(tmp_path: Path) -> None:
    a = _png(tmp_path / "imgs" / "a.png")
    b = _png(tmp_path / "elsewhere" / "b.png")
    m = tmp_path / "lists" / "m.csv"
    m.parent.mkdir()
    m.write_text(f"# a comment\n\n../imgs/a.png, 3\n{b},0\n  # indented comment\n")
    s = open_image_set(str(m))
    assert [r.image_id for r in s.records] == ["../imgs/a.png", str(b)]
    assert [r.label for r in s.records] == [3, 0]
    assert [Path(r.source) for r in s.records] == [a, b]
    assert s.label_names == ()
    assert s.load(0).size == (6, 4)


def test_manifest_header_no_labels_keeps_order(tmp_path: Path) -> None:
    for n in ("z.png", "a.png"):
        _png(tmp_path / n)
    m = tmp_path / "m.txt"
    m.write_text("path,label\nz.png\na.png,\n")
    s = open_image_set(str(m))
    assert [r.image_id for r in s.records] == ["z.png", "a.png"]  # manifest order
    assert [r.label for r in s.records] == [-1, -1]
    (tmp_path / "h.csv").write_text("Path\nz.png\n")
    assert [r.image_id for r in open_image_set(str(tmp_path / "h.csv")).records] == ["z.png"]


def test_manifest_class_names_and_tsv(tmp_path: Path) -> None:
    m = tmp_path / "m.tsv"
    m.write_text("path\tlabel\na, b.png\tzebra\nc.png\tant\nd.png\n")
    s = open_image_set(str(m))
    assert [r.image_id for r in s.records] == ["a, b.png", "c.png", "d.png"]
    assert s.label_names == ("ant", "zebra")
    assert [r.label for r in s.records] == [1, 0, -1]


def test_manifest_missing_file_fails_at_load(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("nothere.png,1\n")
    s = open_image_set(str(m))
    assert s.records[0].size == 0
    with pytest.raises(ImageDecodeError, match="file not found"):
        s.load(0)
    assert s.check_all() == [(0, "file not found")]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a.png,1\nb.png,cat\n", "line 2: label 'cat'"),
        ("# c\na.png,cat\n\nb.png,1\n", "line 4: label '1'"),
        ("a.png,1\nb.png,1,extra\n", "line 2: expected path\\[,label\\], got 3 columns"),
        ("a.png,1\na.png,2\n", "line 2: duplicate path 'a.png' \\(first on line 1\\)"),
        ("a.png,-2\n", "line 1: negative label"),
        (",1\n", "line 1: empty path"),
        ("# only comments\n\n", "lists no images"),
        ("path,label\n", "lists no images"),
    ],
)
def test_bad_manifest(tmp_path: Path, text: str, match: str) -> None:
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(ImageSetError, match=match):
        open_image_set(str(m))


# -- decoding ------------------------------------------------------------------------


def test_decode_modes(tmp_path: Path) -> None:
    gray = load_image(_encode(Image.new("L", (3, 2), 77), "PNG"))
    assert gray.mode == "RGB" and gray.size == (3, 2) and gray.getpixel((0, 0)) == (77, 77, 77)

    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))  # fully transparent: composited onto black
    out = load_image(_encode(rgba, "PNG"))
    assert out.getpixel((0, 0)) == (200, 100, 50) and out.getpixel((1, 0)) == (0, 0, 0)
    la = load_image(_encode(Image.new("LA", (1, 1), (200, 128)), "PNG"))
    assert la.getpixel((0, 0)) == (100, 100, 100)

    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_image(_encode(pal, "PNG")).getpixel((1, 1)) == (10, 200, 30)
    assert load_image(_encode(pal, "PNG", transparency=1)).getpixel((1, 1)) == (0, 0, 0)

    cmyk = load_image(_encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF"))
    assert cmyk.getpixel((0, 0)) == (255, 0, 0)
    assert load_image(_encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG")).mode == "RGB"
    one = load_image(_encode(Image.new("1", (2, 2), 1), "BMP"))
    assert one.getpixel((0, 0)) == (255, 255, 255)

    path = tmp_path / "y.jpg"  # decoding from a path, YCbCr-encoded JPEG
    Image.new("RGB", (9, 9), (0, 0, 255)).save(path)
    r, g, b = np.asarray(load_image(path))[4, 4].tolist()
    assert b > 200 and r < 30 and g < 30


def test_decode_high_bit_depth() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = np.asarray(load_image(data))
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])

    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)  # unit-range float
    np.testing.assert_array_equal(
        np.asarray(load_image(_encode(Image.fromarray(f), "TIFF")))[0, :, 0], [0, 128, 255]
    )
    wide = np.array([[-10, 0, 10]], dtype=np.int32)  # beyond 16 bit: min-max scaled
    np.testing.assert_array_equal(
        np.asarray(load_image(_encode(Image.fromarray(wide), "TIFF")))[0, :, 0],
        [0, 128, 255],
    )


def test_exif_orientation_applied() -> None:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90° clockwise
    out = load_image(_encode(im, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("P", (4, 4), i) for i in (1, 2)]
    for fr in frames:
        fr.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(data).getpixel((0, 0)) == (255, 0, 0)


def test_bad_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _encode(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG")
    cases = {
        "zero.png": (b"", "zero-byte file"),
        "trunc.jpg": (good[: len(good) // 2], "truncated image file"),
        "text.png": (b"certainly not an image", "not an image (cannot identify image file)"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageDecodeError) as e:
            load_image(tmp_path / name)
        assert str(e.value) == reason
    with pytest.raises(ImageDecodeError, match="zero-byte file"):
        load_image(b"")
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "nope.png")

    bomb = _encode(Image.new("L", (100, 100)), "PNG")  # 10000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # PIL only warns below 2x limit
    with pytest.raises(ImageDecodeError, match=r"^decompression bomb: 10000 pixels > limit"):
        load_image(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above 2x limit
    with pytest.raises(ImageDecodeError, match=r"^decompression bomb: 10000 pixels > limit"):
        load_image(bomb)


def test_check_all_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _png(tmp_path / "a_ok.png")
    (tmp_path / "b_empty.png").write_bytes(b"")
    (tmp_path / "c_text.jpg").write_bytes(b"hello")
    _png(tmp_path / "d_big.png", mode="RGB", color=(1, 2, 3))
    Image.new("L", (50, 50)).save(tmp_path / "e_bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    s = open_image_set(str(tmp_path))
    failures = s.check_all(progress=True)
    assert [i for i, _ in failures] == [1, 2, 4]
    assert failures[0][1] == "zero-byte file"
    assert failures[1][1].startswith("not an image")
    assert failures[2][1].startswith("decompression bomb: 2500 pixels")
    assert "checking" in capsys.readouterr().err


# -- hashing and pickling ------------------------------------------------------------


def test_pickle_round_trip(class_folder: Path, tmp_path: Path) -> None:
    s = open_image_set(str(class_folder))
    s2 = pickle.loads(pickle.dumps(s))
    assert s2 == s
    np.testing.assert_array_equal(np.asarray(s2.load(2)), np.asarray(s.load(2)))
    m = tmp_path / "m.csv"  # sources with no shared prefix
    m.write_text(f"{class_folder}/dog/b.png,1\n../tmp/x.png,0\n")
    s = open_image_set(str(m))
    assert pickle.loads(pickle.dumps(s)) == s
    empty = ImageSet("e", ())
    assert pickle.loads(pickle.dumps(empty)) == empty


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)


@given(
    st.lists(st.tuples(_text, st.integers(-1, 10**6), _text, st.integers(0, 2**40)), max_size=8),
    st.lists(_text, max_size=3),
)
def test_pickle_round_trip_any_records(
    rows: list[tuple[str, int, str, int]], names: list[str]
) -> None:
    s = ImageSet("spec", tuple(ImageRecord(*r) for r in rows), tuple(names))
    assert pickle.loads(pickle.dumps(s)) == s


def test_file_name_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    """A name with bytes that are not UTF-8 cannot be a stored image id: one line naming it."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "good.png")
    data = (folder / "good.png").read_bytes()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:  # latin-1 é
        f.write(data)
    with pytest.raises(ImageSetError, match=r"caf\\\\xe9\.png.* is not valid UTF-8") as e:
        open_image_set(str(folder))
    assert "\n" not in str(e.value)
