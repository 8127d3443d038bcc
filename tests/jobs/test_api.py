"""``vitcnn_store.extract`` from Python: any torch.nn.Module, in this process by default."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

import vitcnn_store
from tests.helpers import assert_runs_identical, module_outputs
from tests.jobs.test_refusal import snapshot
from vitcnn_store.data import open_image_set
from vitcnn_store.errors import LayerPatternError, RunMismatchError, UsageError

DATA = {"input_size": (3, 24, 24), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
COMMON = {"limit": 20, "chunk_size": 8, "progress": False, "dtype": "float32"}


class TinyNet(torch.nn.Module):
    """A researcher's own model: a conv stem, a block with an in-place ReLU, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = torch.nn.Sequential(
            torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(inplace=True),
        )
        self.tokens = torch.nn.Identity()  # (n, 36, 8): the map as a token sequence
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)  # once: a module run twice per forward is refused
        x = self.block(s) + s
        t = self.tokens(x.flatten(2).transpose(1, 2))
        return self.head(t.mean(1))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    net.block[1].running_mean.uniform_(-0.5, 0.5)  # non-trivial BN statistics
    return net.eval()


def small_transform(image: Image.Image) -> torch.Tensor:
    """A plain function as the transform: its fingerprint must be the same in every process."""
    a = np.asarray(image.resize((16, 16)), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)


def own_inputs(n: int) -> torch.Tensor:
    """The images preprocessed by the test itself, with timm's eval transform of ``DATA``."""
    from timm.data import create_transform, resolve_data_config

    tf = create_transform(**resolve_data_config(args=dict(DATA)), is_training=False)
    images = open_image_set("builtin:faces", limit=n)
    return torch.stack([tf(images.load(i)) for i in range(n)])


def own_forward(net: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    return {n: v.numpy() for n, v in module_outputs(net, x, names).items()}


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("api") / "acts.zarr")
    net = tiny_net().train()
    run = vitcnn_store.extract(
        net,
        "builtin:faces",
        url,
        "mine",
        layers="stem,block,tokens,head",
        data_config=DATA,
        inputs=True,
        **COMMON,
    )
    assert run.complete
    # The module comes back as it was handed in: training mode, memory format, no hooks.
    assert net.training and net.stem.weight.is_contiguous()
    assert not net.stem._forward_hooks and not net.head._forward_hooks
    return url


def test_values_equal_the_modules_own_forward(module_store: str) -> None:
    run = vitcnn_store.open_store(module_store)["mine"]
    x = own_inputs(run.n_images)
    np.testing.assert_allclose(run.inputs.values, x.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    ref = own_forward(tiny_net(), x, ["stem", "block", "tokens", "head"])
    # Spatial maps are stored channels last: (image, y, x, channel).
    np.testing.assert_allclose(run["stem"].values, ref["stem"].transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(run["block"].values, ref["block"].transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(run["tokens"].values, ref["tokens"], atol=1e-5)
    np.testing.assert_allclose(run["head"].values, ref["head"], atol=1e-5)
    assert run["tokens"].dims == ("image", "token", "channel")
    assert set(run["tokens"].token_kind.values) == {"other"}  # no patch geometry known


def test_provenance_records_the_class_and_the_weights(module_store: str) -> None:
    attrs = vitcnn_store.open_store(module_store)["mine"].attrs
    assert attrs["model"] == attrs["model_class"] == "tests.jobs.test_api.TinyNet"
    assert attrs["weights_source"] == "module"
    h = hashlib.sha256()  # the documented weights hash, computed here independently
    for name, t in sorted(tiny_net().state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().numpy().tobytes())
    assert attrs["weights_sha256"] == h.hexdigest()
    assert attrs["input_size"] == [3, 24, 24] and attrs["mean"] == [0.5, 0.4, 0.3]


def test_resume_and_changed_weights(module_store: str) -> None:
    again = vitcnn_store.extract(
        tiny_net(),
        "builtin:faces",
        module_store,
        "mine",
        layers="stem,block,tokens,head",
        data_config=DATA,
        inputs=True,
        resume=True,
        **COMMON,
    )
    assert again.complete
    before = snapshot(Path(module_store))
    with pytest.raises(RunMismatchError, match="weights_sha256"):
        vitcnn_store.extract(
            tiny_net(seed=1),
            "builtin:faces",
            module_store,
            "mine",
            layers="stem,block,tokens,head",
            data_config=DATA,
            inputs=True,
            resume=True,
            **COMMON,
        )
    assert snapshot(Path(module_store)) == before


def test_a_custom_transform(tmp_path: Path) -> None:
    def transform(image: Image.Image) -> torch.Tensor:
        a = np.asarray(image.resize((16, 16)), dtype=np.float32) / 255.0
        return torch.from_numpy(a).permute(2, 0, 1)

    url = str(tmp_path / "acts.zarr")
    run = vitcnn_store.extract(
        tiny_net(),
        "builtin:faces",
        url,
        "t",
        layers=["stem", "head"],
        transform=transform,
        **COMMON,
    )
    images = open_image_set("builtin:faces", limit=20)
    x = torch.stack([transform(images.load(i)) for i in range(20)])
    ref = own_forward(tiny_net(), x, ["head"])
    np.testing.assert_allclose(run["head"].values, ref["head"], atol=1e-5)
    assert run["stem"].shape == (20, 8, 8, 8)
    assert "transform" in run.attrs and run.attrs["input_size"] == [3, 16, 16]


def test_refusals_before_anything_is_written(tmp_path: Path) -> None:
    url = tmp_path / "acts.zarr"
    with pytest.raises(UsageError, match=r"transform= .* or data_config="):
        vitcnn_store.extract(tiny_net(), "builtin:faces", str(url), "r", layers="stem", **COMMON)
    with pytest.raises(LayerPatternError, match="no attention module that exposes"):
        vitcnn_store.extract(
            tiny_net(),
            "builtin:faces",
            str(url),
            "r",
            layers="stem",
            attention=True,
            data_config=DATA,
            **COMMON,
        )
    with pytest.raises(LayerPatternError, match="preset:blocks is defined for the ViT"):
        vitcnn_store.extract(
            tiny_net(),
            "builtin:faces",
            str(url),
            "r",
            layers="preset:blocks",
            data_config=DATA,
            **COMMON,
        )
    with pytest.raises(UsageError, match="a module is used as it is"):
        vitcnn_store.extract(
            tiny_net(),
            "builtin:faces",
            str(url),
            "r",
            layers="stem",
            img_size=32,
            data_config=DATA,
            **COMMON,
        )
    assert not url.exists()


def test_timm_attention_modules_are_captured_from_a_module(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    run = vitcnn_store.extract(
        vit,
        "builtin:faces",
        str(tmp_path / "a.zarr"),
        "v",
        layers="blocks.*",
        attention=True,
        **COMMON,
    )
    attn = run.attention("blocks.0.attn").values
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    assert run.attrs["model_family"] == "vit" and run["blocks.0"].attrs["role"] == "stream"


def test_a_timm_name_gives_the_same_run_as_the_cli(tmp_path: Path) -> None:
    from vitcnn_store.cli import main

    url = str(tmp_path / "a.zarr")
    run = vitcnn_store.extract(
        "resnet18",
        "builtin:faces",
        url,
        "api",
        layers="layer1.*",
        img_size=32,
        limit=12,
        chunk_size=8,
        progress=False,
    )
    assert (
        main(
            [
                "extract",
                "resnet18",
                "--img-size",
                "32",
                "--images",
                "builtin:faces",
                "--limit",
                "12",
                "--chunk-size",
                "8",
                "--store",
                url,
                "--run",
                "cli",
                "--layers",
                "layer1.*",
                "--no-progress",
            ]
        )
        == 0
    )
    assert run.attrs["model"] == "resnet18"
    assert_runs_identical(url, "api", url, "cli")
    tree = xr.open_datatree(url, engine="zarr")
    assert tree["api"]["layer1.0"]["activation"].dims == ("image", "y", "x", "channel")


def test_the_plan_is_printed_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = {**COMMON, "progress": True}
    vitcnn_store.extract(
        tiny_net(),
        "builtin:faces",
        str(tmp_path / "a.zarr"),
        "r",
        layers="head",
        data_config=DATA,
        **options,
    )
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("vitcnn extract:")]
    assert len(lines) == 1 and "in this process: " in lines[0] and "torch thread" in lines[0]


@pytest.mark.usefixtures("ray_cluster")
def test_a_module_travels_to_ray_actors(module_store: str, tmp_path: Path) -> None:
    """The driver's module reaches the actors through the object store: same values."""
    url = str(tmp_path / "ray.zarr")
    vitcnn_store.extract(
        tiny_net(),
        "builtin:faces",
        url,
        "mine",
        workers=2,
        layers="stem,block,tokens,head",
        data_config=DATA,
        inputs=True,
        **COMMON,
    )
    assert_runs_identical(url, "mine", module_store, "mine")


def test_resume_refuses_the_same_weights_in_another_module(module_store: str) -> None:
    """ReLU -> Tanh keeps every weight: the module's configuration tells them apart."""
    from vitcnn_store.models import weights_sha256

    tanh = tiny_net()
    tanh.block[2] = torch.nn.Tanh()
    assert weights_sha256(tanh) == weights_sha256(tiny_net())
    before = snapshot(Path(module_store))
    with pytest.raises(RunMismatchError, match="module_sha256") as e:
        vitcnn_store.extract(
            tanh,
            "builtin:faces",
            module_store,
            "mine",
            layers="stem,block,tokens,head",
            data_config=DATA,
            inputs=True,
            resume=True,
            **COMMON,
        )
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    assert snapshot(Path(module_store)) == before


def test_resume_in_a_new_process_with_a_function_transform(tmp_path: Path) -> None:
    """A plain-function transform resumes in another process; a changed module is refused
    there in one line, leaving the run as it was."""
    from jobs.config import ExtractConfig
    from jobs.extract import plan_extraction, prepare_store
    from jobs.worker import UnitExtractor

    url = str(tmp_path / "acts.zarr")
    cfg = ExtractConfig(
        model=tiny_net(),
        images="builtin:faces",
        store=url,
        run="t",
        layers="stem,head",
        transform=small_transform,
        **COMMON,
    )
    template = plan_extraction(cfg)
    prepare_store(cfg, template)
    UnitExtractor(template.plan, template.model).run_unit(0)  # a job that stopped early
    assert list(vitcnn_store.open_store(url)["t"].done) == [True, False, False]

    before = snapshot(Path(url))
    # One new process tries both: the changed module first, then the same one.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    job = subprocess.Popen(
        [sys.executable, "-m", "tests.jobs.resume_job", url, "t", "tanh", "same"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(600, job.kill)  # never hang
    watchdog.start()
    try:
        refused = job.stdout.readline().strip()  # type: ignore[union-attr]
        between = snapshot(Path(url))
        out, err = job.communicate("\n", timeout=600)
    finally:
        watchdog.cancel()
    assert refused == "2", (refused, err[-3000:])
    assert between == before  # refused: not a byte changed
    assert job.returncode == 0 and out.strip() == "0", err[-3000:]
    err = err.strip()  # the refusal's line and nothing else (the resume printed nothing)
    assert len(err.splitlines()) == 1 and "module_sha256" in err and "Traceback" not in err
    assert vitcnn_store.open_store(url)["t"].complete
    vitcnn_store.extract(
        tiny_net(),
        "builtin:faces",
        url,
        "clean",
        layers="stem,head",
        transform=small_transform,
        **COMMON,
    )
    assert_runs_identical(url, "t", url, "clean")


class Hostile(torch.nn.Module):
    """Modules a run cannot store as they are: one called twice (shared weights), names
    that are not zarr node names, an integer output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 4, stride=4)
        self.shared = torch.nn.Linear(4, 4)
        self.zarr = torch.nn.Sequential()
        self.zarr.add_module("json", torch.nn.Identity())  # path "zarr.json"
        self.d = torch.nn.ModuleDict({"a/b": torch.nn.Identity()})  # path "d.a/b"
        self.pick = ArgMax()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)  # (n, 36, 4)
        t = self.shared(self.shared(t))
        t = self.d["a/b"](self.zarr.json(t))
        return self.pick(t)


class ArgMax(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


@pytest.mark.parametrize(
    ("layer", "words"),
    [
        ("shared", "'shared' runs 2 times in one forward pass"),
        ("zarr.json", "cannot store layer 'zarr.json': zarr.json is the run's own metadata"),
        ("d.a/b", "cannot store layer 'd.a/b': a '/' would nest it"),
        ("pick", "'pick' outputs int64 values"),
    ],
)
def test_layers_a_run_cannot_store_are_refused_before_writing(
    module_store: str, layer: str, words: str
) -> None:
    before = snapshot(Path(module_store))
    with pytest.raises(LayerPatternError) as e:
        vitcnn_store.extract(
            Hostile(),
            "builtin:faces",
            module_store,
            "hostile",
            layers=layer,
            data_config=DATA,
            **COMMON,
        )
    assert words in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2
    assert snapshot(Path(module_store)) == before
