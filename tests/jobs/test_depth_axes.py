"""``preset:all`` runs on the depth axis: every layer, whatever its kind, sits by its
position in the forward pass, on both the block-normalised and the layer-count axis."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.analyze.depth import block_depth
from vitcnn_store import open_store
from vitcnn_store.models import ModelSpec

SPECS = {
    "vit": ModelSpec("vit_tiny_patch16_224", img_size=32, model_args={"depth": 2}),
    "resnet": ModelSpec("resnet50", img_size=32, model_args={"layers": [1, 1, 1, 1]}),
    "resnetv2": ModelSpec("resnetv2_50", img_size=32, model_args={"layers": [1, 2, 1, 1]}),
}


@pytest.fixture(scope="module")
def all_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from jobs.extract import ExtractConfig, extract

    url = str(tmp_path_factory.mktemp("all") / "all.zarr")
    for run, spec in SPECS.items():
        extract(
            ExtractConfig(
                model=spec,
                images="builtin:faces",
                store=url,
                run=run,
                layers="preset:all",
                limit=4,
                chunk_size=4,
                progress=False,
            )
        )
    return url


@pytest.mark.parametrize(("run_name", "count"), [("vit", 15), ("resnet", 21), ("resnetv2", 25)])
def test_positions_follow_the_forward_pass(all_store: str, run_name: str, count: int) -> None:
    run = open_store(all_store)[run_name]
    layers = sorted(run.layers, key=lambda n: int(run[n].attrs["depth_index"]))
    assert len(layers) == count
    by_block, _ = block_depth(run, layers)
    by_count = np.array([float(run[n].attrs["depth_fraction"]) for n in layers])
    # Strictly increasing in forward order: no two layers share a cell of a heatmap.
    assert np.all(np.diff(by_block) > 0) and np.all(np.diff(by_count) > 0)
    assert by_block[0] == by_count[0] == 0.0 and by_block[-1] == by_count[-1] == 1.0
    # Block outputs sit at k/K on the block-normalised axis.
    outputs = [i for i, n in enumerate(layers) if run[n].attrs.get("role") == "stream"][1:]
    np.testing.assert_allclose(
        by_block[outputs], np.arange(1, len(outputs) + 1) / len(outputs), atol=1e-12
    )


def test_forward_order_puts_units_before_their_block(all_store: str) -> None:
    run = open_store(all_store)["resnetv2"]
    order = sorted(run.layers, key=lambda n: int(run[n].attrs["depth_index"]))
    block = "stages.1.blocks.1"
    mine = [n for n in order if n.startswith(block)]
    assert mine == [f"{block}.conv1", f"{block}.conv2", f"{block}.conv3", block]
