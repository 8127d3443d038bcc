"""``vitcnn extract --pretrained`` end to end with no network: timm resolves the weights
through huggingface_hub from a temporary hub cache laid out as the hub leaves it.

timm 1.0.31 loads ``pretrained=True`` for ``vit_tiny_patch16_224`` from its default
tag's ``hf_hub_id`` (``timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k``) with
``load_state_dict_from_hf``, which asks ``hf_hub_download`` for ``model.safetensors``
at revision ``main``. Offline (``HF_HUB_OFFLINE=1``), huggingface_hub reads the
commit hash from ``<HF_HUB_CACHE>/models--timm--<name>/refs/main`` and returns
``snapshots/<commit>/model.safetensors``. The test writes weights there (a real
timm model's state dict with seeded, non-default values), runs the CLI in a
subprocess (huggingface_hub reads its settings when imported), and checks the stored
activations against a plain forward pass with those weights and the provenance
against the hub id and the weights' hash. The job extracts in that process
(``--workers 0``): only the driver loads weights (Ray actors get the driver's module,
jobs/worker.py), so a Ray cluster would add seconds and guard nothing here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import module_outputs

MODEL = "vit_tiny_patch16_224"
HUB_ID = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
ARGS = {"depth": 2, "img_size": 32}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _weights() -> dict:
    import timm
    import torch

    torch.manual_seed(1234)  # not ModelSpec's random-init seed: the load must matter
    model = timm.create_model(MODEL, pretrained=False, **ARGS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # no zero-initialised tensor left as it was
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _fill_cache(hub_cache: Path, state: dict) -> None:
    from safetensors.torch import save_file

    repo = hub_cache / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file(state, str(snapshot / "model.safetensors"))


def _reference(state: dict, images: list) -> dict[str, np.ndarray]:
    """Residual-stream outputs of a plain timm forward with ``state`` (hooks of our own)."""
    import timm
    import torch

    from vitcnn_store.models import data_config, make_transform

    model = timm.create_model(MODEL, pretrained=False, **ARGS)
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.stack([make_transform(data_config(model, ARGS["img_size"]))(im) for im in images])
    names = ["norm_pre", "blocks.0", "blocks.1"]
    return {n: v.numpy() for n, v in module_outputs(model, x, names).items()}


def test_extract_pretrained_offline_from_a_hub_cache(tmp_path: Path) -> None:
    from vitcnn_store import open_store
    from vitcnn_store.data import open_image_set
    from vitcnn_store.models import ModelSpec, build_model, weights_sha256

    state = _weights()
    hf_home = tmp_path / "hf"
    _fill_cache(hf_home / "hub", state)
    store = tmp_path / "p.zarr"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "vitcnn_store.cli",
        "extract",
        MODEL,
        "--pretrained",
        "--model-arg",
        "depth=2",
        "--img-size",
        "32",
        "--images",
        "builtin:faces",
        "--limit",
        "8",
        "--chunk-size",
        "4",
        "--store",
        str(store),
        "--run",
        "pre",
        "--layers",
        "preset:blocks",
        "--workers",
        "0",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]

    run = open_store(str(store))["pre"]
    assert run.attrs["weights_source"] == "timm-pretrained"
    assert run.attrs["weights_hub_id"] == HUB_ID
    # The recorded hash is the hash of exactly these weights.
    import timm

    model = timm.create_model(MODEL, pretrained=False, **ARGS)
    model.load_state_dict(state)
    assert run.attrs["weights_sha256"] == weights_sha256(model)
    assert run.attrs["weights_sha256"] != weights_sha256(
        build_model(ModelSpec(MODEL, **{"img_size": 32, "model_args": {"depth": 2}}))
    )

    images = open_image_set("builtin:faces", limit=8)
    ref = _reference(state, [images.load(i) for i in range(8)])
    for name, expected in ref.items():
        stored = run[name].values.astype(np.float32)
        # float16 storage: half an ulp of the value, plus batch-order roundoff.
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3, err_msg=name)
    assert not np.allclose(run["blocks.1"].values, 0.0)


def test_pretrained_without_cache_offline_is_one_line_error(tmp_path: Path) -> None:
    """No weights in the cache and no network: exit 2 naming the cure, no traceback."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty"),
        "HF_HUB_CACHE": str(tmp_path / "empty" / "hub"),
    }
    cmd = [
        sys.executable,
        "-m",
        "vitcnn_store.cli",
        "extract",
        MODEL,
        "--pretrained",
        "--model-arg",
        "depth=2",
        "--img-size",
        "32",
        "--images",
        "builtin:faces",
        "--limit",
        "4",
        "--store",
        str(tmp_path / "n.zarr"),
        "--run",
        "pre",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode in (1, 2), done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert "--checkpoint" in lines[0]
    assert not (tmp_path / "n.zarr").exists()
