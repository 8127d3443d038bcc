"""Every analysis reads each stored chunk of its data once (issue 11, item 4).

Reads are counted through zarr's own local store (:mod:`tests.jobs.reads`), per
chunk key: the activations, attention and input chunks an analysis needs are
each fetched exactly once, so the bytes read equal the bytes stored.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from jobs.analyze import (
    AttentionConfig,
    CKAConfig,
    LocalizationConfig,
    ProbeConfig,
    SkipConfig,
    run_attention,
    run_cka,
    run_localization,
    run_probe,
    run_skip,
)
from tests.jobs.reads import counted_reads, stored_bytes
from tests.jobs.test_analyze_common import ids, make_run

DATA = ("/activation/c/", "/attention/c/", "/input/c/")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("once") / "s.zarr")
    make_run(url, "vit", ids(96), failed=[5])
    make_run(url, "resnet", ids(96), family="resnet", chunk=16)
    return url


JOBS = {
    "attention": (run_attention, AttentionConfig, {"run": "vit"}),
    "skip": (run_skip, SkipConfig, {"run": "vit"}),
    "skip-resnet": (run_skip, SkipConfig, {"run": "resnet"}),
    "probe": (run_probe, ProbeConfig, {"run": "vit", "shots": 3}),
    "localization": (run_localization, LocalizationConfig, {"run": "vit", "batch_size": 16}),
    "cka": (run_cka, CKAConfig, {"run": "vit", "batch_size": 16, "repeats": 4, "roles": "all"}),
}


@pytest.mark.parametrize("name", list(JOBS))
def test_each_data_chunk_read_once(store: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    job, config, options = JOBS[name]
    with counted_reads(monkeypatch) as reads:
        job(config(store=store, progress=False, name=f"once-{name}", **options))
    per_array: dict[str, int] = defaultdict(int)
    for key, sizes in reads.items():
        marker = next((m for m in DATA if m in key), None)
        if marker is None:
            continue
        assert len(sizes) == 1, f"{name} read {key} {len(sizes)} times"
        per_array[key.split("/c/")[0]] += sum(sizes)
    assert per_array, f"{name} read no data chunks"
    for array, read in per_array.items():
        assert read == stored_bytes(store, array), array  # every chunk of it, once
