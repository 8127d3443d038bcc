"""The worker's unit stages on a real run: an image is hashed from the bytes it is decoded
from, so a file replaced between planning and decoding is never stored under its old hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.extract import ExtractConfig, extract, plan_extraction, prepare_store
from jobs.worker import CHANGED_REASON, UnitExtractor
from tests.conftest import TINY_VIT
from tests.jobs.test_refusal import snapshot
from vitcnn_store import open_store
from vitcnn_store.errors import RunMismatchError
from vitcnn_store.models import ModelSpec
from vitcnn_store.store.verify import verify_store


def _bmp(path: Path, seed: int) -> None:
    # BMP: the same file size whatever the pixels, so nothing but the content changes.
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def _config(url: str, folder: Path, **changes: object) -> ExtractConfig:
    model = ModelSpec(TINY_VIT["name"], img_size=32, model_args={"depth": 1})
    options: dict[str, object] = {
        "images": str(folder),
        "chunk_size": 2,
        "layers": "blocks.0",
        "dtype": "float32",
        "progress": False,
        **changes,
    }
    return ExtractConfig(model=model, store=url, run="r", **options)  # type: ignore[arg-type]


def test_an_image_replaced_during_extraction_is_failed_not_stored(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        _bmp(folder / f"{i}.bmp", i)
    url = str(tmp_path / "acts.zarr")
    cfg = _config(url, folder)
    template = plan_extraction(cfg)  # every image hashed here ...
    prepare_store(cfg, template)
    extractor = UnitExtractor(template.plan, template.model)
    extractor.run_unit(0)
    planned = hashlib.sha256((folder / "3.bmp").read_bytes()).hexdigest()
    _bmp(folder / "3.bmp", 99)  # ... and image 3 (unit 1) replaced before it is decoded
    for unit in (1, 2):
        extractor.run_unit(unit)
    extractor.close()

    run = open_store(url)["r"]
    assert run.failed == {"3.bmp": CHANGED_REASON}
    assert run.image_sha256[3] == planned  # the recorded hash is never of other pixels
    x = run["blocks.0"].values
    assert np.isnan(x[3]).all() and np.isfinite(np.delete(x, 3, axis=0)).all()
    assert list(run.valid) == [True, True, True, False, True, True]
    assert verify_store(url, "r").ok

    # A resumed job sees the file changed since the run recorded it and says so.
    before = snapshot(Path(url))
    with pytest.raises(RunMismatchError, match=r"1 image\(s\) changed .*\(3\.bmp\)"):
        extract(_config(url, folder, resume=True))
    assert snapshot(Path(url)) == before


def test_unchanged_images_are_all_stored(tmp_path: Path) -> None:
    """The decode-time check passes every image that did not change (built-ins included)."""
    url = str(tmp_path / "acts.zarr")
    summary = extract(_config(url, tmp_path, images="builtin:faces", limit=6))
    assert summary.failed == {}
    assert open_store(url)["r"].valid.all()
