"""Fixtures of the job tests, found by pytest (never imported by a test module)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def synth_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The runs of :func:`synth`, made once per worker; read-only (copied, never written)."""
    from tests.jobs.test_analyze_common import ids, make_run

    url = str(tmp_path_factory.mktemp("synth-template") / "s.zarr")
    make_run(url, "vit", ids(48), failed=[5])
    make_run(url, "resnet", ids(48), family="resnet", seed=1)
    make_run(url, "partial", ids(48), units=[0, 2], seed=2)
    return url


@pytest.fixture(scope="module")
def synth(synth_template: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Runs: vit (48 images, image 5 failed), resnet, partial (units 0 and 2 of 6).

    One store per test module: the analysis tests write their results into it. A copy of
    :func:`synth_template`: seven modules use it, and copying its files costs a tenth of
    writing its runs.
    """
    url = tmp_path_factory.mktemp("synth") / "s.zarr"
    return str(shutil.copytree(synth_template, url))
