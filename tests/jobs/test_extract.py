"""The extraction job end to end on a real local Ray cluster with tiny timm models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import xarray as xr
import zarr
from PIL import Image
from timm.data import create_transform, resolve_data_config

from jobs.extract import ExtractConfig, extract, plan_extraction, prepare_store
from jobs.worker import UnitExtractor
from tests.conftest import TINY_VIT, extract_tiny
from tests.helpers import assert_runs_identical, module_outputs
from vitcnn_store import open_store
from vitcnn_store.data import open_image_set
from vitcnn_store.errors import ImageSetError, RunExistsError, RunMismatchError
from vitcnn_store.models import ModelSpec

OPTIONS = {"layers": "preset:paper", "attention": True, "inputs": True, "dtype": "float32"}


@pytest.fixture(scope="module")
def f32_store(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Runs ``w1`` (one Ray actor), ``w2`` (two Ray actors) and ``here`` (in this process,
    the default without a cluster address) of the same float32 extraction.

    ``w1``'s actor asks for one CPU, as each of ``w2``'s does: ``w2`` takes it from the
    park and starts one more (a new actor costs seconds: a process importing torch)."""
    url = str(tmp_path_factory.mktemp("f32") / "acts.zarr")
    extract_tiny(url, "w1", workers=1, cpus_per_worker=1, **OPTIONS)
    extract_tiny(url, "w2", workers=2, **OPTIONS)
    extract_tiny(url, "here", **OPTIONS)
    return url


def reference_model() -> torch.nn.Module:
    # Built here with timm directly, seeded as random init is documented to be.
    torch.manual_seed(0)
    return timm.create_model(
        TINY_VIT["name"], img_size=TINY_VIT["img_size"], **TINY_VIT["model_args"]
    ).eval()


def reference_inputs(model: torch.nn.Module, n: int) -> torch.Tensor:
    cfg = resolve_data_config(args={"input_size": (3, 32, 32)}, model=model)
    transform = create_transform(**cfg, is_training=False)
    images = open_image_set("builtin:faces", limit=n)
    return torch.stack([transform(images.load(i)) for i in range(n)])


def attention_from_weights(attn_module: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ · scale) from the module's own qkv weights, given its input tokens."""
    b, t, c = tokens.shape
    heads = attn_module.num_heads
    with torch.no_grad():
        qkv = torch.nn.functional.linear(tokens, attn_module.qkv.weight, attn_module.qkv.bias)
    q, k, _ = qkv.reshape(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    return torch.softmax(q @ k.transpose(-2, -1) * (c // heads) ** -0.5, dim=-1)


def test_every_layer_equals_direct_forward(f32_store: str) -> None:
    run = open_store(f32_store)["w1"]
    model = reference_model()
    x = reference_inputs(model, run.n_images)
    np.testing.assert_allclose(run.inputs.values, x.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    ref = module_outputs(model, x, run.layers)
    assert len(run.layers) == 1 + 6 * 2  # norm_pre + six taps for each of two blocks
    for layer in run.layers:
        np.testing.assert_allclose(run[layer].values, ref[layer].numpy(), atol=1e-5, err_msg=layer)


def test_float16_store_within_rounding(tiny_store: str) -> None:
    run = open_store(tiny_store)["vit"]
    model = reference_model()
    ref = module_outputs(model, reference_inputs(model, run.n_images), run.layers)
    for layer in run.layers:
        stored = run[layer].values
        assert stored.dtype == np.float16
        expected = ref[layer].numpy()
        # float16 keeps 11 significant bits: relative rounding error <= 2**-11.
        np.testing.assert_allclose(stored, expected, rtol=2**-10, atol=1e-6, err_msg=layer)


def test_attention_is_softmax_of_qk(f32_store: str) -> None:
    run = open_store(f32_store)["w1"]
    model = reference_model()
    x = reference_inputs(model, run.n_images)
    names = [f"blocks.{i}.norm1" for i in range(2)]
    norm1 = module_outputs(model, x, names)
    assert run.attention_layers == ["blocks.0.attn", "blocks.1.attn"]
    for i, layer in enumerate(run.attention_layers):
        stored = run.attention(layer).values
        np.testing.assert_allclose(stored.sum(-1), 1.0, atol=1e-5)
        expected = attention_from_weights(model.blocks[i].attn, norm1[f"blocks.{i}.norm1"])
        np.testing.assert_allclose(stored, expected.numpy(), atol=1e-5)


def test_coordinates(f32_store: str) -> None:
    x = open_store(f32_store)["w1"]["blocks.0"]
    assert list(x.token_kind.values) == ["cls", "patch", "patch", "patch", "patch"]
    assert np.isnan(x.token_x.values[0])
    assert float(x.token_x.values[1]) == 8.0 and float(x.token_y.values[1]) == 8.0
    assert float(x.token_x.values[2]) == 24.0 and float(x.token_y.values[3]) == 24.0
    assert x.attrs["kind"] == "token"
    fractions = [
        open_store(f32_store)["w1"][n].attrs["depth_fraction"] for n in ["norm_pre", "blocks.1"]
    ]
    assert fractions == [0.0, 1.0]


def test_resnet_spatial_coordinates(tiny_store: str) -> None:
    x = open_store(tiny_store)["resnet"]["layer1.0"]
    assert x.dims == ("image", "y", "x", "channel")
    # 32-px input, stride 4 at layer1: centres 2, 6, ..., 30.
    np.testing.assert_array_equal(x.x.values, np.arange(8) * 4 + 2.0)
    # The branch tap is stored before the block adds its shortcut in place.
    branch = open_store(tiny_store)["resnet"]["layer1.0.bn2"].values
    assert not np.array_equal(branch, x.values)


def test_opens_without_vitcnn_store(f32_store: str) -> None:
    tree = xr.open_datatree(f32_store, engine="zarr")
    node = tree["w1"]["blocks.1"]
    assert node["activation"].dims == ("image", "token", "channel")
    assert tree["w1"]["blocks.1.attn"]["attention"].dims == ("image", "head", "query", "key")
    assert list(tree["w1"]["image_id"].values[:2]) == ["faces/0000", "faces/0100"]
    assert tree.attrs["vitcnn_store.format"] == 2
    group = zarr.open_group(f32_store, mode="r")
    assert group["w1/blocks.1/activation"].shape == (40, 5, 192)
    assert bool(np.all(group["w1/done"][:]))


def test_two_workers_identical_to_one(f32_store: str) -> None:
    assert_runs_identical(f32_store, "w1", f32_store, "w2")


def test_in_process_identical_to_ray(f32_store: str) -> None:
    assert_runs_identical(f32_store, "here", f32_store, "w1")


def _config(url: str, run: str, **changes: object) -> ExtractConfig:
    model = ModelSpec(TINY_VIT["name"], img_size=32, model_args=TINY_VIT["model_args"])
    options: dict[str, object] = {
        "images": "builtin:faces",
        "limit": 40,
        "chunk_size": 16,
        "progress": False,
        **OPTIONS,
    }
    options.update(changes)
    return ExtractConfig(model=model, store=url, run=run, **options)  # type: ignore[arg-type]


def test_interrupted_run_resumes_identically(f32_store: str, tmp_path: Path) -> None:
    url = str(tmp_path / "resume.zarr")
    cfg = _config(url, "w1")
    template = plan_extraction(cfg)
    prepare_store(cfg, template)
    # The "crash": only unit 1 of 3 was written.
    UnitExtractor(template.plan, template.model).run_unit(1)
    assert list(open_store(url)["w1"].done) == [False, True, False]
    with pytest.raises(RunExistsError):
        extract(cfg)
    summary = extract(_config(url, "w1", resume=True))
    assert summary.units_written == 2
    assert_runs_identical(url, "w1", f32_store, "w1")
    again = extract(_config(url, "w1", resume=True))
    assert again.units_written == 0


def test_mismatching_resume_is_refused(f32_store: str) -> None:
    before = open_store(f32_store)["w1"].attrs["created_at"]
    with pytest.raises(RunMismatchError, match="dtype"):
        extract(_config(f32_store, "w1", resume=True, dtype="float16"))
    with pytest.raises(RunMismatchError, match="image_set_sha256"):
        extract(_config(f32_store, "w1", resume=True, limit=20))
    assert open_store(f32_store)["w1"].attrs["created_at"] == before


def _write_folder(root: Path) -> None:
    for i in range(5):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "3.png").write_bytes(b"this is not a png")


def test_corrupt_image_recorded_and_job_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    _write_folder(folder)
    url = str(tmp_path / "acts.zarr")
    summary = extract(_config(url, "r", images=str(folder), limit=None, chunk_size=2))
    assert list(summary.failed) == ["3.png"]
    run = open_store(url)["r"]
    assert "cannot identify" in run.failed["3.png"] or "not an image" in run.failed["3.png"]
    x = run["blocks.0"].values
    assert np.isnan(x[3]).all() and not np.isnan(np.delete(x, 3, axis=0)).any()
    assert list(run.valid) == [True, True, True, False, True]


def test_strict_stops_before_writing(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    _write_folder(folder)
    url = tmp_path / "acts.zarr"
    with pytest.raises(ImageSetError, match=r"3\.png"):
        extract(_config(str(url), "r", images=str(folder), limit=None, strict=True))
    assert not url.exists()


def test_resume_refuses_changed_images(tmp_path: Path) -> None:
    import hashlib

    from tests.jobs.test_refusal import snapshot
    from vitcnn_store.errors import RunMismatchError

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # BMP: same size whatever the pixels
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.bmp")
    url = str(tmp_path / "acts.zarr")
    cfg = _config(
        url,
        "r",
        images=str(folder),
        limit=None,
        chunk_size=2,
        attention=False,
        inputs=False,
        layers="blocks.0",
    )
    template = plan_extraction(cfg)
    prepare_store(cfg, template)
    UnitExtractor(template.plan, template.model).run_unit(0)  # a job that stopped after one unit
    run = open_store(url)["r"]
    assert list(run.image_sha256) == [
        hashlib.sha256((folder / f"{i}.bmp").read_bytes()).hexdigest() for i in range(6)
    ]
    assert run["blocks.0"].image_sha256.values[0] == run.image_sha256[0]
    size = (folder / "4.bmp").stat().st_size
    for i in (1, 4):  # other pixels, same size, same names
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.bmp")
    assert (folder / "4.bmp").stat().st_size == size
    before = snapshot(Path(url))
    with pytest.raises(RunMismatchError, match=r"2 image\(s\) changed .*\(1\.bmp, 4\.bmp\)"):
        extract(
            _config(
                url,
                "r",
                images=str(folder),
                limit=None,
                chunk_size=2,
                attention=False,
                inputs=False,
                layers="blocks.0",
                resume=True,
            )
        )
    assert snapshot(Path(url)) == before
