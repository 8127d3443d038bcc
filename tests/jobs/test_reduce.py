"""``--reduce`` end to end: stored reductions equal the reduction of a full extraction, and
analyses that need what a reduction removed refuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.conftest import extract_tiny
from tests.models.test_reduce import numpy_pool
from vitcnn_store import open_store
from vitcnn_store.errors import UsageError

OPTIONS = {"dtype": "float32", "inputs": True, "limit": 24, "chunk_size": 8}
VIT_REDUCE = ("blocks.0=cls", "blocks.1=pool:2", "norm_pre=mean")  # preset:blocks, all three
RESNET_REDUCE = ("layer1.*=pool:3", "layer2.0=mean")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("reduce") / "acts.zarr")
    extract_tiny(url, "vit", "vit", layers="preset:blocks", **OPTIONS)
    extract_tiny(url, "vit_r", "vit", layers="preset:blocks", reduce=VIT_REDUCE, **OPTIONS)
    extract_tiny(url, "rn", "resnet", layers="layer1.*,layer2.0", **OPTIONS)
    extract_tiny(url, "rn_r", "resnet", layers="layer1.*,layer2.0", reduce=RESNET_REDUCE, **OPTIONS)
    return url


def test_vit_reductions_equal_the_reduction_of_the_full_run(stores: str) -> None:
    full, red = open_store(stores)["vit"], open_store(stores)["vit_r"]
    assert full.layers == red.layers
    np.testing.assert_allclose(red["blocks.0"].values, full["blocks.0"].values[:, 0], atol=1e-6)
    np.testing.assert_allclose(
        red["norm_pre"].values, full["norm_pre"].values[:, 1:].mean(1), atol=1e-6
    )
    # 32-px input, 16-px patches: a 2×2 grid pooled 2×2 into one token after the CLS token.
    x = full["blocks.1"].values
    pooled = numpy_pool(x[:, 1:].reshape(len(x), 2, 2, -1), 2).reshape(len(x), 1, -1)
    np.testing.assert_allclose(red["blocks.1"].values[:, 1:], pooled, atol=1e-6)
    np.testing.assert_array_equal(red["blocks.1"].values[:, :1], x[:, :1])
    assert list(red["blocks.1"].token_kind.values) == ["cls", "patch"]
    assert float(red["blocks.1"].token_y.values[1]) == 16.0  # centre of the four patches


def test_resnet_reductions_equal_the_reduction_of_the_full_run(stores: str) -> None:
    full, red = open_store(stores)["rn"], open_store(stores)["rn_r"]
    for name in ("layer1.0", "layer1.1"):
        x = full[name].values  # (image, 8, 8, channel): pooled 3×3 into 3×3 windows
        np.testing.assert_allclose(red[name].values, numpy_pool(x, 3), atol=1e-5)
        assert red[name].dims == ("image", "y", "x", "channel")
        np.testing.assert_allclose(red[name].y.values, [6.0, 18.0, 28.0], atol=1e-6)
    np.testing.assert_allclose(
        red["layer2.0"].values, full["layer2.0"].values.mean((1, 2)), atol=1e-5
    )


def test_reductions_are_recorded(stores: str) -> None:
    red = open_store(stores)["vit_r"]
    assert red.attrs["reductions"] == list(VIT_REDUCE)
    assert red["blocks.0"].attrs["reduction"] == "cls"
    assert red["blocks.0"].attrs["unreduced_shape"] == [5, 192]
    assert red["blocks.0"].attrs["kind"] == "pooled"
    assert "reductions" not in open_store(stores)["vit"].attrs
    assert "reduction" not in open_store(stores)["vit"]["blocks.0"].attrs
    # Plain xarray sees the same attributes.
    tree = xr.open_datatree(stores, engine="zarr")
    assert tree["vit_r"]["blocks.1"].attrs["reduction"] == "pool:2"
    assert tree["vit_r"]["blocks.1"]["activation"].shape == (24, 2, 192)


def test_resume_with_other_reductions_is_refused(stores: str) -> None:
    from vitcnn_store.errors import RunMismatchError

    with pytest.raises(RunMismatchError, match="reductions"):
        extract_tiny(
            stores,
            "vit_r",
            "vit",
            layers="preset:blocks",
            reduce=("blocks.0=mean",),
            resume=True,
            **OPTIONS,
        )


def test_localization_refuses_reduced_layers(stores: str, tmp_path: Path) -> None:
    from jobs.analyze.localization import LocalizationConfig, run_localization

    for layer, words in (
        ("blocks.1", "stored reduced (--reduce ...=pool:2)"),
        ("blocks.0", "is pooled"),
    ):
        with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
            run_localization(
                LocalizationConfig(store=stores, run="vit_r", layer=layer, progress=False)
            )
    with pytest.raises(UsageError, match="localization needs its tokens"):
        run_localization(
            LocalizationConfig(store=stores, run="rn_r", layer="layer1.0", progress=False)
        )
    # The unreduced run still localizes.
    result = run_localization(
        LocalizationConfig(store=stores, run="vit", layer="blocks.1", batch_size=24, progress=False)
    )
    assert result.dataset["localization"].shape[1:] == (2, 2)
