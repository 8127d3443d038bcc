"""Skip ratios of pre-activation ResNets (ResNetV2, the paper's BiT ResNets), checked
against forward hooks on the raw timm model: z is what the block adds its branch to
(its input, or its ``downsample``), f(z) the branch as it enters the sum."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobs.analyze.skip import SkipConfig, run_skip
from vitcnn_store import open_store
from vitcnn_store.models import ModelSpec, build_model

# A bottleneck network (one block per stage, every block with a projection) and a
# basic-block one whose first blocks have none (z is the stem, then the previous block).
SPECS = {
    "bottleneck": ModelSpec(
        "resnetv2_50", img_size=32, model_args={"layers": [1, 1, 1, 1], "stem_type": "fixed"}
    ),
    "basic": ModelSpec("resnetv2_18", img_size=32, model_args={"layers": [2, 1, 1, 1]}),
}


def _extract(url: str, run: str, spec: ModelSpec, layers: str) -> None:
    from jobs.extract import ExtractConfig, extract

    extract(
        ExtractConfig(
            model=spec,
            images="builtin:faces",
            store=url,
            run=run,
            layers=layers,
            limit=12,
            chunk_size=6,
            inputs=True,
            dtype="float32",
            progress=False,
        )
    )


@pytest.fixture(scope="module")
def v2_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("resnetv2") / "v2.zarr")
    for run, spec in SPECS.items():
        _extract(url, run, spec, "preset:paper")
    return url


def _reference(spec: ModelSpec, x: Any) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per block, (z, f(z), output) as NHWC float64, from hooks on the raw timm model.

    z: the block's input, or its ``downsample`` output when it has one (timm's
    ``shortcut``); f(z): the input of ``drop_path``, the branch's last step before
    ``x + shortcut``; output: the block's output.
    """
    import torch
    from timm.models.resnetv2 import PreActBasic, PreActBottleneck

    model = build_model(spec)
    seen: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, block in model.named_modules():
        if not isinstance(block, (PreActBasic, PreActBottleneck)):
            continue
        store = seen.setdefault(name, {})
        hooks.append(
            block.register_forward_pre_hook(
                lambda _m, a, s=store: s.__setitem__("input", a[0].clone())
            )
        )
        hooks.append(
            block.register_forward_hook(lambda _m, _a, o, s=store: s.__setitem__("out", o.clone()))
        )
        hooks.append(
            block.drop_path.register_forward_pre_hook(
                lambda _m, a, s=store: s.__setitem__("f", a[0].clone())
            )
        )
        if block.downsample is not None:
            hooks.append(
                block.downsample.register_forward_hook(
                    lambda _m, _a, o, s=store: s.__setitem__("shortcut", o.clone())
                )
            )
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()

    def nhwc(t: torch.Tensor) -> np.ndarray:
        return t.permute(0, 2, 3, 1).double().numpy()

    return {
        name: (nhwc(s.get("shortcut", s["input"])), nhwc(s["f"]), nhwc(s["out"]))
        for name, s in seen.items()
    }


@pytest.mark.parametrize("run_name", list(SPECS))
def test_ratios_match_hooks_on_the_raw_model(v2_store: str, run_name: str) -> None:
    import torch

    run = open_store(v2_store)[run_name]
    assert run.attrs["model_family"] == "resnetv2"
    x = torch.from_numpy(np.asarray(run.inputs.values, dtype=np.float32)).permute(0, 3, 1, 2)
    ref = _reference(SPECS[run_name], x)
    ds = run_skip(SkipConfig(store=v2_store, run=run_name, progress=False)).dataset
    assert ds["block"].values.tolist() == list(ref)
    for j, (block, (z, f, out)) in enumerate(ref.items()):
        # The pre-activation block outputs exactly z + f(z): no ReLU after the sum.
        np.testing.assert_allclose(z + f, out, rtol=1e-5, atol=1e-5 * np.abs(out).max())
        expected = np.mean(np.linalg.norm(z, axis=-1) / np.linalg.norm(f, axis=-1))
        assert ds["ratio_spatial"].values[0, j] == pytest.approx(expected, rel=1e-4), block
        # What the store holds for z and f(z) is what the model added.
        skip_tap = str(ds["skip_taps"].values[0, j])
        np.testing.assert_allclose(run[skip_tap].values, z, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            run[str(ds["branch_tap"].values[0, j])].values, f, rtol=1e-5, atol=1e-6
        )
    assert ds.attrs["family"] == "resnetv2"
    assert ds.attrs["block_output"].startswith("z + f(z)")
    assert (ds["dead_fraction"].values == 0).all()  # ResNetV2 does not zero-init by default


def test_basic_blocks_without_projection_add_onto_the_previous_tensor(v2_store: str) -> None:
    ds = run_skip(SkipConfig(store=v2_store, run="basic", progress=False)).dataset
    assert ds["skip_tap"].values.tolist() == [
        "stem",
        "stages.0.blocks.0",
        "stages.1.blocks.0.downsample",
        "stages.2.blocks.0.downsample",
        "stages.3.blocks.0.downsample",
    ]
    assert ds["branch_tap"].values[0, 0] == "stages.0.blocks.0.conv2"


def test_v1_results_say_the_block_applies_a_relu(tmp_path: Path) -> None:
    url = str(tmp_path / "v1.zarr")
    spec = ModelSpec(
        "resnet18", img_size=32, model_args={"layers": [1, 1, 1, 1], "zero_init_last": False}
    )
    _extract(url, "r18", spec, "preset:paper")
    ds = run_skip(SkipConfig(store=url, run="r18", progress=False)).dataset
    assert ds.attrs["block_output"].startswith("ReLU(z + f(z))")
