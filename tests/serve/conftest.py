"""A tiny store made by the real extraction, and real uvicorn servers on free loopback ports.

Servers run in threads of the test process (``uvicorn.Server``) and stop at the
end of the session; clients talk to them over real sockets.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import built_once, extract_tiny
from vitcnn_store.serve.config import ServeConfig

TOKEN = "test-token-0123456789abcdef"


def snapshot(path: str | Path) -> dict[str, str]:
    """sha256 of every file under ``path``: a refusal must leave it as it was."""
    root = Path(path)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadServer:
    """``create_app(config)`` served by uvicorn in a thread on a free loopback port."""

    def __init__(self, config: ServeConfig) -> None:
        import uvicorn

        from vitcnn_store.serve.app import create_app

        self.config = replace(config, port=free_port())
        self.app = create_app(self.config)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.config.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.config.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.jobs.stop()

    def request(
        self,
        path: str,
        *,
        token: str | None = None,
        method: str = "GET",
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers, body)`` of one request (errors included, not raised)."""
        hdrs = dict(headers or {})
        token = self.config.token if token is None else token
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, path: str, **kw: Any) -> Any:
        status, _, body = self.request(path, **kw)
        assert status in (200, 202), (status, body[:300])
        return json.loads(body)


@pytest.fixture(scope="session")
def serve_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Runs ``vit`` (blocks, attention) and ``resnet`` (stages) over 16 built-in faces,
    extracted in this process, plus the CLI's attention result ``cli_attn`` of ``vit``."""
    from vitcnn_store.cli import main

    store = tmp_path_factory.mktemp("serve") / "tiny.zarr"
    extract_tiny(store, "vit", "vit", layers="blocks.*", attention=True, limit=16, chunk_size=8)
    extract_tiny(store, "resnet", "resnet", layers="layer*", limit=16, chunk_size=8)
    argv = [
        "analyze",
        "attention",
        str(store),
        "vit",
        "--name",
        "cli_attn",
        "--no-figure",
        "--no-progress",
    ]
    assert main(argv) == 0
    return str(store)


@pytest.fixture(scope="session")
def open_server(serve_store: str) -> Iterator[ThreadServer]:
    """Read-only, no token, loopback: as ``vitcnn serve STORE`` starts."""
    server = ThreadServer(ServeConfig(store=serve_store))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_server(
    serve_store: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ThreadServer]:
    """Token, jobs on, CORS for one origin, a 20 kB response limit."""
    jobs_dir = tmp_path_factory.mktemp("jobs")
    server = ThreadServer(
        ServeConfig(
            store=serve_store,
            token=TOKEN,
            allow_jobs=True,
            jobs_dir=str(jobs_dir),
            max_response_bytes=20_000,
            cors_origins=("http://example.org",),
        )
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def explorer_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ViT (attention, inputs) and a ResNet over 24 faces with every analysis
    (:mod:`tests.serve.explorer_store`), built once for every pytest-xdist worker:
    only read-only servers serve it."""
    from tests.serve.explorer_store import build_explorer_store

    return str(built_once(tmp_path_factory, "explorer.zarr", build_explorer_store))


@pytest.fixture(scope="session")
def explorer_server(explorer_store: str) -> Iterator[ThreadServer]:
    """The explorer's store served as ``vitcnn serve STORE`` serves it."""
    server = ThreadServer(ServeConfig(store=explorer_store))
    yield server
    server.stop()
