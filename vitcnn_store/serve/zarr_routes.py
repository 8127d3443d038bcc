"""``/zarr/<key>``: the store's objects as stored, for any zarr v3 reader over HTTP.

GET and HEAD answer with ``ETag`` (size and modification time, or the
bucket's own ETag), ``Last-Modified`` where known, ``Accept-Ranges: bytes``
and ``Cache-Control``; ``If-None-Match`` answers 304; a single
``Range: bytes=...`` answers 206 (416 when it starts past the end; several
ranges are answered with the whole object, as RFC 9110 allows). A missing key
— an absent chunk, metadata that is not there, a folder — is 404: zarr reads
404 as "absent" (fill value). Nothing is listed.

Caching: ``zarr.json`` changes when a run finishes or an analysis lands, so
it is always revalidated (``no-cache``); chunks are kept for a short while
(``max-age=60``) and revalidated by ETag after.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from vitcnn_store.serve.errors import ApiError
from vitcnn_store.serve.keys import KeyInfo, StoreFiles

__all__ = ["parse_range", "router"]

router = APIRouter(tags=["zarr"])
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
# Objects up to this size are read on the event loop from a local disk (faster than
# a thread hop); bigger ones and every remote read go to a worker thread.
_INLINE_BYTES = 1 << 20


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single-range ``Range`` header; ``None`` for
    the whole object. Raises 416 when the range starts past the end.

    Examples
    --------
    >>> parse_range("bytes=0-9", 100), parse_range("bytes=90-", 100), parse_range("bytes=-5", 100)
    ((0, 10), (90, 100), (95, 100))
    >>> parse_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole object
    True
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None  # malformed or several ranges: ignored
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            raise ApiError(416, "empty suffix range", {"Content-Range": f"bytes */{size}"})
        return max(0, size - n), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise ApiError(
            416, f"range starts past the end ({size} bytes)", {"Content-Range": f"bytes */{size}"}
        )
    return start, end


def _headers(key: str, info: KeyInfo, private: bool) -> dict[str, str]:
    scope = "private" if private else "public"
    cache = "no-cache" if key.endswith("zarr.json") else f"{scope}, max-age=60"
    headers = {"ETag": info.etag, "Accept-Ranges": "bytes", "Cache-Control": cache}
    if info.last_modified is not None:
        headers["Last-Modified"] = formatdate(info.last_modified, usegmt=True)
    return headers


def _media_type(key: str) -> str:
    return "application/json" if key.endswith(".json") else "application/octet-stream"


async def _info(files: StoreFiles, key: str) -> KeyInfo:
    info = files.info(key) if files.local else await run_in_threadpool(files.info, key)
    if info is None:
        raise ApiError(404, f"no key {key[:200]!r} in the store")
    return info


@router.head("/zarr/{key:path}", summary="Size and version of a store key")
async def head_key(key: str, request: Request) -> Response:
    """Headers of ``GET`` without the body."""
    files: StoreFiles = request.app.state.files
    info = await _info(files, key)
    headers = _headers(key, info, request.app.state.config.token is not None)
    headers["Content-Length"] = str(info.size)
    return Response(status_code=200, headers=headers, media_type=_media_type(key))


@router.get(
    "/zarr/{key:path}",
    summary="A store key's bytes (Range, ETag)",
    responses={
        206: {"description": "the requested byte range"},
        304: {"description": "unchanged (If-None-Match)"},
        404: {"description": "no such key (zarr: absent)"},
    },
)
async def get_key(key: str, request: Request) -> Response:
    """The bytes stored under ``key`` (e.g. ``zarr.json``, ``vit/blocks.0/activation/c/0/0/0``)."""
    files: StoreFiles = request.app.state.files
    config = request.app.state.config
    info = await _info(files, key)
    headers = _headers(key, info, config.token is not None)
    if request.headers.get("if-none-match") == info.etag:
        return Response(status_code=304, headers=headers)
    span = parse_range(request.headers.get("range"), info.size)
    start, end = span if span is not None else (0, info.size)
    if end - start > config.max_response_bytes:
        raise ApiError(
            413,
            f"{end - start} bytes is over the response limit "
            f"({config.max_response_bytes}); ask for a Range",
        )
    data: Any
    if files.local and end - start <= _INLINE_BYTES:
        data = files.read(key, start, end)
    else:
        data = await run_in_threadpool(files.read, key, start, end)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{info.size}"
    return Response(content=data, status_code=status, headers=headers, media_type=_media_type(key))
