"""Reductions at extraction, against plain numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitcnn_store.errors import LayerPatternError, UsageError
from vitcnn_store.models.reduce import (
    Reduction,
    assign_reductions,
    parse_reduce_item,
    reduced_attrs,
    resolve_reduction,
)


def numpy_pool(a: np.ndarray, k: int) -> np.ndarray:
    """(n, h, w, c) → K×K windows with stride K; edge windows average what they cover."""
    h, w = a.shape[1:3]
    rows = [a[:, i : i + k] for i in range(0, h, k)]
    return np.stack(
        [np.stack([r[:, :, j : j + k].mean(axis=(1, 2)) for j in range(0, w, k)], 1) for r in rows],
        1,
    )


def token_coords(prefix: int, gh: int, gw: int, patch: int = 16) -> dict[str, np.ndarray]:
    kinds = (
        ["cls"] + ["reg"] * (prefix - 1) + ["patch"] * (gh * gw)
        if prefix
        else ["patch"] * (gh * gw)
    )
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    nan = np.full(prefix, np.nan)
    return {
        "token_kind": np.array(kinds),
        "token_y": np.concatenate([nan, (rows + 0.5) * patch]).astype(np.float32),
        "token_x": np.concatenate([nan, (cols + 0.5) * patch]).astype(np.float32),
    }


def test_parse_and_refuse() -> None:
    assert parse_reduce_item(" blocks.* = pool:3 ") == "blocks.*=pool:3"
    assert str(Reduction.parse("cls")) == "cls"
    for bad in ("blocks.*", "blocks.*=max", "blocks.*=pool:0", "blocks.*=pool:x", "=cls"):
        with pytest.raises(UsageError, match="PATTERN=cls"):
            parse_reduce_item(bad)


def test_gap_is_accepted_as_mean_and_recorded_as_mean() -> None:
    """The analyses' name of the same operation: accepted at extraction, stored as ``mean``."""
    from vitcnn_store.models.reduce import EXTRACT_ALIASES, EXTRACT_REDUCTIONS
    from vitcnn_store.store.layout import FEATURE_REDUCTIONS

    assert parse_reduce_item("blocks.*=gap") == "blocks.*=mean"
    assert set(EXTRACT_ALIASES) <= set(FEATURE_REDUCTIONS)
    assert set(EXTRACT_ALIASES.values()) <= set(EXTRACT_REDUCTIONS)


def test_assign_matches_chosen_layers_and_refuses_conflicts() -> None:
    layers = ["blocks.0", "blocks.1", "norm"]
    assert set(assign_reductions(layers, ["blocks.*=mean", "norm=cls"])) == set(layers)
    with pytest.raises(LayerPatternError, match="layer9"):
        assign_reductions(layers, ["layer9=mean"])
    with pytest.raises(UsageError, match="both mean and cls"):
        assign_reductions(layers, ["blocks.*=mean", "blocks.1=cls"])


@pytest.mark.parametrize("how", ["cls", "mean", "pool:2", "pool:3"])
def test_token_reductions_equal_numpy(how: str) -> None:
    rng = np.random.default_rng(0)
    prefix, gh, gw, c = 2, 5, 4, 6
    x = rng.normal(size=(3, prefix + gh * gw, c)).astype(np.float32)
    coords = token_coords(prefix, gh, gw)
    fitted, kind, shape, new = resolve_reduction(
        "b", Reduction.parse(how), "token", x.shape[1:], coords
    )
    got = fitted.apply(torch.from_numpy(x)).numpy()
    assert got.shape[1:] == shape
    if how == "cls":
        np.testing.assert_array_equal(got, x[:, 0])
        assert kind == "pooled"
    elif how == "mean":
        np.testing.assert_allclose(got, x[:, prefix:].mean(1), rtol=1e-6, atol=1e-6)
        assert kind == "pooled"
    else:
        k = int(how.split(":")[1])
        grid = x[:, prefix:].reshape(3, gh, gw, c)
        pooled = numpy_pool(grid, k)
        np.testing.assert_array_equal(got[:, :prefix], x[:, :prefix])  # prefix tokens kept
        np.testing.assert_allclose(got[:, prefix:], pooled.reshape(3, -1, c), rtol=1e-5, atol=1e-6)
        assert kind == "token"
        gy, gx = pooled.shape[1:3]
        assert list(new["token_kind"]) == ["cls", "reg"] + ["patch"] * (gy * gx)
        # Window centres: the mean of the pixel centres each window covers.
        centres = (np.arange(gh) + 0.5) * 16
        expected_y = [centres[i : i + k].mean() for i in range(0, gh, k)]
        np.testing.assert_allclose(new["token_y"][prefix::gx], expected_y, atol=1e-6)


@pytest.mark.parametrize("how", ["mean", "pool:2", "pool:3"])
def test_spatial_reductions_equal_numpy(how: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 8, 5)).astype(np.float32)
    coords = {"y": (np.arange(7) + 0.5) * 4, "x": (np.arange(8) + 0.5) * 4}
    fitted, kind, shape, new = resolve_reduction(
        "l", Reduction.parse(how), "spatial", x.shape[1:], coords
    )
    got = fitted.apply(torch.from_numpy(x)).numpy()
    assert got.shape[1:] == shape
    if how == "mean":
        np.testing.assert_allclose(got, x.mean((1, 2)), rtol=1e-5, atol=1e-6)
        assert kind == "pooled" and new == {}
    else:
        k = int(how.split(":")[1])
        np.testing.assert_allclose(got, numpy_pool(x, k), rtol=1e-5, atol=1e-6)
        assert len(new["y"]) == -(-7 // k) and len(new["x"]) == -(-8 // k)


def test_reductions_a_layer_cannot_take_are_refused() -> None:
    spatial = {"y": np.arange(4.0), "x": np.arange(4.0)}
    with pytest.raises(LayerPatternError, match="no CLS token"):
        resolve_reduction("l", Reduction.parse("cls"), "spatial", (4, 4, 2), spatial)
    with pytest.raises(LayerPatternError, match="nothing to reduce"):
        resolve_reduction("l", Reduction.parse("mean"), "pooled", (8,), {})
    no_cls = token_coords(0, 2, 2)
    with pytest.raises(LayerPatternError, match="no CLS token"):
        resolve_reduction("l", Reduction.parse("cls"), "token", (4, 3), no_cls)
    other = {
        "token_kind": np.array(["other"] * 4),
        "token_y": np.full(4, np.nan),
        "token_x": np.full(4, np.nan),
    }
    with pytest.raises(LayerPatternError, match="not prefix tokens followed by a patch grid"):
        resolve_reduction("l", Reduction.parse("pool:2"), "token", (4, 3), other)


def test_attrs_record_the_reduction() -> None:
    fitted, *_ = resolve_reduction(
        "l",
        Reduction.parse("pool:2"),
        "spatial",
        (4, 4, 2),
        {"y": np.arange(4.0), "x": np.arange(4.0)},
    )
    assert reduced_attrs(fitted, (4, 4, 2)) == {"reduction": "pool:2", "unreduced_shape": [4, 4, 2]}
    assert reduced_attrs(None, (4,)) == {}
