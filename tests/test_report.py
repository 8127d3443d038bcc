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
ANALYSES = {
    "vit": {"cka", "cka__resnet", "attention", "localization"},
    "resnet": {"cka", "localization"},
    "vit_faces": {"skip", "probe"},
    "resnet_faces": {"skip", "probe"},
}
OVERLAYS = {"probe", "skip"}  # every run's curve on one normalized-depth axis
N_FIGURES = sum(len(v) for v in ANALYSES.values()) + len(OVERLAYS)
# The store's figure folder, where vitcnn analyze and vitcnn report also draw (one convention).
FIGURES = "acts.zarr.figures"


@pytest.fixture(scope="module")
def demo(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_quick_end_to_end(demo: Path) -> None:
    store = open_store(str(demo / "acts.zarr"))
    assert store.runs == ["resnet", "resnet_faces", "vit", "vit_faces"]
    for run, names in ANALYSES.items():
        assert store[run].complete
        stored = {k for k, _ in store[run].group["_analyses"].groups()}
        assert names <= stored, (run, stored)
    assert (demo / FIGURES / "report.html").stat().st_size > 10_000
    assert sorted(p.name for p in demo.iterdir()) == ["acts.zarr", FIGURES]


def test_every_figure_is_a_real_png(demo: Path) -> None:
    figures = sorted((demo / FIGURES).glob("*.png"))
    assert len(figures) == N_FIGURES
    for path in figures:
        with Image.open(path) as im:
            im.verify()
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint32)
        # One 24-bit code per pixel: a 1-D unique, not a slow row-wise one (15 s on 16 figures).
        colours = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
        assert len(np.unique(colours)) > 16, path
    assert sorted((demo / FIGURES / "data").glob("*.csv"))


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here")
def test_report_in_headless_browser(demo: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI installs Debian's chromium"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
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
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((demo / FIGURES / "report.html").as_uri())
        page.wait_for_load_state("load")
        sizes = page.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        # The caveats and each figure's protocol are rendered, visible text.
        caveats = page.inner_text("#caveats")
        protocols = page.locator(".protocol").count()
        assert page.locator(".protocol").first.is_visible()
        shot = demo / "screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert errors == []
    assert len(sizes) == N_FIGURES
    assert all(ok and w > 0 and h > 0 for ok, w, h in sizes), sizes
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # not blank
    assert "Caveats" in caveats
    assert protocols == sum(len(v) for v in ANALYSES.values())


def test_probes_use_real_classes_and_baselines(demo: Path) -> None:
    """The demo's probe task is faces vs non-faces (distinct images, two classes), on the
    residual stream, with a cross-validated penalty and the chance level stored."""
    store = open_store(str(demo / "acts.zarr"))
    for run in ("vit_faces", "resnet_faces"):
        ds = store[run].analysis("probe")
        assert ds.attrs["label_names"] == ["non-face", "face"]
        assert float(ds["chance_accuracy"]) == 0.5
        assert set(ds["role"].values.tolist()) == {"stream"}
        assert "cross-validation" in ds.attrs["l2_selection"]
        assert ds["depth_fraction"].values[0] == 0.0 and ds["depth_fraction"].values[-1] == 1.0
    assert store["vit_faces"].analysis("probe")["feature"].values.tolist()[:2] == ["gap", "cls"]
    att = store["vit"].analysis("attention")
    assert float(att["uniform_distance"][0]) > 0  # the baseline at the run's grid
    assert (att["mean_distance_lo"] <= att["mean_distance"]).all()
    for run in ("vit_faces", "resnet_faces"):  # the raw-pixel baseline beside chance
        ds = store[run].analysis("probe")
        assert 0.5 < float(ds["input_accuracy"]) <= 1.0
        assert ds["train_image"].dims == ("repeat", "train_member")
    loc = store["vit"].analysis("localization")
    assert loc.attrs["n_batches"] == 4 and np.isfinite(loc["localization_lo"].values).all()
    assert "localization_input" in loc


def test_report_names_baselines_caveats_and_protocols(demo: Path) -> None:
    page = (demo / FIGURES / "report.html").read_text(encoding="utf-8")
    # The demo's random-init ResNets keep live branches (zero_init_last=False), and say so.
    assert '<section id="caveats">' in page and "zero_init_last=False" in page
    assert "output exactly 0 on every image" not in page  # no dead branches
    store = open_store(str(demo / "acts.zarr"))
    skip = store["resnet_faces"].analysis("skip")
    assert np.isfinite(skip["ratio_spatial"].values).all()
    assert np.isfinite(skip["ratio_spatial_lo"].values).all()
    # A finding's text appears once; figures link only the findings among their layers.
    for line in page.split('<li id="finding-')[1:]:
        text = line.split("</li>")[0].split(": ", 1)[1]
        assert page.count(text) == 1, text
    # Each figure says how it was made and what the paper did.
    assert page.count("This figure:") == sum(len(v) for v in ANALYSES.values())
    assert page.count("<b>Paper:</b>") == page.count("This figure:")
    assert "builtin:faces at 64 px" in page and "n = 10,240" in page
    assert "uniform attention over all" in page and "chance 0.500" in page
    assert page.count("All runs on one normalized-depth axis") == len(OVERLAYS)


def test_every_paper_statement_names_its_section_or_figure() -> None:
    """The report's captions and 'Paper:' lines cite Raghu et al. 2021 by section or figure."""
    import re

    from vitcnn_store.interface.registry import ANALYSES
    from vitcnn_store.interface.report import sections

    cite = re.compile(r"\b(Sec\.|Fig\.|Figs\.|App\.) ?\d")
    for kind, text in ((e.name, e.paper) for e in ANALYSES.values() if e.paper):
        assert cite.search(text), kind
    for kind, (_, caption) in sections():
        if "paper" in caption:
            assert cite.search(caption.split("paper", 1)[1]), kind
