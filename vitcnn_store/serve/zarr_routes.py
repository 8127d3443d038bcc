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

import asyncio
import json
import re
from collections.abc import Mapping
from email.utils import formatdate
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from vitcnn_store.serve.errors import ApiError, error_body
from vitcnn_store.serve.keys import BadKeyError, KeyInfo, StoreFiles

__all__ = ["ZarrFastPath", "answer", "parse_range", "router"]

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


async def answer(
    files: StoreFiles, config: Any, method: str, key: str, request_headers: Mapping[str, str]
) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers, body)`` of a GET or HEAD of ``key``; errors raise :class:`ApiError`
    (or :class:`~vitcnn_store.serve.keys.BadKeyError`)."""
    info = files.info(key) if files.local else await run_in_threadpool(files.info, key)
    if info is None:
        raise ApiError(404, f"no key {key[:200]!r} in the store")
    headers = _headers(key, info, config.token is not None)
    headers["Content-Type"] = _media_type(key)
    if method == "HEAD":
        headers["Content-Length"] = str(info.size)
        return 200, headers, b""
    if request_headers.get("if-none-match") == info.etag:
        return 304, headers, b""
    span = parse_range(request_headers.get("range"), info.size)
    start, end = span if span is not None else (0, info.size)
    if end - start > config.max_response_bytes:
        raise ApiError(
            413,
            f"{end - start} bytes is over the response limit "
            f"({config.max_response_bytes}); ask for a Range",
        )
    if files.local and end - start <= _INLINE_BYTES:
        data = files.read(key, start, end)
    else:
        data = await run_in_threadpool(files.read, key, start, end)
    headers["Content-Length"] = str(len(data))
    if span is None:
        return 200, headers, data
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{info.size}"
    return 206, headers, data


class ZarrFastPath:
    """Answers ``/zarr/`` itself, as plain ASGI; every other path goes on to ``app``.

    Chunk reads are most of a server's requests: FastAPI's routing, dependency
    resolution and the per-request task of the time limit cost more than the
    read itself, so they are skipped here (the token check stays outside; a local
    read cannot hang, a remote one runs under the request time limit).
    """

    def __init__(self, app: Any, files: StoreFiles, config: Any) -> None:
        self.app = app
        self.files = files
        self.config = config

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/zarr/"):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        wanted = {}
        for name, value in scope.get("headers", ()):
            if name in (b"range", b"if-none-match"):
                wanted[name.decode()] = value.decode("latin-1")
        try:
            if method not in ("GET", "HEAD"):
                raise ApiError(405, f"{method} is not allowed on /zarr/ (read-only)")
            work = answer(self.files, self.config, method, path[len("/zarr/") :], wanted)
            if self.files.local:
                status, headers, body = await work
            else:
                status, headers, body = await asyncio.wait_for(work, self.config.request_timeout)
        except (ApiError, BadKeyError, asyncio.TimeoutError, OSError) as e:
            status, headers, body = _error(e)
        raw = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body if method != "HEAD" else b""})


def _error(e: Exception) -> tuple[int, dict[str, str], bytes]:
    if isinstance(e, ApiError):
        status, message, extra = e.status, e.message, dict(e.headers or {})
    elif isinstance(e, BadKeyError):
        status, message, extra = 400, str(e), {}
    elif isinstance(e, asyncio.TimeoutError):
        status, message, extra = 504, "the store did not answer in time", {}
    else:
        status, message, extra = 503, f"cannot read the store ({type(e).__name__})", {}
    body = json.dumps(error_body(message)).encode()
    headers = {**extra, "Content-Type": "application/json", "Content-Length": str(len(body))}
    return status, headers, body


# The routes below document /zarr in OpenAPI; requests are answered by ZarrFastPath.


@router.head("/zarr/{key:path}", summary="Size and version of a store key")
async def head_key(key: str, request: Request) -> Response:
    """Headers of ``GET`` without the body."""
    status, headers, _ = await answer(
        request.app.state.files, request.app.state.config, "HEAD", key, request.headers
    )
    return Response(status_code=status, headers=headers)


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
    status, headers, body = await answer(
        request.app.state.files, request.app.state.config, "GET", key, request.headers
    )
    return Response(content=body, status_code=status, headers=headers)
