#!/usr/bin/env bash
# GPU check, for a machine with one CUDA GPU (under 5 minutes): read vitcnn / min(forward,
# bandwidth) in one run.
#
# For ViT-B/16 and ResNet-50 (random init, preset:blocks, float16, the default codec,
# checksums on), side by side:
#   - the bare bf16 forward: img/s of the model alone on the GPU (inputs already there);
#   - the store target's write bandwidth: MiB/s of fsync'ed 64 MiB files written where the
#     store goes, and the img/s it can absorb at the run's stored bytes per image;
#   - vitcnn: img/s of a whole `vitcnn extract --autocast` job's units (decode from JPEG
#     files, forward, write) and of the whole job (start-up included);
#   - vitcnn / min(forward, bandwidth): what the pipeline loses against its own bound.
#
#   benchmarks/gpu_check.sh [STORE_DIR] [IMAGES]     # defaults: a temp dir, 512 images
#
# The store's folder decides the bandwidth: point STORE_DIR at the disk the real stores use.
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU with a tiny model (to test the script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
STORE_DIR=${1:-$(mktemp -d)}
IMAGES=${2:-512}
mkdir -p "$STORE_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || true

RAY_USAGE_STATS_ENABLED=0 timeout 290 "$PY" - "$STORE_DIR" "$IMAGES" <<'EOF'
import os, shutil, sys, time

sys.path.insert(0, "benchmarks")
import numpy as np
import timm
import torch

from _photos import photo_folder
from jobs.config import ExtractConfig
from jobs.extract import extract
from vitcnn_store.interface.describe import table
from vitcnn_store.models import ModelSpec

store_dir, n = sys.argv[1], int(sys.argv[2])
dry = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
device = "cpu" if dry else "cuda"
if not dry:
    assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {os.cpu_count()} CPUs")
models = ("resnet18",) if dry else ("vit_base_patch16_224", "resnet50")
folder = photo_folder(n)


def write_bandwidth(seconds: float = 8.0) -> float:
    """MiB/s of fsync'ed 64 MiB files in the store's folder (incompressible float16)."""
    block = np.random.default_rng(0).standard_normal(32 * 2**20).astype(np.float16).tobytes()
    path = os.path.join(store_dir, "bandwidth.tmp")
    written, t0 = 0, time.perf_counter()
    with open(path, "wb") as f:
        while time.perf_counter() - t0 < seconds:
            f.write(block)
            f.flush()
            os.fsync(f.fileno())
            written += len(block)
    elapsed = time.perf_counter() - t0
    os.remove(path)
    return written / elapsed / 2**20


def bare_forward(name: str, batch: int = 64, steps: int = 20) -> float:
    if dry:
        batch, steps = 4, 2
    model = timm.create_model(name).to(device).eval()
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=not dry):
        for _ in range(3):
            model(x)
        if not dry:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        if not dry:
            torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


bandwidth = write_bandwidth(1.0 if dry else 8.0)
print(f"store target {store_dir}: {bandwidth:.0f} MiB/s written (fsync'ed)")
rows = []
for name in models:
    forward = bare_forward(name)
    url = os.path.join(store_dir, f"{name}.zarr")
    cfg = ExtractConfig(ModelSpec(name), folder, url, "r", layers="preset:blocks", limit=n,
                        chunk_size=16 if dry else 64, autocast=not dry, overwrite=True,
                        progress=False)
    summary = extract(cfg)
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(url) for f in fs)
    per_image = stored / n / 2**20
    disk = bandwidth / per_image
    units = n / summary.timings["units"]
    bound = min(forward, disk)
    rows.append([name, f"{forward:.0f}", f"{per_image:.2f}", f"{disk:.0f}", f"{units:.0f}",
                 f"{n / summary.seconds:.0f}", f"{units / bound:.2f}",
                 "forward" if forward < disk else "store"])
    print(f"{name}: {summary.plan}; start-up {summary.startup_seconds:.1f} s")
    shutil.rmtree(url, ignore_errors=True)
print(table(rows, ["model", "bare bf16 forward img/s", "stored MiB/img", "store img/s",
                   "vitcnn img/s (units)", "vitcnn img/s (whole job)", "vitcnn / min", "bound"]))
EOF
