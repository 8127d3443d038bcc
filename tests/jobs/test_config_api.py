"""One source of extraction options: :class:`ExtractConfig` declares each option and its
default once; ``vitcnn_store.extract`` and ``vitcnn extract`` take them from there, and a
job validates its config once, sizes itself, and makes its plan once, whole."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest
import torch

import vitcnn_store
from jobs.api import KEYWORDS, MODEL_KEYWORDS, POSITIONAL, extract_config
from jobs.config import PYTHON_ONLY, ExtractConfig
from vitcnn_store.interface.cli import _extract_config, build_parser
from vitcnn_store.models import ModelSpec
from vitcnn_store.options import options_of


def _transform(image: Any) -> Any:
    return image


DATA = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}

# One non-default value per keyword of the API: (what a caller passes, the config's value).
API_SAMPLES: dict[str, tuple[Any, Any]] = {
    "layers": (["layer1.*", "layer2"], "layer1.*,layer2"),
    "reduce": ({"layer1.*": "pool:2"}, ("layer1.*=pool:2",)),
    "attention": (True, True),
    "attention_layers": ("blocks.0.attn", "blocks.0.attn"),
    "attention_heads": (True, True),
    "inputs": (True, True),
    "dtype": ("float32", "float32"),
    "compression": ("zstd", "zstd"),
    "chunk_size": (8, 8),
    "batch_size": (4, 4),
    "limit": (10, 10),
    "strict": (True, True),
    "resume": (True, True),
    "overwrite": (True, True),
    "workers": (3, 3),
    "cpus_per_worker": (1.5, 1.5),
    "gpus_per_worker": (0.5, 0.5),
    "device": ("cpu", "cpu"),
    "autocast": (True, True),
    "address": ("127.0.0.1:6379", "127.0.0.1:6379"),
    "progress": (False, False),
    "lease_ttl": (30.0, 30.0),
    "extra_attrs": ({"note": "x"}, {"note": "x"}),
    "transform": (_transform, _transform),
    "data_config": (DATA, DATA),
    "model.pretrained": (True, True),
    "model.checkpoint": ("w.pth", "w.pth"),
    "model.img_size": (64, 64),
    "model.model_args": ({"depth": 2}, {"depth": 2}),
    "model.seed": (7, 7),
}
BASE = ("resnet18", "builtin:faces", "s.zarr", "r")


def _value(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _config(**options: Any) -> ExtractConfig:
    return extract_config(*BASE, **{"layers": "preset:blocks", **options})


def test_every_field_of_the_config_and_the_model_is_a_keyword_of_the_api() -> None:
    fields = [f.name for f in dataclasses.fields(ExtractConfig) if f.name not in POSITIONAL]
    model = [f"model.{f.name}" for f in dataclasses.fields(ModelSpec) if f.name != "name"]
    assert sorted(API_SAMPLES) == sorted(fields + model)
    assert (*fields, *(m.removeprefix("model.") for m in model)) == KEYWORDS
    # What help() and notebooks show: the same keywords, with the config's defaults.
    shown = inspect.signature(vitcnn_store.extract).parameters
    assert list(shown) == [*POSITIONAL, *KEYWORDS]
    for f in [*dataclasses.fields(ExtractConfig), *dataclasses.fields(ModelSpec)]:
        if f.name in shown and f.name not in (*POSITIONAL, "layers"):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            assert shown[f.name].default == default, f.name


def test_the_api_declares_no_option_of_its_own() -> None:
    """The function takes its four positionals, the required layers, and the rest as
    ``**options``: an option re-declared here (with a default of its own) fails this."""
    code = vitcnn_store.extract.__code__
    named = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    assert named == (*POSITIONAL, "layers")
    assert code.co_flags & inspect.CO_VARKEYWORDS
    with pytest.raises(TypeError, match="unexpected keyword argument 'lease'"):
        _config(lease=5)


@pytest.mark.parametrize("path", sorted(API_SAMPLES))
def test_every_keyword_reaches_its_field_and_moves_nothing_else(path: str) -> None:
    given, expected = API_SAMPLES[path]
    cfg = _config(**{path.removeprefix("model."): given})
    assert _value(cfg, path) == expected
    default = _config()
    for other in API_SAMPLES:
        if other != path:
            assert _value(cfg, other) == _value(default, other), other


def test_attention_patterns_are_the_attention_layers() -> None:
    assert _config(attention="blocks.*") == _config(attention=True, attention_layers="blocks.*")
    with pytest.raises(vitcnn_store.UsageError, match="not both"):
        _config(attention="blocks.*", attention_layers="blocks.0.*")


def test_a_module_refuses_the_keywords_that_build_a_timm_model() -> None:
    net = torch.nn.Linear(2, 2)
    for key in MODEL_KEYWORDS:
        given, _ = API_SAMPLES[f"model.{key}"]
        if key == "seed":  # seeds only a random init: ignored for a module, as it always was
            assert extract_config(net, *BASE[1:], layers="*", seed=given).model is net
            continue
        with pytest.raises(vitcnn_store.UsageError, match="a module is used as it is"):
            extract_config(net, *BASE[1:], layers="*", **{key: given})


def test_the_cli_takes_every_field_but_the_python_only_ones_with_the_same_defaults() -> None:
    flagged = {f.name for f, _ in options_of(ExtractConfig)}
    every = {f.name for f in dataclasses.fields(ExtractConfig)}
    assert every - flagged == set(PYTHON_ONLY)
    # No option given: the CLI's config and the API's are the config's own defaults.
    cli = _extract_config(build_parser().parse_args(["extract", *BASE[:1], *_where()]))
    assert cli == _config() == ExtractConfig(ModelSpec("resnet18"), *BASE[1:])
    submit = ["submit", "extract", *BASE[:1], *_where()]
    assert _extract_config(build_parser().parse_args(submit)) == cli


def _where() -> list[str]:
    return ["--images", BASE[1], "--store", BASE[2], "--run", BASE[3]]


@contextmanager
def _calls(*functions: Any) -> Iterator[Counter[CodeType]]:
    """Count the calls of ``functions`` on every thread (the interpreter's profiler)."""
    codes = {f.__code__ for f in functions}
    counts: Counter[CodeType] = Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes:
            counts[frame.f_code] += 1

    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        yield counts
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]


def test_a_job_validates_once_sizes_itself_once_and_makes_its_plan_once(tmp_path: Path) -> None:
    from jobs.plan import RunTemplate
    from jobs.sizing import shape_job, size_job
    from jobs.worker import ExtractionPlan

    counted = {
        "validate": ExtractConfig.validate,
        "shape_job": shape_job,
        "size_job": size_job,
        "ExtractionPlan": ExtractionPlan.__init__,
        "RunTemplate": RunTemplate.__init__,
    }
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.ReLU())
    with _calls(*counted.values()) as counts:
        run = vitcnn_store.extract(
            net,
            "builtin:faces",
            str(tmp_path / "a.zarr"),
            "r",
            layers="0",
            data_config=DATA,
            limit=12,
            chunk_size=8,
            workers=0,
            progress=False,
        )
    assert run.complete and run.n_images == 12
    assert {name: counts[f.__code__] for name, f in counted.items()} == dict.fromkeys(counted, 1)
