"""Fixtures of the job tests, found by pytest (never imported by a test module)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Runs: vit (48 images, image 5 failed), resnet, partial (units 0 and 2 of 6).

    One store per test module: the analysis tests write their results into it.
    """
    from tests.jobs.test_analyze_common import ids, make_run

    url = str(tmp_path_factory.mktemp("synth") / "s.zarr")
    make_run(url, "vit", ids(48), failed=[5])
    make_run(url, "resnet", ids(48), family="resnet", seed=1)
    make_run(url, "partial", ids(48), units=[0, 2], seed=2)
    return url
