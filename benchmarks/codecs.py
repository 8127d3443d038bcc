"""Which compression for activation chunks: CPU cost and size of each codec chain, per image.

Real float16 feature maps of one unit (``preset:blocks``) of ViT-B/16 and
ResNet-50 over photographs are encoded with each candidate chain — blosc-lz4
and blosc-zstd at several levels with no shuffle, byte shuffle and bit shuffle,
plain zstd, and no compression — always followed by zarr's ``crc32c``. For each
chain the script prints the stored bytes per image (ratio to the raw float16
bytes), the encode and decode CPU seconds per image (``time.thread_time``: one
thread, insensitive to other load on the machine), and the encode CPU as a
fraction of the model's own forward CPU per image — the share of the cores a
write thread takes from the forward on a CPU-bound machine. It also writes a
unit through the store's real write path (zarr, checksums, files) for the
chains the store offers.

    python benchmarks/codecs.py                        # both models, 16 images
    python benchmarks/codecs.py --models resnet50 --images 32
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import torch
from _photos import photo_folder

from jobs.config import ExtractConfig
from jobs.plan import plan_extraction
from jobs.run_setup import prepare_store
from jobs.worker import UnitExtractor
from vitcnn_store.interface.describe import table
from vitcnn_store.models import ModelSpec
from vitcnn_store.store.codecs import COMPRESSIONS, DEFAULT_COMPRESSION

numcodecs.blosc.use_threads = False  # as zarr sets it: one thread per chunk


def candidates() -> dict[str, object | None]:
    """Name → numcodecs codec (None: no compression). Every chain ends with crc32c."""
    out: dict[str, object | None] = {"none": None}
    shuffles = {
        "noshuffle": numcodecs.Blosc.NOSHUFFLE,
        "shuffle": numcodecs.Blosc.SHUFFLE,
        "bitshuffle": numcodecs.Blosc.BITSHUFFLE,
    }
    for cname, levels in (("lz4", (1, 5)), ("zstd", (1, 3))):
        for level in levels:
            for sname, shuffle in shuffles.items():
                out[f"blosc-{cname}:{level}-{sname}"] = numcodecs.Blosc(
                    cname=cname, clevel=level, shuffle=shuffle, typesize=2
                )
    for level in (1, 3):
        out[f"zstd:{level}"] = numcodecs.Zstd(level=level)
    return out


#: The store's --compression names and the chain each stands for (vitcnn_store/store/codecs.py).
STORE_CHAINS = {"none": "none", "lz4": "blosc-lz4:1-bitshuffle", "zstd": "zstd:1"}


def unit_values(name: str, images: int, folder: str) -> tuple[dict[str, np.ndarray], float]:
    """One unit's float16 arrays of ``name`` over real images, and forward CPU s/image."""
    tmp = Path(tempfile.mkdtemp(prefix="vitcnn-codecs-"))
    try:
        cfg = ExtractConfig(
            ModelSpec(name),
            folder,
            str(tmp / "s.zarr"),
            "r",
            limit=images,
            chunk_size=images,
            progress=False,
        )
        template = plan_extraction(cfg)
        prepare_store(cfg, template)
        ex = UnitExtractor(template.plan, template.model)
        batch = ex.decode(0, images).batch
        ex.forward(batch)  # warm-up
        with torch.inference_mode():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            ex.model(
                batch.contiguous(memory_format=torch.channels_last)
                if template.plan.channels_last
                else batch
            )
            r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / images
        values = ex.forward(batch)
        ex.close()
        return {k: v.copy() for k, v in values.items()}, cpu
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(values: dict[str, np.ndarray], codec: object | None, repeats: int) -> tuple:
    """(stored bytes, encode CPU s, decode CPU s) for one unit, best of ``repeats``."""
    best_enc = best_dec = float("inf")
    stored = 0
    for _ in range(repeats):
        t0 = time.thread_time()
        encoded = []
        for v in values.values():
            data = v.tobytes() if codec is None else codec.encode(v)  # type: ignore[attr-defined]
            encoded.append(bytes(data) + google_crc32c.value(data).to_bytes(4, "little"))
        best_enc = min(best_enc, time.thread_time() - t0)
        t0 = time.thread_time()
        for blob in encoded:
            body = blob[:-4]
            assert google_crc32c.value(body).to_bytes(4, "little") == blob[-4:]
            if codec is not None:
                codec.decode(body)  # type: ignore[attr-defined]
        best_dec = min(best_dec, time.thread_time() - t0)
        stored = sum(len(b) for b in encoded)
    return stored, best_enc, best_dec


def store_write(
    values: dict[str, np.ndarray],
    compression: str,
    folder: str,
    name: str,
    images: int,
    repeats: int,
) -> tuple[float, float, int]:
    """Write CPU s (this thread plus zarr's workers) and wall s of one unit through the store."""
    tmp = Path(tempfile.mkdtemp(prefix="vitcnn-codecs-"))
    try:
        cfg = ExtractConfig(
            ModelSpec(name),
            folder,
            str(tmp / "s.zarr"),
            "r",
            limit=images,
            chunk_size=images,
            progress=False,
            compression=compression,
        )
        writer = prepare_store(cfg, plan_extraction(cfg))
        failed, reasons = np.zeros(images, dtype=bool), [""] * images
        best_cpu = best_wall = float("inf")
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            writer.write_unit(0, values, failed, reasons)
            best_cpu = min(best_cpu, time.process_time() - c0)
            best_wall = min(best_wall, time.perf_counter() - t0)
        size = sum(
            f.stat().st_size
            for f in (tmp / "s.zarr" / "r").rglob("*")
            if f.is_file() and "/c/" in str(f)
        )
        return best_cpu, best_wall, size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_base_patch16_224,resnet50")
    p.add_argument("--images", type=int, default=16, help="images per unit")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    folder = photo_folder(args.images)
    for name in args.models.split(","):
        values, fwd_cpu = unit_values(name, args.images, folder)
        raw = sum(v.nbytes for v in values.values())
        rows = []
        for cname, codec in candidates().items():
            stored, enc, dec = measure(values, codec, args.repeats)
            n = args.images
            rows.append(
                [
                    cname,
                    f"{stored / n / 2**20:.2f}",
                    f"{stored / raw:.3f}",
                    f"{enc / n * 1e3:.1f}",
                    f"{raw / enc / 2**20:.0f}",
                    f"{dec / n * 1e3:.1f}",
                    f"{enc / n / fwd_cpu * 100:.1f} %",
                ]
            )
        print(
            f"\n{name}: one unit of {args.images} images, {raw / args.images / 2**20:.2f} MiB "
            f"float16 per image, forward {fwd_cpu * 1e3:.0f} ms CPU per image "
            f"({torch.get_num_threads()} threads)"
        )
        header = [
            "chain (+ crc32c)",
            "MiB/img",
            "ratio",
            "encode ms CPU/img",
            "encode MiB/s",
            "decode ms CPU/img",
            "encode / forward CPU",
        ]
        print(table(rows, header))
        rows = []
        for compression in COMPRESSIONS:
            cpu, wall, size = store_write(
                values, compression, folder, name, args.images, args.repeats
            )
            n = args.images
            rows.append(
                [
                    compression + (" (default)" if compression == DEFAULT_COMPRESSION else ""),
                    STORE_CHAINS[compression],
                    f"{size / n / 2**20:.2f}",
                    f"{cpu / n * 1e3:.1f}",
                    f"{wall / n * 1e3:.1f}",
                    f"{cpu / n / fwd_cpu * 100:.1f} %",
                ]
            )
        print(f"\n{name}: the store's write path (RunWriter.write_unit: zarr, crc32c, files)")
        print(
            table(
                rows,
                [
                    "--compression",
                    "chain",
                    "MiB/img on disk",
                    "write ms CPU/img",
                    "write ms wall/img",
                    "write / forward CPU",
                ],
            )
        )


if __name__ == "__main__":
    main()
