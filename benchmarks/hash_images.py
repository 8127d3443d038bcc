"""What content hashing costs: a folder of 10,000 JPEGs, hashed the way --resume hashes them.

The files are real photographs (scikit-image's, re-encoded at ImageNet's typical
500x375, ~100 kB) repeated under 10,000 names. Side by side, in one run:

- ``list``: opening the folder as an image set (walk + stat: what every job did before);
- ``hash xN``: sha256 of every file on N threads (what a job adds now);
- ``decode``: decode + timm preprocessing of the same files on one thread, which
  every extraction does anyway (measured on a sample, scaled to the folder).

Page-cache state matters: the default measures warm files (just written);
``--drop-caches`` (root) measures cold reads too.

    python benchmarks/hash_images.py
    python benchmarks/hash_images.py --files 10000 --drop-caches
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vitcnn_store.data import hash_images, open_image_set
from vitcnn_store.data.builtin import PHOTO_NAMES, _photo
from vitcnn_store.interface.describe import format_bytes, table


def jpegs(size: tuple[int, int] = (500, 375)) -> list[bytes]:
    out = []
    for name in PHOTO_NAMES:
        im = Image.fromarray(np.asarray(_photo(name))).convert("RGB").resize(size)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_folder(root: Path, n: int) -> int:
    blobs = jpegs()
    total = 0
    for i in range(n):
        sub = root / f"class{i % 100:03d}"
        sub.mkdir(exist_ok=True)
        data = blobs[i % len(blobs)]
        (sub / f"img{i:06d}.jpg").write_bytes(data)
        total += len(data)
    return total


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--threads", default="1,8,16", help="thread counts to compare")
    p.add_argument("--decode-sample", type=int, default=300)
    p.add_argument("--drop-caches", action="store_true", help="also measure cold reads (root)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vitcnn-hash-"))
    try:
        total = write_folder(root, args.files)
        t_list, images = timed(lambda: open_image_set(str(root)))
        n = len(images)
        from timm.data import create_transform

        transform = create_transform(input_size=(3, 224, 224), is_training=False)
        sample = range(0, n, max(1, n // args.decode_sample))
        t_sample, _ = timed(lambda: [transform(images.load(i)) for i in sample])
        t_decode = t_sample / len(sample) * n
        rows = [
            [
                "list (walk + stat)",
                f"{t_list:.2f}",
                f"{t_list / n * 1e3:.3f}",
                f"{t_list / t_decode:.3f}",
            ]
        ]
        modes = ["warm"] + (["cold"] if args.drop_caches else [])
        digests = None
        for mode in modes:
            for threads in [int(t) for t in args.threads.split(",")]:
                if mode == "cold" and not drop_caches():
                    print("cannot drop caches (not root): cold reads not measured")
                    break
                t_hash, got = timed(lambda t=threads: hash_images(images, threads=t))
                assert digests is None or got == digests
                digests = got
                rows.append(
                    [
                        f"hash x{threads} ({mode})",
                        f"{t_hash:.2f}",
                        f"{t_hash / n * 1e3:.3f}",
                        f"{t_hash / t_decode:.3f}",
                    ]
                )
        rows.append(
            [
                "decode + preprocess (1 thread)",
                f"{t_decode:.2f}",
                f"{t_decode / n * 1e3:.3f}",
                "1.000",
            ]
        )
        print(
            f"\n{n} files, {format_bytes(total)} ({format_bytes(total / n)} each), "
            f"{os.cpu_count()} cores"
        )
        print(table(rows, ["step", "seconds", "ms/image", "vs decode"]))
        print("target: hashing is a small fraction of decoding, which extraction does anyway")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
