"""A rerun of an analysis whose result is stored recomputes and redraws nothing.

Each rerun is the real CLI in a fresh interpreter (:func:`run_cli`). The reuse
check comes first and needs only the parameters, the stored result is not
loaded, and its figure, stamped with the result it shows, is left alone: so
the rerun imports neither matplotlib nor ``distributed`` nor torch, and
changes neither the figure nor any byte of the store. A figure that is gone is
drawn again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import extract_tiny
from tests.test_light_startup import run_cli, snapshot
from vitcnn_store.interface.figure_stamp import read_stamp

#: What a reuse must not import.
NOT_ON_REUSE = ["matplotlib", "distributed", "torch", "timm", "ray"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with a run ``v`` (blocks and attention) over 8 images."""
    url = tmp_path_factory.mktemp("reuse") / "acts.zarr"
    extract_tiny(url, "v", limit=8, chunk_size=8, workers=0, attention=True)
    return url


def _analyze(tmp_path: Path, analysis: str, store: Path) -> tuple[int, set[str], str]:
    return run_cli(tmp_path, "analyze", analysis, str(store), "v", "--no-progress")


@pytest.mark.parametrize("analysis", ["cka", "attention"])
def test_reuse_loads_and_redraws_nothing(analysis: str, store: Path, tmp_path: Path) -> None:
    from vitcnn_store.cli import main

    # The first run computes and draws: in this process (what it imports is not the
    # question; the redraw below shows that a run that draws is seen importing matplotlib).
    assert main(["analyze", analysis, str(store), "v", "--no-progress"]) == 0
    png = Path(f"{store}.figures") / f"v__{analysis}.png"
    stamp = read_stamp(png)
    assert stamp is not None and stamp["group"].startswith(f"v/_analyses/{analysis}/")
    assert stamp["digest"].startswith("sha256:")
    before, mtime = snapshot(store), png.stat().st_mtime_ns

    code, modules, err = _analyze(tmp_path, analysis, store)
    assert code == 0, err
    assert not [m for m in NOT_ON_REUSE if m in modules], sorted(
        m for m in NOT_ON_REUSE if m in modules
    )
    assert png.stat().st_mtime_ns == mtime
    assert snapshot(store) == before

    # A figure that is gone is drawn again, from the stored result (not recomputed).
    png.unlink()
    code, modules, err = _analyze(tmp_path, analysis, store)
    assert code == 0, err
    assert "matplotlib" in modules and png.exists() and read_stamp(png) == stamp
    assert snapshot(store) == before


def test_reuse_prints_reused_line(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What is printed, not what is imported (the test above): the CLI in this process.
    from vitcnn_store.cli import main

    args = ["analyze", "cka", str(store), "v", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cka: reused " in out and "(same parameters; --recompute to redo)" in out
    assert "figure: " in out
    # --recompute computes again and redraws.
    assert main([*args, "--recompute"]) == 0
    assert "cka: rewrote " in capsys.readouterr().out
