"""Shared machinery of the analysis jobs (runs, layers, options), and the synthetic stores
other analysis tests use (the fixture ``synth`` of tests/jobs/conftest.py is made with them).

:func:`make_run` writes a small run with the project's own writer (no model, no
Ray): ViT-like token layers with CLS + a patch grid, attention probabilities
and normalized inputs, or ResNet-like spatial layers; units can be left
unwritten and images marked failed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from jobs.analyze.layers import select_layers
from jobs.analyze.options import AnalysisWarning, cap_batch_size
from jobs.analyze.runs import align_images, usable_mask
from vitcnn_store import open_store
from vitcnn_store.errors import IncompleteRunError, LayerPatternError, UsageError
from vitcnn_store.store import ArraySpec, RunWriter, create_run

GRID, PATCH, CHANNELS, HEADS = 2, 4, 6, 2
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def _token_coords() -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    centres = (np.arange(GRID) + 0.5) * PATCH
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    return {
        "token_kind": (("token",), np.array(["cls"] + ["patch"] * GRID * GRID, dtype=object)),
        "token_y": (("token",), np.r_[np.nan, ys.ravel()].astype(np.float32)),
        "token_x": (("token",), np.r_[np.nan, xs.ravel()].astype(np.float32)),
    }


def _spatial(name: str, size: int, channels: int, module: str) -> ArraySpec:
    centres = ((np.arange(size) + 0.5) * GRID * PATCH / size).astype(np.float32)
    coords = {"y": (("y",), centres), "x": (("x",), centres)}
    attrs = {"kind": "spatial", "module_type": module}
    return ArraySpec(
        name, "activation", ("y", "x", "channel"), (size, size, channels), coords, attrs
    )


def _vit_specs(depth: int, attention: bool, attention_only: bool) -> list[ArraySpec]:
    t = 1 + GRID * GRID
    names = ["norm_pre"]
    for i in range(depth):
        names += [f"blocks.{i}.attn", f"blocks.{i}.mlp", f"blocks.{i}"]
    specs = []
    for name in names:
        if attention_only and name.endswith(".attn"):
            continue
        module = "Block" if name.count(".") == 1 else name.rsplit(".", 1)[-1].title()
        specs.append(
            ArraySpec(
                name,
                "activation",
                ("token", "channel"),
                (t, CHANNELS),
                _token_coords(),
                {"kind": "token", "module_type": module},
            )
        )
    if attention:
        for i in range(depth):
            specs.append(
                ArraySpec(
                    f"blocks.{i}.attn",
                    "attention",
                    ("head", "query", "key"),
                    (HEADS, t, t),
                    {},
                    {"kind": "token", "module_type": "Attention"},
                )
            )
    return specs


def _resnet_specs() -> list[ArraySpec]:
    return [
        _spatial("maxpool", 4, 4, "MaxPool2d"),
        _spatial("layer1.0.bn2", 4, 4, "BatchNorm2d"),
        _spatial("layer1.0", 4, 4, "BasicBlock"),
        _spatial("layer2.0.bn2", 2, 8, "BatchNorm2d"),
        _spatial("layer2.0.downsample", 2, 8, "Sequential"),
        _spatial("layer2.0", 2, 8, "BasicBlock"),
    ]


def _with_depth(specs: list[ArraySpec]) -> list[ArraySpec]:
    groups: dict[str, int] = {}
    for s in specs:
        if s.group:  # the run-level input is no layer
            groups.setdefault(s.group, len(groups))
    denom = max(len(groups) - 1, 1)
    out = []
    for s in specs:
        if s.group:
            d = groups[s.group]
            s = ArraySpec(
                s.group,
                s.name,
                s.dims,
                s.shape,
                s.coords,
                {**s.attrs, "depth_index": d, "depth_fraction": d / denom},
            )
        out.append(s)
    return out


def make_run(
    url: str | Path,
    run: str,
    ids: Sequence[str],
    *,
    labels: Sequence[int] | None = None,
    family: str = "vit",
    depth: int = 2,
    chunk: int = 8,
    attention: bool = True,
    attention_only: bool = False,
    inputs: bool = True,
    units: Sequence[int] | None = None,
    failed: Sequence[int] = (),
    seed: int = 0,
) -> None:
    """Write a synthetic run (random float16 data) with the project's writer."""
    specs = _vit_specs(depth, attention, attention_only) if family == "vit" else _resnet_specs()
    if inputs:
        side = GRID * PATCH
        centres = (np.arange(side) + 0.5).astype(np.float32)
        specs.append(
            ArraySpec(
                "",
                "input",
                ("input_y", "input_x", "rgb"),
                (side, side, 3),
                {"input_y": (("input_y",), centres), "input_x": (("input_x",), centres)},
            )
        )
    specs = _with_depth(specs)
    labels = list(labels) if labels is not None else [i % 3 for i in range(len(ids))]
    attrs = {
        "model": f"synthetic-{family}",
        "model_family": family,
        "weights_sha256": f"sha-{seed}",
        "image_set_sha256": f"set-{len(ids)}",
        "mean": MEAN,
        "std": STD,
        "chunk_size": chunk,
        "input_size": [3, GRID * PATCH, GRID * PATCH],
        "label_names": ["a", "b", "c"],
    }
    create_run(
        str(url),
        run,
        image_ids=list(ids),
        labels=labels,
        chunk=chunk,
        dtype="float16",
        arrays=specs,
        attrs=attrs,
    )
    writer = RunWriter(str(url), run)
    rng = np.random.default_rng(seed)
    bad = set(failed)
    for u in range(len(writer.units)) if units is None else units:
        start, stop = writer.units[u]
        n = stop - start
        values: dict[str, np.ndarray] = {}
        base = rng.normal(size=(n, *specs[0].shape))
        for s in specs:
            if s.name == "attention":
                logits = 2.0 * rng.normal(size=(n, *s.shape))
                p = np.exp(logits - logits.max(-1, keepdims=True))
                v = p / p.sum(-1, keepdims=True)
            elif s.name == "input":
                v = (rng.uniform(size=(n, *s.shape)) - MEAN) / STD
            elif s.shape == specs[0].shape:
                # Related layers, so CKA values are neither all ~0 nor all 1.
                base = base + 0.7 * rng.normal(size=base.shape)
                v = base
            else:
                v = rng.normal(size=(n, *s.shape))
            values[s.key] = v.astype(np.float16)
        flags = np.array([start + i in bad for i in range(n)])
        for v in values.values():
            v[flags] = np.nan
        writer.write_unit(u, values, flags, ["synthetic failure" if f else "" for f in flags])


def cli(args: Sequence[str]) -> int:
    """``vitcnn`` exit status, whether the error came from argparse or from a job."""
    from vitcnn_store.cli import main

    try:
        return main(list(args))
    except SystemExit as e:  # argparse rejects bad option values itself
        return int(e.code or 0)


def ids(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def copy_store(src: str | Path, dst: Path) -> str:
    """A private copy of a (session, read-only) store that a test may write results into."""
    shutil.copytree(src, dst)
    return str(dst)


# -- tests of the common machinery ----------------------------------------------------


def test_usable_mask_refuses_incomplete_runs(synth: str) -> None:
    store = open_store(synth)
    with pytest.raises(IncompleteRunError, match="allow-incomplete"):
        usable_mask(store["partial"], allow_incomplete=False)
    mask = usable_mask(store["partial"], allow_incomplete=True)
    assert mask.sum() == 16 and mask[:8].all() and mask[16:24].all()
    full = usable_mask(store["vit"], allow_incomplete=False)
    assert full.sum() == 47 and not full[5]


def test_align_images_pairs_by_id(tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    make_run(url, "a", ids(16), depth=1, attention=False, inputs=False)
    shuffled = [f"img{i:03d}" for i in (9, 3, 15, 20, 4, 30, 0, 31)]
    make_run(url, "b", shuffled, depth=1, attention=False, inputs=False, chunk=4)
    store = open_store(url)
    a, b = store["a"], store["b"]
    ia, ib = align_images(a, np.ones(16, bool), b, np.ones(8, bool))
    assert ia.tolist() == [0, 3, 4, 9, 15]
    assert (a.image_ids[ia] == b.image_ids[ib]).all()
    mask_b = np.ones(8, bool)
    mask_b[1] = False  # img003 unusable in b: dropped from the pairs
    ia, _ = align_images(a, np.ones(16, bool), b, mask_b)
    assert ia.tolist() == [0, 4, 9, 15]
    make_run(url, "c", ids(4, "zz"), depth=1, attention=False, inputs=False)
    with pytest.raises(UsageError, match="share no usable image"):
        align_images(a, np.ones(16, bool), store["c"], np.ones(4, bool))


def test_select_layers_and_batch_size(synth: str) -> None:
    run = open_store(synth)["vit"]
    assert select_layers(run, "blocks.*") == ["blocks.0", "blocks.1"]
    assert select_layers(run, None) == run.layers
    with pytest.raises(LayerPatternError, match="matches no stored layer"):
        select_layers(run, "stages.*")
    # The words say what the user gave: a default they never typed is named as the default.
    with pytest.warns(AnalysisWarning, match=r"^the default batch size 1024 is more than the 40 "):
        assert cap_batch_size(1024, 40) == 40
    with pytest.warns(AnalysisWarning, match=r"^--batch-size 64 is more than the 40 usable"):
        assert cap_batch_size(64, 40) == 40
    assert cap_batch_size(16, 40) == 16
    with pytest.raises(UsageError, match=">= 4"):
        cap_batch_size(3, 40)


def test_analyses_never_import_torch(synth: str) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from jobs.analyze import CKAConfig, SkipConfig, run_cka, run_skip; "
        f"run_cka(CKAConfig(store={synth!r}, run='vit', batch_size=16, progress=False, "
        "name='notorch')); "
        f"run_skip(SkipConfig(store={synth!r}, run='vit', progress=False, name='notorch')); "
        "print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
