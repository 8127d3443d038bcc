"""The store's keys as files: which keys may be read, and reading them (ranges included).

A key is a relative, ``/``-separated path inside the store. Anything that
could leave the store is refused before the storage is touched: ``..`` or
``.`` components, empty components, absolute paths, backslashes, control
characters, ``%`` (a second round of URL decoding must not change the key).
Names starting with ``.`` are never served either (nothing zarr v3 writes;
zarr v2 probes such as ``.zgroup`` must read as absent, so they answer 404).
For a local store the resolved path must also stay under the store's folder
(no symlink out).
Reads go through fsspec, so a store in a bucket is served the same way.
"""

from __future__ import annotations

import functools
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Any

__all__ = ["BadKeyError", "KeyInfo", "StoreFiles", "check_key"]


class BadKeyError(ValueError):
    """A key that is not a plain relative path inside the store (answered 400)."""


def check_key(key: str) -> str:
    """``key`` if it is a plain relative store key, else :class:`BadKeyError`.

    Examples
    --------
    >>> check_key("vit/blocks.0/activation/c/0/0/0")
    'vit/blocks.0/activation/c/0/0/0'
    >>> check_key("vit/../../etc/passwd")
    Traceback (most recent call last):
    ...
    vitcnn_store.serve.keys.BadKeyError: key 'vit/../../etc/passwd': '..' is not allowed
    """
    why = ""
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        why = "absolute paths are not allowed"
    elif "\\" in key or "%" in key:
        why = "'\\' and '%' do not occur in store keys"
    elif not key.isprintable():
        why = "control characters do not occur in store keys"
    else:
        for part in key.split("/"):
            if part in (".", ".."):
                why = f"{part!r} is not allowed"
                break
            if not part:
                why = "empty components are not allowed"
                break
    if why:
        raise BadKeyError(f"key {key[:200]!r}: {why}")
    return key


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    """``os.path.realpath(folder)``, remembered: a chunk read resolves its folder once, not
    one ``lstat`` per path component each time (bounded: chunk folders of a few runs)."""
    return os.path.realpath(folder)


@dataclass(frozen=True)
class KeyInfo:
    """Size and version of a stored object (the version makes the ETag)."""

    size: int
    etag: str
    last_modified: float | None


class StoreFiles:
    """Read-only access to the objects of one store, by key."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.local = "file" in self.fs.protocol or "local" in self.fs.protocol
        self._real_root = os.path.realpath(self.root) if self.local else ""

    def path(self, key: str) -> str:
        """The storage path of ``key`` (checked: it stays inside the store)."""
        path = posixpath.join(self.root, check_key(key))
        if self.local:
            folder, name = os.path.split(path)
            real = os.path.join(_real_folder(folder), name)
            if os.path.islink(real):  # rare: resolve the last link too
                real = os.path.realpath(real)
            if not real.startswith(self._real_root + os.sep):
                raise BadKeyError(f"key {key[:200]!r}: leads outside the store")
        return path

    def info(self, key: str) -> KeyInfo | None:
        """Size and version of ``key``; ``None`` when there is no such object (or a folder)."""
        path = self.path(key)
        if any(part.startswith(".") for part in key.split("/")):
            return None
        if self.local:
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not stat.S_ISREG(st.st_mode):
                return None
            return KeyInfo(st.st_size, f'"{st.st_size:x}-{st.st_mtime_ns:x}"', st.st_mtime)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type") != "file":
            return None
        size = int(info.get("size") or 0)
        version = (
            info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        )
        etag = str(version).strip('"') if version else f"{size:x}"
        modified = info.get("mtime") if isinstance(info.get("mtime"), (int, float)) else None
        return KeyInfo(size, f'"{etag}"', modified)

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``key`` (``end=None``: to the end)."""
        path = self.path(key)
        if self.local:
            with open(path, "rb") as f:
                if start:
                    f.seek(start)
                return f.read() if end is None else f.read(end - start)
        return bytes(self.fs.cat_file(path, start=start, end=end))
