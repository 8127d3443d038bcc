"""The demo end to end, and its report in a real headless browser."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitcnn_store import open_store
from vitcnn_store.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ANALYSES = {"vit": {"cka", "cka__resnet", "attention", "localization", "skip", "probe"},
            "resnet": {"cka", "localization", "probe"}}  # fmt: skip


@pytest.fixture(scope="module")
def demo(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_quick_end_to_end(demo: Path) -> None:
    store = open_store(str(demo / "acts.zarr"))
    assert store.runs == ["resnet", "vit"]
    for run, names in ANALYSES.items():
        assert store[run].complete
        stored = {k for k, _ in store[run].group["_analyses"].groups()}
        assert names <= stored, (run, stored)
    assert (demo / "report.html").stat().st_size > 10_000


def test_every_figure_is_a_real_png(demo: Path) -> None:
    figures = sorted((demo / "figures").glob("*.png"))
    assert len(figures) == sum(len(v) for v in ANALYSES.values())
    for path in figures:
        with Image.open(path) as im:
            im.verify()
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16, path
    assert sorted((demo / "data").glob("*.csv"))


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here")
def test_report_in_headless_browser(demo: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI installs Debian's chromium"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((demo / "report.html").as_uri())
        page.wait_for_load_state("load")
        sizes = page.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        shot = demo / "screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert errors == []
    assert len(sizes) == sum(len(v) for v in ANALYSES.values())
    assert all(ok and w > 0 and h > 0 for ok, w, h in sizes), sizes
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # not blank
