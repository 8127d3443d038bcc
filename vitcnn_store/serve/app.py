"""The FastAPI application of ``vitcnn serve``: routers, token, limits, errors.

Requests pass, outermost first: CORS (only with ``--cors``), the bearer token
(every route, ``/docs`` and ``/zarr`` included, checked in constant time),
the limits (request body size, time), then the routes: ``/zarr/`` (store
keys), ``/api/`` (runs, slices, results, jobs) and FastAPI's ``/docs`` and
``/openapi.json``, and the explorer pages from ``/`` (:mod:`vitcnn_store.serve.pages`).
Other routers mount with :func:`create_app`'s ``extra_routers``. Browsers,
which cannot send the bearer header, open a URL once with ``?token=`` and get
an HttpOnly, SameSite=Strict cookie the token check accepts too.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Sequence
from typing import Any

from vitcnn_store._version import __version__
from vitcnn_store.serve.config import ServeConfig
from vitcnn_store.serve.errors import ApiError, error_body, one_line, status_of

__all__ = ["create_app", "run_server"]

Scope = dict[str, Any]


async def _send_json(
    send: Any, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


#: Cookie a browser keeps the token in (``?token=`` sets it once; browsers cannot send a header).
TOKEN_COOKIE = "vitcnn_token"


def _cookie(headers: Sequence[tuple[bytes, bytes]], name: str) -> bytes:
    """The value of cookie ``name`` in a request's ``Cookie`` headers (``b""`` if absent)."""
    from urllib.parse import unquote_to_bytes

    for key, value in headers:
        if key != b"cookie":
            continue
        for part in value.split(b";"):
            k, _, v = part.strip().partition(b"=")
            if k == name.encode():
                return unquote_to_bytes(v)
    return b""


class TokenMiddleware:
    """401 unless the request carries the token, compared with :func:`hmac.compare_digest`.

    The token comes as ``Authorization: Bearer TOKEN`` (clients), or from a
    browser as the HttpOnly, SameSite=Strict cookie :data:`TOKEN_COOKIE`. A GET
    with the right ``?token=`` sets that cookie and redirects to the same URL
    without it, so the token leaves the address bar and the history at once.
    """

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        given = b""
        for name, value in headers:
            if name == b"authorization":
                given = value
                break
        cookie = _cookie(headers, TOKEN_COOKIE)
        # Both compared every time, in constant time: which one matched leaks nothing.
        by_header = hmac.compare_digest(given, self.expected)
        by_cookie = hmac.compare_digest(cookie, self.token)
        if by_header or by_cookie:
            await self.app(scope, receive, send)
            return
        query = _query_token(scope)
        get = scope.get("method") in ("GET", "HEAD")
        if query is not None and get and hmac.compare_digest(query[0], self.token):
            await _set_cookie_and_redirect(send, scope, query[1], self.token)
            return
        why = "missing" if not (given or cookie or query) else "wrong"
        await _send_json(
            send,
            401,
            {
                "error": f"{why} bearer token: send Authorization: Bearer TOKEN"
                " (a browser: open the URL once with ?token=TOKEN)"
            },
            [(b"www-authenticate", b'Bearer realm="vitcnn"')],
        )


def _query_token(scope: Scope) -> tuple[bytes, bytes] | None:
    """``(token, the query string without it)`` when the query has ``token=``."""
    from urllib.parse import parse_qsl, urlencode

    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    tokens = [v for k, v in pairs if k == "token"]
    if not tokens:
        return None
    rest = urlencode([(k, v) for k, v in pairs if k != "token"])
    return tokens[0].encode(), rest.encode()


async def _set_cookie_and_redirect(send: Any, scope: Scope, rest: bytes, token: bytes) -> None:
    from urllib.parse import quote, quote_from_bytes

    path = scope.get("root_path", "") + scope.get("path", "/")
    # One leading slash: "//host/..." would redirect to another site.
    path = "/" + quote(path.lstrip("/"), safe="/-._~")
    location = path.encode() + (b"?" + rest if rest else b"")
    cookie = (
        f"{TOKEN_COOKIE}={quote_from_bytes(token, safe='')}; HttpOnly; SameSite=Strict; Path=/"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", location),
                (b"set-cookie", cookie),
                (b"cache-control", b"no-store"),
                (b"content-length", b"0"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


class _BodyTooLarge(Exception):
    pass


class LimitsMiddleware:
    """Refuse bodies over ``max_body`` bytes (413) and requests over ``timeout`` s (504).

    A request that times out keeps its worker thread until it finishes (Python
    cannot stop a thread), but the client gets its answer and the connection is free.
    """

    def __init__(self, app: Any, max_body: int, timeout: float) -> None:
        self.app = app
        self.max_body = max_body
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and int(value or 0) > self.max_body:
                await _send_json(send, 413, {"error": f"request body over {self.max_body} bytes"})
                return
        received = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise _BodyTooLarge
            return message

        async def tracked_send(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, limited_receive, tracked_send), self.timeout)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, {"error": f"request body over {self.max_body} bytes"})
        except asyncio.TimeoutError:
            if not started:
                await _send_json(send, 504, {"error": f"request took over {self.timeout:g} s"})


def create_app(config: ServeConfig, extra_routers: Sequence[Any] = ()) -> Any:
    """The application serving ``config.store`` (opened now: a bad store fails here)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from vitcnn_store.errors import VitcnnError
    from vitcnn_store.serve import api_routes, jobs, pages, zarr_routes
    from vitcnn_store.serve.keys import BadKeyError, StoreFiles
    from vitcnn_store.store import open_store

    open_store(config.store)  # refuse a missing or foreign store before binding
    app = FastAPI(
        title="vitcnn_store",
        version=__version__,
        summary="Activations of vision models, their analyses and the jobs that make them.",
        description="Zarr keys at `/zarr/` (GET with Range, HEAD, ETag), the JSON API at "
        '`/api/`. Errors are `{"error": "<one line>"}`. With a token, every request '
        "carries `Authorization: Bearer TOKEN`.",
    )
    app.state.config = config
    app.state.files = StoreFiles(config.store)
    app.state.jobs = jobs.JobManager(config)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message), e.status, headers=e.headers)

    @app.exception_handler(BadKeyError)
    async def bad_key(request: Request, e: BadKeyError) -> JSONResponse:
        return JSONResponse(error_body(e), 400)

    @app.exception_handler(VitcnnError)
    async def typed_error(request: Request, e: VitcnnError) -> JSONResponse:
        return JSONResponse(error_body(e), status_of(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.detail), e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(error_body(f"{where}: {first.get('msg', 'invalid request')}"), 400)

    @app.exception_handler(Exception)
    async def failure(request: Request, e: Exception) -> JSONResponse:
        from vitcnn_store.store.layout import environment_error

        mapped = environment_error(config.store, e)
        if mapped is None:  # a bug: the log keeps the traceback, the client gets one line
            import logging

            logging.getLogger("vitcnn_store.serve").exception("unhandled error")
            return JSONResponse(error_body(f"internal error ({type(e).__name__})"), 500)
        return JSONResponse(error_body(one_line(mapped)), status_of(mapped))

    app.include_router(zarr_routes.router)
    app.include_router(api_routes.router)
    app.include_router(jobs.router)
    app.include_router(pages.router)  # the explorer, from /
    for router in extra_routers:
        app.include_router(router)

    app.add_middleware(
        LimitsMiddleware, max_body=config.max_request_bytes, timeout=config.request_timeout
    )
    # /zarr/ is answered here, inside the token check and outside FastAPI and the limits.
    app.add_middleware(zarr_routes.ZarrFastPath, files=app.state.files, config=config)
    if config.token is not None:
        app.add_middleware(TokenMiddleware, token=config.token)
    if config.cors_origins:  # added last: outermost, so preflights need no token
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Authorization", "Range", "Content-Type"],
            expose_headers=["ETag", "Content-Range", "Content-Length"],
        )
    app.state.jobs.start()
    return app


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_server(app: Any, config: ServeConfig) -> None:
    """Serve ``app`` with uvicorn until interrupted, then stop the job worker."""
    import uvicorn

    try:
        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            timeout_graceful_shutdown=5,
            server_header=False,
            access_log=False,  # a log line per chunk read costs more than the read
            http="httptools" if _has("httptools") else "auto",
            loop="uvloop" if _has("uvloop") else "auto",
        )
    finally:
        app.state.jobs.stop()
