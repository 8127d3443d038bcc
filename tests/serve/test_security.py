"""Bearer tokens on every route, path traversal, limits, CORS, and the bind rules of
``vitcnn serve`` (a non-loopback bind without a token exits 2 with one line)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.serve.conftest import TOKEN, ThreadServer, snapshot
from vitcnn_store.serve.config import ServeConfig
from vitcnn_store.serve.keys import BadKeyError, StoreFiles


@pytest.mark.parametrize(
    "path",
    [
        "/zarr/zarr.json",
        "/api/runs",
        "/docs",
        "/openapi.json",
        "/api/jobs",
        "/",
        "/api/runs/vit/layers/blocks.0",
    ],
)
def test_every_route_needs_the_token(token_server: ThreadServer, path: str) -> None:
    for token in ("", "wrong-token-0123456789abcdef", TOKEN[:-1]):
        status, headers, body = token_server.request(path, token=token or "")
        if not token:  # request() adds the server's token unless told otherwise
            status, headers, body = _raw(token_server, path)
        assert status == 401, (path, token)
        assert headers.get("www-authenticate", "").startswith("Bearer")
        assert "bearer token" in json.loads(body)["error"]
    status, _, _ = token_server.request(path)
    assert status != 401


def _raw(
    server: ThreadServer,
    path: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """A request sent as written: no client-side path normalisation."""
    conn = http.client.HTTPConnection("127.0.0.1", server.config.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "path",
    [
        "/zarr/vit/../../../../etc/passwd",
        "/zarr/vit/%2e%2e/%2e%2e/etc/passwd",
        "/zarr/vit/..%2F..%2Fetc/passwd",
        "/zarr//etc/passwd",
        "/zarr/vit/./zarr.json",
        "/zarr/vit%5c..%5czarr.json",
        "/zarr/vit/%252e%252e/zarr.json",
    ],
)
def test_path_traversal_is_refused(open_server: ThreadServer, path: str) -> None:
    status, _, body = _raw(open_server, path)
    assert status in (400, 404), path
    assert b"root:" not in body and json.loads(body)["error"]


def test_symlinks_out_of_the_store_are_refused(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    (tmp_path / "secret").write_text("secret")
    os.symlink(tmp_path / "secret", store / "leak")
    files = StoreFiles(str(store))
    assert files.read("zarr.json") == b"{}"
    with pytest.raises(BadKeyError, match="outside the store"):
        files.info("leak")


def test_request_body_and_time_limits(token_server: ThreadServer, serve_store: str) -> None:
    status, _, body = token_server.request("/api/jobs", method="POST", body=b"x" * 100_000)
    assert status == 413 and "request body" in json.loads(body)["error"]
    slow = ThreadServer(ServeConfig(store=serve_store, request_timeout=1e-6))
    try:
        status, _, body = slow.request("/api/runs/vit/layers/blocks.0?images=0:2")
        assert status == 504 and "took over" in json.loads(body)["error"]
    finally:
        slow.stop()


def test_cors_only_for_the_origins_asked(
    token_server: ThreadServer, open_server: ThreadServer
) -> None:
    asked = {"Origin": "http://example.org"}
    _, headers, _ = token_server.request("/api/runs", headers=asked)
    assert headers.get("access-control-allow-origin") == "http://example.org"
    _, headers, _ = token_server.request("/api/runs", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers
    _, headers, _ = open_server.request("/api/runs", headers=asked)
    assert "access-control-allow-origin" not in headers


def _serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vitcnn_store.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--host", "0.0.0.0"], "--token-file"),
        (["--host", "::"], "--token-file"),
        (["--host", "example.org"], "--token-file"),
        (["--allow-jobs"], "--allow-jobs"),
        (["--token-file", "missing.txt"], "cannot read"),
        (["--token-file", "short.txt"], "at least 16"),
        (["--cors", "*", "--port", "1"], "--cors"),
        (["--port", "70000"], "--port"),
    ],
)
def test_unsafe_or_bad_options_exit_2_with_one_line(
    serve_store: str, tmp_path: Path, extra: list[str], words: str
) -> None:
    (tmp_path / "short.txt").write_text("abc\n")
    before = snapshot(serve_store)
    out = _serve(serve_store, *extra, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitcnn serve: error:") and words in lines[0]
    assert snapshot(serve_store) == before
    assert not Path(serve_store + ".jobs").exists()


def test_help_does_not_load_fastapi() -> None:
    code = (
        "import sys\nfrom vitcnn_store.cli import build_parser\nbuild_parser()\n"
        "assert not any(m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette') "
        "for m in sys.modules), 'fastapi loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_config_rules_in_python(serve_store: str) -> None:
    from vitcnn_store.errors import UsageError
    from vitcnn_store.serve.config import check_serve_config

    base = ServeConfig(store=serve_store)
    assert check_serve_config(replace(base, host="::1")) is not None
    with pytest.raises(UsageError, match="token-file"):
        check_serve_config(replace(base, host="10.0.0.1"))
    assert check_serve_config(replace(base, host="0.0.0.0", token=TOKEN)) is not None
