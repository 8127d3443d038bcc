"""Decoding one image file (or its bytes) to 8-bit RGB, robust to what users point at.

Truncated, empty, non-image and decompression-bomb files raise
:class:`~vitcnn_store.errors.ImageDecodeError` with a short reason, here and not
later in a worker.
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitcnn_store.errors import ImageDecodeError

__all__ = ["load_image", "read_image_file"]


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


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of one image file, read once (so that what is hashed is what is decoded).

    Raises
    ------
    ImageDecodeError
        ``"file not found"``, ``"not a regular file"`` or ``"cannot read file (...)"``.

    Examples
    --------
    >>> read_image_file("/no/such/file.png")
    Traceback (most recent call last):
    ...
    vitcnn_store.errors.ImageDecodeError: file not found
    """
    path = os.fspath(path)
    try:
        if not os.path.isfile(path):
            os.stat(path)  # raises for a missing file or a dangling link
            raise ImageDecodeError("not a regular file")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read file ({e.strerror or e})") from None


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
    data = (
        bytes(path_or_bytes)
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview))
        else read_image_file(path_or_bytes)
    )
    if not data:
        raise ImageDecodeError("zero-byte file")
    fp = io.BytesIO(data)

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
