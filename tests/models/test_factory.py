"""Building models: random init, checkpoints (safe loading, resampling), names, preprocessing."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitcnn_store.errors import CheckpointError, ModelError, UnknownModelError
from vitcnn_store.models import ModelSpec, build_model, data_config, weights_sha256

TINY = {"img_size": 32, "model_args": {"depth": 1}}


def tiny_vit(**changes: object) -> ModelSpec:
    return ModelSpec("vit_tiny_patch16_224", **{**TINY, **changes})  # type: ignore[arg-type]


def test_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = weights_sha256(build_model(tiny_vit()))
    assert torch.equal(torch.rand(1), before)
    assert a == weights_sha256(build_model(tiny_vit()))
    assert a != weights_sha256(build_model(tiny_vit(seed=1)))


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError, match="vit_base_patch16_224"):
        build_model(ModelSpec("vit_bse_patch16_224"))


def test_bad_model_args_are_a_model_error() -> None:
    with pytest.raises(ModelError, match="no_such_arg"):
        build_model(ModelSpec("resnet18", model_args={"no_such_arg": 1}))


def test_img_size_for_any_family() -> None:
    model = build_model(ModelSpec("resnet18", img_size=48))
    assert data_config(model, 48)["input_size"] == [3, 48, 48]
    vit = build_model(tiny_vit(img_size=48))
    assert data_config(vit, 48)["input_size"] == [3, 48, 48]
    assert vit.patch_embed.grid_size == (3, 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    source = build_model(tiny_vit(seed=7))
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = build_model(tiny_vit(checkpoint=str(path)))
    assert weights_sha256(loaded) == weights_sha256(source)


def test_checkpoint_position_embeddings_resampled(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(build_model(tiny_vit()).state_dict(), str(path))
    model = build_model(tiny_vit(img_size=64, checkpoint=str(path)))
    assert tuple(model.pos_embed.shape) == (1, 1 + 16, 192)


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(build_model(ModelSpec("resnet18")).state_dict(), str(path))
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model(tiny_vit(checkpoint=str(path)))


def test_missing_checkpoint() -> None:
    with pytest.raises(CheckpointError, match="not found"):
        build_model(tiny_vit(checkpoint="/nonexistent/w.pth"))


class _Payload:
    """Unpickling this would create a file: the attack a weights file must not carry."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.target),))


def test_pickled_code_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"weight": _Payload(str(marker))}, f)
    torch.save(
        {"state_dict": {"x": torch.zeros(1)}, "extra": _Payload(str(marker))},
        tmp_path / "evil2.pth",
    )
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refused"):
            build_model(tiny_vit(checkpoint=str(p)))
    assert not marker.exists()


def test_pretrained_and_checkpoint_are_exclusive() -> None:
    with pytest.raises(ModelError):
        ModelSpec("resnet18", pretrained=True, checkpoint="x.pth")


@pytest.mark.parametrize(
    "key",
    [
        "checkpoint_path",
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
    ],
)
def test_model_args_cannot_load_weights(key: str) -> None:
    # Weights loaded behind provenance's back would be recorded as random-init.
    with pytest.raises(ModelError, match=r"--checkpoint PATH .* --pretrained"):
        ModelSpec("resnet18", model_args={key: "w.pth"})
    assert ModelSpec("resnet18", model_args={"drop_rate": 0.1}).weights_source == "random-init"
