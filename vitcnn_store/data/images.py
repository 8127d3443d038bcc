"""Opening image sets from what the user typed: folders, manifests, built-in sets.

Decoding lives in :mod:`~vitcnn_store.data.decode`, the set type in
:mod:`~vitcnn_store.data.imageset`, built-in sets in
:mod:`~vitcnn_store.data.builtin`; this module only finds images and labels.

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
import os
import re
from pathlib import Path

from vitcnn_store.data.builtin import builtin_names, builtin_records
from vitcnn_store.data.decode import load_image
from vitcnn_store.data.imageset import ImageSet
from vitcnn_store.data.records import ImageRecord
from vitcnn_store.errors import ImageSetError

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
    ".bmp",
    ".gif",
    ".jpeg",
    ".jpg",
    ".pbm",
    ".pgm",
    ".png",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)
#: File name endings (lower case) of manifests: ``path[,label]`` rows.
MANIFEST_EXTENSIONS = (".csv", ".tsv", ".txt")
#: Largest label a manifest may give (labels are stored as int64).
MAX_LABEL = 2**63 - 1

_HEADER_PATH = {"path", "file", "filename", "image"}
_HEADER_LABEL = {"label", "class", "target"}

# -- image sets ----------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _check_utf8(path: str) -> None:
    """Refuse a file name that is not valid UTF-8: ids are stored as UTF-8 strings, and an
    id made up for it (escaped bytes) could collide with a real name."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise ImageSetError(
            f"file name {shown!r} is not valid UTF-8 (image ids are stored as UTF-8): "
            "rename it, or list the images in a manifest without it"
        ) from None


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
            _check_utf8(full)
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
        if numeric and int(raw) > MAX_LABEL:
            raise ImageSetError(
                f"manifest {path}, line {n}: label {raw[:24]}{'...' if len(raw) > 24 else ''} "
                f"is too large (labels are -1 to {MAX_LABEL})"
            )
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
    _check_utf8(spec)  # the set is recorded as typed
    if spec.startswith("builtin:"):
        records, names = builtin_records(spec)
        image_set = ImageSet(spec, records, names)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            image_set = _open_folder(spec, path)
        elif path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
            image_set = _open_manifest(spec, path)
        else:
            what = "is not a folder or a manifest" if path.exists() else "does not exist"
            raise ImageSetError(
                f"image set {spec!r} {what}: expected an image folder, a "
                f"{'/'.join(MANIFEST_EXTENSIONS)} manifest of path[,label] rows, or "
                f"builtin:NAME ({', '.join(builtin_names())})"
            )
    if limit is not None and limit < len(image_set):
        image_set = ImageSet(image_set.spec, image_set.records[:limit], image_set.label_names)
    return image_set
