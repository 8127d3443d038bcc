"""A figure is derived data: ``vitcnn report`` keeps one that shows the result it would
draw (stamped by ``vitcnn analyze`` or an earlier report, same plotting code) and draws
every other one again: missing stamp, other plotting-code version, recomputed result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import extract_tiny
from tests.helpers import png_ok
from tests.jobs.test_analyze_common import cli
from vitcnn_store.interface import plots
from vitcnn_store.interface.figure_stamp import STAMP_KEYWORD, read_stamp
from vitcnn_store.interface.report import build_report

# A tiny extraction and several reports: not for the quick loop.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with run ``v`` over 8 images and its CKA result (figure drawn by analyze)."""
    url = tmp_path_factory.mktemp("figs") / "acts.zarr"
    extract_tiny(url, "v", limit=8, chunk_size=8, workers=0)
    assert cli(["analyze", "cka", str(url), "v", "--no-progress"]) == 0
    return url


@pytest.fixture
def store(source: Path, tmp_path: Path) -> Path:
    """A private copy of ``source`` with its figure folder."""
    url = tmp_path / "acts.zarr"
    shutil.copytree(source, url)
    shutil.copytree(f"{source}.figures", f"{url}.figures")
    return url


def _png(store: Path) -> Path:
    return Path(f"{store}.figures") / "v__cka.png"


def _restamp(png: Path, stamp: dict | None) -> None:
    """Rewrite ``png``'s pixels with ``stamp`` (None: no stamp) in place of its own."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if stamp is not None:
        info.add_text(STAMP_KEYWORD.decode(), json.dumps(stamp))
    with Image.open(png) as image:
        image.load()
        image.save(png, pnginfo=info)


def test_report_keeps_the_figure_analyze_drew(store: Path) -> None:
    png = _png(store)
    stamp = read_stamp(png)
    assert stamp is not None and stamp["plots"] == plots.PLOTS_VERSION and stamp["computed_at"]
    before, mtime = png.read_bytes(), png.stat().st_mtime_ns
    page = build_report(str(store))
    assert png.stat().st_mtime_ns == mtime and png.read_bytes() == before
    assert "base64," in page.read_text()
    # Written under temporary names, then renamed: none is left behind.
    assert not [p.name for p in png.parent.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("record", ["missing", "other version", "other digest"])
def test_report_redraws_a_figure_whose_stamp_does_not_match(store: Path, record: str) -> None:
    png = _png(store)
    stamp = read_stamp(png)
    assert stamp is not None
    changed = {
        "missing": None,
        "other version": {**stamp, "plots": plots.PLOTS_VERSION - 1},
        "other digest": {**stamp, "digest": "sha256:" + "0" * 64},
    }[record]
    _restamp(png, changed)
    assert read_stamp(png) == changed
    build_report(str(store))
    assert read_stamp(png) == stamp  # drawn again, from the same result
    png_ok(png)


def test_report_redraws_after_the_result_is_recomputed(store: Path) -> None:
    png = _png(store)
    stamp = read_stamp(png)
    assert stamp is not None
    # --recompute writes the result again: a new commit, so a new stamp, even where the
    # values (and so the digest) come out the same. analyze redraws its figure; a report
    # after a recompute run without figures must redraw it as well.
    assert (
        cli(["analyze", "cka", str(store), "v", "--no-progress", "--recompute", "--no-figure"]) == 0
    )
    assert read_stamp(png) == stamp  # not redrawn yet: --no-figure
    build_report(str(store))
    fresh = read_stamp(png)
    assert fresh is not None and fresh["group"] == stamp["group"]
    assert fresh["computed_at"] != stamp["computed_at"]
    # Kept by the next report, and by analyze reusing the result.
    mtime = png.stat().st_mtime_ns
    build_report(str(store))
    assert cli(["analyze", "cka", str(store), "v", "--no-progress"]) == 0
    assert png.stat().st_mtime_ns == mtime and read_stamp(png) == fresh
