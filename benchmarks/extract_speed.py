"""Extraction as fast as the model: whole vitcnn jobs against a bare timm forward, side by side.

Both sides run in this one process over the same JPEG photographs, with the
same model (random init), ``preset:blocks``, float16 and the default codec
(checksums on); both include decoding and building the model:

- **bare**: ``timm.create_model`` and a plain loop — decode, timm's eval
  transform, forward in batches of 32 — with every torch thread (what anyone
  types);
- **vitcnn job**: ``jobs.extract.extract`` with the defaults a newcomer gets
  (``vitcnn extract MODEL --images DIR --store S --run R --layers preset:blocks``);
- **vitcnn API**: ``timm.create_model`` then ``vitcnn_store.extract(module, ...)``.

Targets (issue 10), as ratios of throughput (bare time / vitcnn time) except the
small job (vitcnn time / bare time):

- whole job with the defaults over 256 images >= 0.85;
- a 16-image job <= 2 x the bare forward's time;
- steady state (the units, without start-up; the bare loop without the model
  build) >= 0.95;
- the in-process API on 128 images >= 0.95.

The machine may be shared: each round runs every pair back to back, alternating
which side goes first, and the script prints each ratio's range over rounds
(and the CPU-time ratio, which other load disturbs less). The start-up
breakdown comes from the jobs' own step timings; the Ray row runs the 16-image
job on one Ray actor (a local Ray started and stopped by the job) for comparison.

    python benchmarks/extract_speed.py                         # both models, 3 rounds
    python benchmarks/extract_speed.py --models resnet50 --rounds 5
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from _photos import photo_folder
from PIL import Image
from timm.data import create_transform, resolve_data_config

import vitcnn_store
from jobs.config import ExtractConfig
from jobs.extract import extract
from vitcnn_store.interface.describe import table
from vitcnn_store.models import ModelSpec

BATCH = 32
LAYERS = "preset:blocks"


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name).eval()


def bare(name: str, folder: str, n: int) -> dict[str, float]:
    """Build the model, then decode + transform + forward every image in batches."""
    start = clock()
    model = build(name)
    built = since(start)
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    files = sorted(glob.glob(os.path.join(folder, "*.jpg")))[:n]
    with torch.inference_mode():
        for s in range(0, n, BATCH):
            x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[s : s + BATCH]])
            model(x)
    wall, cpu = since(start)
    return {"wall": wall, "cpu": cpu, "steady": wall - built[0]}


def job(name: str, folder: str, n: int, url: str, **options: Any) -> dict[str, Any]:
    """A whole ``vitcnn extract`` job with the defaults."""
    start = clock()
    summary = extract(
        ExtractConfig(
            ModelSpec(name),
            folder,
            url,
            "r",
            layers=LAYERS,
            limit=n,
            overwrite=True,
            progress=False,
            **options,
        )
    )
    wall, cpu = since(start)
    return {
        "wall": wall,
        "cpu": cpu,
        "steady": summary.timings["units"],
        "timings": summary.timings,
        "plan": summary.plan,
    }


def api(name: str, folder: str, n: int, url: str) -> dict[str, Any]:
    """Build the module, then ``vitcnn_store.extract(module, ...)`` in this process."""
    start = clock()
    vitcnn_store.extract(
        build(name), folder, url, "api", layers=LAYERS, limit=n, overwrite=True, progress=False
    )
    wall, cpu = since(start)
    return {"wall": wall, "cpu": cpu}


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if f"{lo:.2f}" == f"{hi:.2f}" else f"{fmt.format(lo)}–{fmt.format(hi)}"


def ratios(r: dict[str, list[Any]], what: str) -> dict[str, list[float]]:
    """Per round: bare/vitcnn (throughput) or, for the small job, vitcnn/bare (time)."""

    def per(a: str, b: str) -> list[float]:
        return [x[what] / y[what] for x, y in zip(r[a], r[b], strict=True)]

    out = {
        "job": per("bare", "job"),
        "small": per("job_small", "bare_small"),
        "api": per("bare_api", "api"),
    }
    if what == "wall":
        pairs = zip(r["bare"], r["job"], strict=True)
        out["steady"] = [b["steady"] / v["steady"] for b, v in pairs]
    return out


def measure(name: str, folder: str, url: str, args: argparse.Namespace) -> dict[str, list[Any]]:
    """Every pair, ``args.rounds`` times, alternating which side of a pair goes first."""
    r: dict[str, list[Any]] = defaultdict(list)
    # Warm the process (oneDNN kernels, timm registry, zarr, the decoders) outside the timings.
    bare(name, folder, 2)
    job(name, folder, 2, url)
    runs: list[tuple[str, Callable[[], Any]]] = [
        ("bare", partial(bare, name, folder, args.images)),
        ("job", partial(job, name, folder, args.images, url)),
        ("bare_small", partial(bare, name, folder, args.small)),
        ("job_small", partial(job, name, folder, args.small, url)),
        ("bare_api", partial(bare, name, folder, args.api_images)),
        ("api", partial(api, name, folder, args.api_images, url)),
    ]
    for i in range(args.rounds):
        for k in range(0, len(runs), 2):
            pair = runs[k : k + 2] if i % 2 == 0 else runs[k : k + 2][::-1]
            for key, run in pair:
                r[key].append(run())
    return r


def report(name: str, r: dict[str, list[Any]], args: argparse.Namespace) -> None:
    wall, cpu = ratios(r, "wall"), ratios(r, "cpu")
    targets = [  # label, ratio key, bare key, vitcnn key, target, test, images (None: seconds)
        (
            f"whole job, {args.images} images",
            "job",
            "bare",
            "job",
            ">= 0.85",
            lambda x: x >= 0.85,
            args.images,
        ),
        (
            f"small job, {args.small} images (time)",
            "small",
            "bare_small",
            "job_small",
            "<= 2.0",
            lambda x: x <= 2.0,
            None,
        ),
        (
            f"steady state, {args.images} images",
            "steady",
            "bare",
            "job",
            ">= 0.95",
            lambda x: x >= 0.95,
            args.images,
        ),
        (
            f"Python API, {args.api_images} images",
            "api",
            "bare_api",
            "api",
            ">= 0.95",
            lambda x: x >= 0.95,
            args.api_images,
        ),
    ]
    rows = []
    for label, key, bare_key, ours, target, ok, n in targets:
        what = "steady" if key == "steady" else "wall"
        b, v = [x[what] for x in r[bare_key]], [x[what] for x in r[ours]]

        def show(t: float, n: int | None = n) -> str:
            return f"{n / t:.1f} img/s" if n else f"{t:.1f} s"

        met = [ok(x) for x in wall[key]]
        verdict = "met" if all(met) else "met in some rounds" if any(met) else "NOT met"
        rows.append(
            [
                label,
                f"{show(max(b))}–{show(min(b))}" if n else f"{show(min(b))}–{show(max(b))}",
                f"{show(max(v))}–{show(min(v))}" if n else f"{show(min(v))}–{show(max(v))}",
                span(wall[key]),
                span(cpu[key]) if key in cpu else "-",
                target,
                verdict,
            ]
        )
    print(f"\n{name}: {r['job'][0]['plan']}")
    print(
        table(rows, ["", "bare", "vitcnn", "ratio (rounds)", "CPU-time ratio", "target", "verdict"])
    )
    best = min(r["job_small"], key=lambda x: x["wall"])
    steps = ", ".join(f"{k} {v:.2f}" for k, v in best["timings"].items())
    print(f"where the best {args.small}-image job's {best['wall']:.1f} s go: {steps}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,vit_base_patch16_224")
    p.add_argument("--images", type=int, default=256, help="images of the whole job")
    p.add_argument("--small", type=int, default=16, help="images of the small job")
    p.add_argument("--api-images", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray comparison row")
    args = p.parse_args()
    folder = photo_folder(max(args.images, args.small, args.api_images))
    tmp = Path(tempfile.mkdtemp(prefix="vitcnn-speed-"))
    print(
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
        f"{os.getloadavg()[0]:.1f} at start; {args.rounds} rounds; photographs: {folder}"
    )
    try:
        for name in args.models.split(","):
            url = str(tmp / f"{name}.zarr")
            report(name, measure(name, folder, url, args), args)
            if not args.no_ray:
                ray_job = job(name, folder, args.small, url, workers=1)
                steps = ", ".join(f"{k} {v:.2f}" for k, v in ray_job["timings"].items())
                print(
                    f"the same {args.small}-image job on one Ray actor (--workers 1, a local "
                    f"Ray started for it): {ray_job['wall']:.1f} s ({steps})"
                )
            shutil.rmtree(url, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
