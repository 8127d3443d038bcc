"""The explorer in a real headless browser (Debian's chromium through playwright): a bounded
crawl from ``/`` through every kind of linked page with no HTTP error, no console error and
no blank picture, and a click on a query patch that changes the attention maps.
Screenshots are kept under pytest's ``tmp_path`` (the path is printed).

A page is ready when its load event has fired and every picture is complete (loaded or
broken): the explorer's script fetches nothing, so waiting for Playwright's
``networkidle`` (500 ms without a request, per page) would only add those 500 ms."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.serve.conftest import ThreadServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MAX_PAGES = 40
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here"
)

# Per <img>: loaded, and its pixels vary (drawn to a canvas, same origin).
_PICTURES = """() => Array.from(document.images).map(img => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  if (!img.complete || !c.width) return [img.src, false, 0];
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let lo = 255, hi = 0;
  for (let i = 0; i < d.length; i += 4) { const v = d[i] + d[i+1] + d[i+2];
    lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return [img.src, true, hi - lo];
})"""


_SETTLED = "() => Array.from(document.images).every(img => img.complete)"


def kind(path: str) -> str:
    """A page's type: its path with names and numbers replaced (``/runs/*/layers/*``)."""
    parts = path.strip("/").split("/")
    return (
        "/" + "/".join(p if i % 2 == 0 else "*" for i, p in enumerate(parts))
        if path != "/"
        else "/"
    )


def _pictures_settled(page: Any) -> None:
    """Wait until every ``<img>`` of ``page`` is complete (lazy thumbnails load once laid
    out); one that never is fails the caller's picture check, with its name."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function(_SETTLED, timeout=20_000)


def _browser(p: Any) -> Any:
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )


def test_crawl_every_page_kind(explorer_server: ThreadServer, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    base = explorer_server.url
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"\nexplorer screenshots: {shots}")
    errors: list[str] = []
    visited: list[str] = []
    seen_kinds: Counter[str] = Counter()
    frontier = ["/"]
    queued = {"/"}
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on(
            "console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None
        )
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.on(
            "response",
            lambda r: errors.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None,
        )
        while frontier and len(visited) < MAX_PAGES:
            # The least-visited kind of page first: every kind is reached within the bound.
            frontier.sort(key=lambda u: seen_kinds[kind(urlsplit(u).path)])
            path = frontier.pop(0)
            response = page.goto(base + path)  # returns once the page's load event fired
            _pictures_settled(page)
            assert response is not None and response.status == 200, path
            visited.append(path)
            k = kind(urlsplit(path).path)
            if not seen_kinds[k]:
                name = re.sub(r"[^A-Za-z0-9]+", "_", k).strip("_") or "index"
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            seen_kinds[k] += 1
            for src, loaded, spread in page.evaluate(_PICTURES):
                assert loaded, f"{path}: picture {src} did not load"
                assert spread > 30, f"{path}: picture {src} is blank (spread {spread})"
            for href in page.eval_on_selector_all(
                "a[href]", "els => els.map(e => e.getAttribute('href'))"
            ):
                if href.startswith(("/api/", "/docs", "/zarr", "/png/", "/static/", "http")):
                    continue
                if href not in queued:
                    queued.add(href)
                    frontier.append(href)
        browser.close()
    assert errors == []
    expected = {
        "/",
        "/runs/*",
        "/runs/*/layers/*",
        "/runs/*/layers/*/channels/*",
        "/runs/*/images/*",
        "/runs/*/analyses/*",
    }
    assert expected <= set(seen_kinds), seen_kinds
    assert len(visited) == MAX_PAGES or not frontier


def test_clicking_a_query_patch_changes_the_attention_map(
    explorer_server: ThreadServer, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(explorer_server.url + "/runs/vit/images/2?layer=blocks.1.attn&q=cls")
        _pictures_settled(page)
        first = page.locator("img.attn").first
        before_src = first.get_attribute("src")
        before = first.screenshot()
        page.screenshot(path=str(tmp_path / "before_click.png"))
        page.locator("#main-image").click(position={"x": 10, "y": 10})  # the top-left patch
        # The click's handler sets the maps' new src before click() returns.
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('img.attn')).every(i => i.complete)"
        )
        after_src = first.get_attribute("src")
        after = first.screenshot()
        page.screenshot(path=str(tmp_path / "after_click.png"))
        assert "q=1" in page.url  # the shareable URL follows the choice
        assert page.inner_text("#query-name") == "patch token 1"
        browser.close()
    print(f"\nclick screenshots: {tmp_path}")
    assert errors == []
    assert before_src != after_src and "q=1&" in after_src + "&"
    assert before != after  # the drawn map changed, not only its URL
