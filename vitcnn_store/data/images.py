"""Decoding images and opening image sets (folders, manifests, built-in sets).

An :class:`ImageSet` is a list of :class:`ImageRecord` — ids, labels and where the
pixels come from — never the pixels themselves, so it pickles small and ships
cheaply to worker processes, which decode images with :meth:`ImageSet.load`.

Examples
--------
>>> import tempfile, pathlib
>>> from PIL import Image
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> for cls in ("cat", "dog"):
...     (root / cls).mkdir()
...     Image.new("L", (8, 8), 50).save(root / cls / "a.png")
>>> s = open_image_set(str(root))
>>> [r.image_id for r in s.records], [r.label for r in s.records], s.label_names
(['cat/a.png', 'dog/a.png'], [0, 1], ('cat', 'dog'))
>>> s.load(1).mode, s.load(1).size
('RGB', (8, 8))
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitcnn_store.errors import ImageDecodeError, ImageSetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "ImageRecord",
    "ImageSet",
    "load_image",
    "open_image_set",
]

#: File name endings (lower case) that a folder scan treats as images.
IMAGE_EXTENSIONS = (
    ".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp",
)  # fmt: skip
#: File name endings (lower case) of manifests: ``path[,label]`` rows.
MANIFEST_EXTENSIONS = (".csv", ".tsv", ".txt")

_HEADER_PATH = {"path", "file", "filename", "image"}
_HEADER_LABEL = {"label", "class", "target"}


@dataclass(frozen=True)
class ImageRecord:
    """One image of a set: its stable id, label, and where its pixels come from.

    Attributes
    ----------
    image_id : str
        Stable id: posix path relative to the folder, manifest path as written,
        or built-in name such as ``"photos/astronaut/03"``.
    label : int
        Class index into :attr:`ImageSet.label_names`, or -1 when unknown.
    source : str
        Absolute file path, or a ``"builtin:..."`` reference.
    size : int
        File size in bytes (0 for built-ins and for files missing at open time).
    """

    image_id: str
    label: int
    source: str
    size: int


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
    >>> len(s), s.content_hash()[:12]
    (1, '762b5ae869e7')
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

    def content_hash(self) -> str:
        """Sha256 hex digest over ``(image_id, label, size)`` of every record, in order.

        Each record contributes ``json.dumps([image_id, label, size])`` plus a newline,
        UTF-8 encoded, so the hash is the same on every machine and Python version.
        Pixels are not read: this is cheap, and detects renamed, relabelled,
        reordered, added or resized files.
        """
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps([r.image_id, r.label, r.size], ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()

    def load(self, index: int) -> Image.Image:
        """Decode image ``index`` as an 8-bit RGB :class:`PIL.Image.Image`.

        Raises
        ------
        ImageDecodeError
            The file is missing, empty, truncated, not an image or too large.
        """
        source = self.records[index].source
        if source.startswith("builtin:"):
            from vitcnn_store.data.builtin import load_builtin  # builtin imports us

            return load_builtin(source)
        return load_image(source)

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


# -- decoding ------------------------------------------------------------------------


def _bomb_reason(e: Exception) -> str:
    # PIL says "Image size (N pixels) exceeds limit of M pixels, ..."
    n = [*re.findall(r"\d+", str(e)), "?", "?"]
    return f"decompression bomb: {n[0]} pixels > limit {n[1]}"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited onto black)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        # High bit depth: scale the format's value range to 0..255 rather than clip.
        # 16-bit → v/257. Mode I is how PIL often holds 16-bit data, so values within
        # 0..65535 are read as 16-bit too; wider ints are min-max scaled. Float data in
        # [0, 1] is read as unit range, other floats are min-max scaled.
        a = np.asarray(im).astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
            a = a / 257.0
        elif mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0
        else:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([g, g, g], axis=-1))
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            # Composite onto black, not "drop alpha": colour under transparent pixels
            # is arbitrary encoder residue and would otherwise leak into activations.
            rgba = im.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            return Image.alpha_composite(black, rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"unsupported image mode {mode!r} ({e})") from e


def load_image(path_or_bytes: str | os.PathLike[str] | bytes | bytearray) -> Image.Image:
    """Decode one image file (or its bytes) to 8-bit RGB, EXIF orientation applied.

    The whole image is decoded, so truncated files fail here and not later. Animated
    images give their first frame. 16/32-bit grayscale is scaled, not clipped (see
    ``_to_rgb``); alpha is composited onto black.

    Parameters
    ----------
    path_or_bytes : str, os.PathLike or bytes
        A file path, or the encoded file content.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``.

    Raises
    ------
    ImageDecodeError
        With a short reason: ``"file not found"``, ``"zero-byte file"``,
        ``"truncated image file"``, ``"not an image (cannot identify image file)"``,
        ``"decompression bomb: N pixels > limit M"``, ...

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.new("I;16", (2, 1), 65535).save(buf, format="PNG")
    >>> load_image(buf.getvalue()).getpixel((0, 0))
    (255, 255, 255)
    >>> load_image(b"hello")
    Traceback (most recent call last):
    ...
    vitcnn_store.errors.ImageDecodeError: not an image (cannot identify image file)
    """
    fp: Any
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(path_or_bytes))
        empty = len(fp.getbuffer()) == 0
    else:
        fp = os.fspath(path_or_bytes)
        try:
            st = os.stat(fp)
        except FileNotFoundError:
            raise ImageDecodeError("file not found") from None
        except OSError as e:
            raise ImageDecodeError(f"cannot read file ({e.strerror or e})") from None
        if not os.path.isfile(fp):
            raise ImageDecodeError("not a regular file")
        empty = st.st_size == 0
    if empty:
        raise ImageDecodeError("zero-byte file")

    with warnings.catch_warnings():
        # PIL's own UserWarnings (e.g. "Corrupt EXIF data") concern images that still
        # decode: one line per file of a large set is noise. PIL only *warns* between
        # MAX_IMAGE_PIXELS and twice that; both are failures (filter added last wins).
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as opened:
                # Warning filters are process-global and racy under threads: check the
                # pixel count ourselves too, before load() allocates the pixels.
                limit = Image.MAX_IMAGE_PIXELS
                pixels = opened.width * opened.height
                if limit and pixels > limit:
                    raise ImageDecodeError(f"decompression bomb: {pixels} pixels > limit {limit}")
                opened.load()  # full decode now: truncation must fail here, not in a worker
                # (exif_transpose returns a copy, so the file can be closed after this)
                decoded = ImageOps.exif_transpose(opened)
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError(_bomb_reason(e)) from None
        except UnidentifiedImageError:
            raise ImageDecodeError("not an image (cannot identify image file)") from None
        except FileNotFoundError:
            raise ImageDecodeError("file not found") from None
        except MemoryError:
            raise
        except Exception as e:
            # PIL's decoders signal corrupt data with OSError, SyntaxError, EOFError,
            # ValueError, struct.error, ...: all mean "this file is bad", never a bug here.
            msg = str(e)
            low = msg.lower()
            if "truncated" in low or "broken data stream" in low or isinstance(e, EOFError):
                raise ImageDecodeError("truncated image file") from None
            raise ImageDecodeError(f"corrupt image ({type(e).__name__}: {msg})") from None
    return _to_rgb(decoded)


# -- image sets ----------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _open_folder(spec: str, root: Path) -> ImageSet:
    root = root.absolute()

    def fail(err: OSError) -> None:
        raise ImageSetError(f"cannot read folder {err.filename}: {err.strerror}")

    found: list[tuple[str, str, int]] = []
    seen_dirs: set[str] = set()  # real paths: symlinked folders are followed, loops are not
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for name in filenames:
            if _is_hidden(name) or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = os.path.join(dirpath, name)
            try:
                size = os.stat(full).st_size
            except OSError:  # e.g. dangling symlink: listed, fails at load
                size = 0
            found.append((Path(full).relative_to(root).as_posix(), full, size))
    if not found:
        raise ImageSetError(
            f"no images in folder {root} (looked recursively, skipping hidden files, "
            f"for {' '.join(IMAGE_EXTENSIONS)})"
        )
    found.sort()
    # Class folders: only when *every* image is inside a top-level sub-folder, so a
    # stray image at the top level makes the set unlabelled rather than mislabelled.
    names: tuple[str, ...] = ()
    if all("/" in rel for rel, _, _ in found):
        names = tuple(sorted({rel.split("/", 1)[0] for rel, _, _ in found}))
    index = {n: i for i, n in enumerate(names)}
    records = tuple(
        ImageRecord(rel, index[rel.split("/", 1)[0]] if names else -1, full, size)
        for rel, full, size in found
    )
    return ImageSet(spec, records, names)


def _manifest_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank, non-comment rows of a manifest as ``(line number, cells)``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ImageSetError(f"cannot read manifest {path}: {e}") from None
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1)]
    lines = [(n, ln) for n, ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    delim = ","
    if path.suffix.lower() == ".tsv" or (
        path.suffix.lower() == ".txt" and lines and "\t" in lines[0][1]
    ):
        delim = "\t"
    return [(n, [c.strip() for c in next(csv.reader([ln], delimiter=delim))]) for n, ln in lines]


def _open_manifest(spec: str, path: Path) -> ImageSet:
    rows = _manifest_rows(path)
    if rows:
        cells = [c.lower() for c in rows[0][1]]
        if cells[0] in _HEADER_PATH and (len(cells) == 1 or cells[1] in _HEADER_LABEL):
            rows = rows[1:]
    if not rows:
        raise ImageSetError(f"manifest {path} lists no images (rows: path[,label])")
    base = path.absolute().parent
    entries: list[tuple[int, str, str]] = []  # (line, path as written, raw label)
    first_line: dict[str, int] = {}
    for n, cells in rows:
        if len(cells) > 2:
            raise ImageSetError(
                f"manifest {path}, line {n}: expected path[,label], got {len(cells)} columns"
            )
        p, raw = cells[0], cells[1] if len(cells) == 2 else ""
        if not p:
            raise ImageSetError(f"manifest {path}, line {n}: empty path")
        if p in first_line:  # ids must be unique: runs are compared by image_id
            raise ImageSetError(
                f"manifest {path}, line {n}: duplicate path {p!r} (first on line {first_line[p]})"
            )
        first_line[p] = n
        entries.append((n, p, raw))

    # Labels are all integers or all class names, decided by the first labelled row.
    labelled = [(n, raw) for n, _, raw in entries if raw]
    numeric = bool(labelled) and re.fullmatch(r"[+-]?\d+", labelled[0][1]) is not None
    for n, raw in labelled:
        if (re.fullmatch(r"[+-]?\d+", raw) is not None) != numeric:
            kind = "integer" if numeric else "class-name"
            raise ImageSetError(
                f"manifest {path}, line {n}: label {raw!r} mixed with {kind} labels "
                f"of earlier rows (line {labelled[0][0]})"
            )
        if numeric and int(raw) < -1:
            raise ImageSetError(f"manifest {path}, line {n}: negative label {raw} (-1 = unknown)")
    names: tuple[str, ...] = () if numeric else tuple(sorted({raw for _, raw in labelled}))
    index = {c: i for i, c in enumerate(names)}

    records = []
    for _, p, raw in entries:
        full = os.path.normpath(os.path.join(base, os.path.expanduser(p)))
        try:
            size = os.stat(full).st_size
        except OSError:  # a missing file is a per-image failure at load, not here
            size = 0
        label = -1 if not raw else int(raw) if numeric else index[raw]
        records.append(ImageRecord(p, label, full, size))
    return ImageSet(spec, tuple(records), names)


def open_image_set(spec: str, *, limit: int | None = None) -> ImageSet:
    """Open an image set from what the user typed.

    Parameters
    ----------
    spec : str
        ``builtin:NAME`` (see :func:`builtin_names`); a folder, scanned recursively
        (ids = sorted relative posix paths; top-level sub-folders become classes when
        every image lies in one); or a ``.csv``/``.tsv``/``.txt`` manifest of
        ``path[,label]`` rows (ids = paths as written, in manifest order; relative
        paths are resolved against the manifest's folder; labels are integers or
        class names; optional ``path,label`` header; ``#`` comments).
    limit : int, optional
        Keep only the first ``limit`` records.

    Raises
    ------
    ImageSetError
        Unknown spec, missing or empty folder, malformed manifest, bad ``limit``.

    Examples
    --------
    >>> s = open_image_set("builtin:digits", limit=3)
    >>> [r.image_id for r in s.records], [r.label for r in s.records]
    (['digits/0000', 'digits/0001', 'digits/0002'], [0, 1, 2])
    """
    if limit is not None and (isinstance(limit, bool) or limit <= 0):
        raise ImageSetError(f"limit must be a positive number of images, got {limit!r}")
    if spec.startswith("builtin:"):
        from vitcnn_store.data.builtin import open_builtin  # builtin imports us

        image_set = open_builtin(spec)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            image_set = _open_folder(spec, path)
        elif path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
            image_set = _open_manifest(spec, path)
        else:
            from vitcnn_store.data.builtin import builtin_names

            what = "is not a folder or a manifest" if path.exists() else "does not exist"
            raise ImageSetError(
                f"image set {spec!r} {what}: expected an image folder, a "
                f"{'/'.join(MANIFEST_EXTENSIONS)} manifest of path[,label] rows, or "
                f"builtin:NAME ({', '.join(builtin_names())})"
            )
    if limit is not None and limit < len(image_set):
        image_set = ImageSet(image_set.spec, image_set.records[:limit], image_set.label_names)
    return image_set
