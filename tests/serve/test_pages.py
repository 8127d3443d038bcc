"""The explorer's pages and pictures over HTTP (no browser): every route, its errors, the
picture cache, and the browser token (``?token=`` → an HttpOnly SameSite=Strict cookie)."""

from __future__ import annotations

import http.client
import io
import re

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import TOKEN, ThreadServer, snapshot
from vitcnn_store import open_store

PAGES = [
    ("/", ["vit", "resnet", "vit_tiny_patch16_224", "top_images"]),
    ("/runs/vit", ["Provenance", "blocks.1.attn", "weights_sha256", "/runs/vit/images/23"]),
    ("/runs/vit/layers/blocks.1", ["Channels (192)", "/runs/vit/layers/blocks.1/channels/5"]),
    ("/runs/vit/layers/blocks.1?sort=max&page=2", ["sorted by"]),
    ("/runs/resnet/layers/layer4.1", ["Channels (512)", "2 × 2 positions"]),
    ("/runs/vit/layers/blocks.1/channels/5", ["mean", "c=5", "faces/"]),
    ("/runs/resnet/layers/layer2.0/channels/0", ["layer=layer2.0"]),
    ("/runs/vit/images/3", ["Attention", "head 2", "CLS map", "same image in", "Localization"]),
    ("/runs/vit/images/3?layer=blocks.0.attn&q=cls", ['query: <b id="query-name">CLS']),
    ("/runs/resnet/images/0", ["No stored attention", "Localization"]),
    ("/runs/vit/analyses/cka", ["Hover a cell", "Random-init"]),
    ("/runs/resnet/analyses/cka", ["Caveats", "bitwise-identical"]),
    (
        "/runs/vit/analyses/cka__resnet?a=blocks.0&b=layer2.1",
        ["CKA(vit/blocks.0, resnet/layer2.1)", "/runs/resnet/layers/layer2.1"],
    ),
    ("/runs/vit/analyses/attention", ["uniform attention", "CLS key", "cls_attention"]),
    ("/runs/vit/analyses/probe", ["chance", "accuracy", "Paper:"]),
    ("/runs/resnet/analyses/skip", ["equal norms", "dead", "zero_init_last"]),
    ("/runs/vit/analyses/localization", ["target token", "var=localization"]),
    ("/runs/vit/analyses/top_images", ["maximum over positions"]),
]


@pytest.mark.parametrize(("path", "expected"), PAGES)
def test_every_page_type_answers_html(
    explorer_server: ThreadServer, path: str, expected: list[str]
) -> None:
    status, headers, body = explorer_server.request(path)
    assert status == 200, body[:300]
    assert headers["content-type"].startswith("text/html")
    text = body.decode()
    for word in expected:
        assert word in text, (path, word)
    # Offline: the page loads nothing from another host.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path


def _png(server: ThreadServer, path: str) -> tuple[np.ndarray, dict[str, str]]:
    status, headers, body = server.request(path)
    assert status == 200 and headers["content-type"] == "image/png", (path, body[:200])
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")), headers


def test_pictures_vary_and_are_cached_with_etags(explorer_server: ThreadServer) -> None:
    local = open_store(explorer_server.config.store)["vit"]
    image, headers = _png(explorer_server, "/png/runs/vit/images/2?size=64")
    assert image.shape == (64, 64, 3) and image.std() > 5
    # The stored input, un-normalized, is what is drawn.
    want = np.clip(local.inputs.values[2].astype(np.float32) * 0.5 + 0.5, 0, 1) * 255
    assert np.abs(image.astype(float) - want).mean() < 4
    status, again, _ = explorer_server.request(
        "/png/runs/vit/images/2?size=64", headers={"If-None-Match": headers["etag"]}
    )
    assert status == 304 and again["etag"] == headers["etag"]
    paths = [
        "/png/runs/vit/images/3/channel?layer=blocks.1&c=5&size=96",
        "/png/runs/resnet/images/3/channel?layer=layer3.0&c=1&size=96",
        "/png/runs/vit/images/3/attention?layer=blocks.1.attn&q=0&head=1",
        "/png/runs/vit/images/3/localization?name=localization&target=0",
        "/png/runs/vit/analyses/cka__resnet/matrix?var=cka&cell=10",
        "/png/runs/vit/analyses/attention/grid?var=cls_attention&at=1,2",
    ]
    for path in paths:
        picture, _ = _png(explorer_server, path)
        assert picture.std() > 1, path
    a, _ = _png(explorer_server, "/png/runs/vit/images/3/attention?layer=blocks.1.attn&q=1")
    b, _ = _png(explorer_server, "/png/runs/vit/images/3/attention?layer=blocks.1.attn&q=16")
    assert not np.array_equal(a, b)  # another query patch, another map


def test_channel_map_is_the_stored_activation(explorer_server: ThreadServer) -> None:
    from vitcnn_store.serve.pages.data import channel_map

    run = open_store(explorer_server.config.store)["vit"]
    grid = channel_map(run, "blocks.1", 4, 7)
    x = run["blocks.1"].values[4, 1:, 7].astype(float)  # patch tokens in row-major order
    np.testing.assert_array_equal(grid, x.reshape(4, 4))


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/runs/nope", 404),
        ("/runs/vit/layers/blocks.9", 404),
        ("/runs/vit/layers/blocks.1?sort=size", 400),
        ("/runs/vit/layers/blocks.1/channels/192", 404),
        ("/runs/vit/images/24", 404),
        ("/runs/vit/images/2?q=99", 400),
        ("/runs/vit/images/2?layer=blocks.7.attn", 404),
        ("/runs/resnet/images/2?q=cls", 200),  # no attention: nothing to pick from
        ("/runs/vit/analyses/nope", 404),
        ("/runs/vit/analyses/cka?a=blocks.0&b=nope", 404),
        ("/png/runs/vit/images/2?size=5000", 400),
        ("/png/runs/vit/images/2/attention?layer=blocks.1.attn&q=0&head=9", 404),
        ("/png/runs/vit/images/2/channel?layer=blocks.1&c=999", 404),
        ("/png/runs/vit/analyses/attention/grid?var=cls_attention&at=0", 400),
        ("/static/app.py", 404),
        ("/static/..%2F__init__.py", 404),
        ("/runs/..%2F..%2Fetc", 404),
    ],
)
def test_bad_requests_answer_one_line_json(
    explorer_server: ThreadServer, path: str, status: int
) -> None:
    got, headers, body = explorer_server.request(path)
    assert got == status, (path, body[:300])
    if status >= 400:
        assert headers["content-type"] == "application/json" and b"error" in body


def test_pages_write_nothing(explorer_server: ThreadServer, explorer_store: str) -> None:
    before = snapshot(explorer_store)
    for path, _ in PAGES:
        explorer_server.request(path)
    assert snapshot(explorer_store) == before


@pytest.fixture(scope="module")
def token_explorer(explorer_store: str) -> ThreadServer:
    from vitcnn_store.serve.config import ServeConfig

    server = ThreadServer(ServeConfig(store=explorer_store, token=TOKEN))
    yield server
    server.stop()


def _raw(server: ThreadServer, path: str, headers: dict[str, str] | None = None) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", server.config.port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def test_browser_token_sets_a_strict_httponly_cookie(token_explorer: ThreadServer) -> None:
    assert _raw(token_explorer, "/")[0] == 401
    assert _raw(token_explorer, "/runs/vit?token=wrong-token-0123456789")[0] == 401
    status, headers, _ = _raw(token_explorer, "/runs/vit?page=1&token=" + TOKEN)
    assert status == 303 and headers["location"] == "/runs/vit?page=1"  # the token leaves the URL
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    value = cookie.split(";")[0]
    assert _raw(token_explorer, "/runs/vit", {"Cookie": value})[0] == 200
    assert _raw(token_explorer, "/png/runs/vit/images/0", {"Cookie": value})[0] == 200
    assert _raw(token_explorer, "/runs/vit", {"Cookie": "vitcnn_token=nope"})[0] == 401
    # The header keeps working; the redirect never points to another host.
    assert _raw(token_explorer, "/", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    status, headers, _ = _raw(token_explorer, "//evil.example/x?token=" + TOKEN)
    assert (
        status == 303
        and headers["location"].startswith("/")
        and not headers["location"].startswith("//")
    )
    # A POST cannot trade ?token= for a cookie.
    conn = http.client.HTTPConnection("127.0.0.1", token_explorer.config.port, timeout=30)
    conn.request("POST", "/api/jobs?token=" + TOKEN, body=b"{}")
    assert conn.getresponse().status == 401
    conn.close()
