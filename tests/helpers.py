"""Small helpers shared by tests (kept out of conftest so they can be imported)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import zarr


def store_arrays(url: str, run: str) -> dict[str, np.ndarray]:
    """Every array of a run, read with plain zarr, keyed by path (analyses excluded)."""
    group = zarr.open_group(url, mode="r", path=run, use_consolidated=False)
    out: dict[str, np.ndarray] = {}

    def visit(g: zarr.Group, prefix: str) -> None:
        for key, node in g.members():
            path = f"{prefix}{key}"
            if key.startswith("_"):
                continue
            if isinstance(node, zarr.Group):
                visit(node, path + "/")
            else:
                values = node[...]
                if values.dtype.kind not in "biufc":
                    values = np.array(values.tolist(), dtype=str)
                out[path] = values

    visit(group, "")
    return out


def assert_runs_identical(url_a: str, run_a: str, url_b: str, run_b: str) -> None:
    """Array-for-array identity of two runs (NaN equal to NaN)."""
    a, b = store_arrays(url_a, run_a), store_arrays(url_b, run_b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        if a[key].dtype.kind == "f":
            assert np.array_equal(a[key], b[key], equal_nan=True), key
        else:
            assert np.array_equal(a[key], b[key]), key


def module_outputs(model: Any, x: Any, names: list[str]) -> dict[str, Any]:
    """Outputs (torch tensors) of ``model``'s modules ``names`` on the batch ``x``, taken
    with the test's own forward hooks: an independent reference for what extraction stores."""
    import torch

    modules = dict(model.named_modules())
    out: dict[str, Any] = {}
    hooks = [
        modules[n].register_forward_hook(
            lambda _m, _i, o, n=n: out.__setitem__(n, o.detach().clone())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def png_ok(path: Any, colours: int = 8) -> None:
    """Assert ``path`` is a PNG with more than ``colours`` colours (not blank)."""
    from pathlib import Path

    from PIL import Image

    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        # getcolors gives None past ``colours`` colours: a count that stops early, where a
        # row-wise np.unique of the pixels sorted them all (seconds per figure).
        assert image.convert("RGBA").getcolors(colours) is None, f"{path}: one colour or few"


def snapshot(path: Any) -> dict[str, str]:
    """Every file under folder ``path`` with a hash of its bytes (``{}`` if it does not exist):
    a refusal must leave it equal."""
    import hashlib
    from pathlib import Path

    root = Path(path)
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@contextmanager
def moto_server() -> Iterator[str]:
    """An S3 server on loopback (moto's S3 app in a thread, as s3fs's own tests use
    moto); yields its endpoint, ``http://127.0.0.1:<port>``. moto's servers in one
    process share their buckets.

    moto's ``ThreadedMotoServer`` serves every AWS service, finding each request's among
    them (a listing of moto's package folders per request): a quarter of the CPU of each
    S3 request, which the S3 tests make by the thousand."""
    import threading

    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = create_backend_app("s3")
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """An S3 server on loopback (:func:`moto_server`; it honours ``If-None-Match: *``
    on PUT) holding ``bucket``, reached through the AWS environment variables while the
    block runs; yields ``s3://<bucket>``."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in (*env, "AWS_ENDPOINT_URL")}
    with moto_server() as endpoint:
        os.environ.update(env, AWS_ENDPOINT_URL=endpoint)
        try:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir(bucket)
            yield f"s3://{bucket}"
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


#: A request in moto's log: method, path, query. A 404 is logged in colour: the method
#: follows an escape sequence.
MOTO_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)?(\w+) ([^ ?]*)(\?[^ ]*)? HTTP')


class MotoRequests(logging.Handler):
    """The requests an in-process moto server (:func:`moto_s3`) logs, as
    ``(method, path, listing?)`` in ``seen``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, str, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = MOTO_REQUEST.search(record.getMessage())
        if m:
            self.seen.append((m.group(1), m.group(2), "list-type" in (m.group(3) or "")))


@contextmanager
def moto_requests() -> Iterator[MotoRequests]:
    """Count the requests :func:`moto_s3`'s server answers while the block runs."""
    handler = MotoRequests()
    log = logging.getLogger("werkzeug")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
