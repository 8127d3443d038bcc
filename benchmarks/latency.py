"""Start-up and short-request latency: whole processes, side by side, in one run.

Each case is a fresh ``python`` process, timed from outside (wall seconds and
the CPU seconds of the process and its children); the cases are interleaved,
``--repeats`` rounds, and the median of each is printed next to the case it is
judged against:

* ``python -c pass`` — the floor any command pays;
* ``vitcnn --help`` and ``vitcnn ls STORE`` — against ``python -c pass``;
* ``vitcnn extract`` refused because the run exists (no ``--resume`` or
  ``--overwrite``) — against ``vitcnn ls`` on the same store (target ≤ 1.5×);
* ``vitcnn analyze cka`` whose result is already stored (reuse) — against
  ``vitcnn ls`` (target ≤ 1.5×);
* a 16-image extraction (``vitcnn extract --workers 0``, a new store each
  time) — against a bare process that imports timm, builds the same model,
  decodes and preprocesses the same JPEGs and runs one forward pass
  (target ≤ 1.1×);
* the in-memory kernels (``gram_linear`` + ``cka_matrix_from_grams`` on
  float32 arrays) — against the store path (``run_cka --estimator unbiased``,
  Gram cache dropped first) on the same stored layers, each timed inside its
  own process (reading the arrays into memory untimed).

``--profile-reuse`` also prints where the reuse case's time goes: the slowest
imports (``python -X importtime``) and the top of a cProfile.

    python benchmarks/latency.py                 # ViT-S/16 on CPU, 3 rounds
    python benchmarks/latency.py --repeats 5 --profile-reuse
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
CLI = [PY, "-m", "vitcnn_store.cli"]


def timed(cmd: list[str], ok: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, children included) of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def extract_cmd(model: str, images: str, store: str, run: str) -> list[str]:
    return [
        *CLI,
        "extract",
        model,
        "--images",
        images,
        "--store",
        store,
        "--run",
        run,
        "--workers",
        "0",
        "--no-progress",
    ]


# -- what runs inside the measured processes ---------------------------------------------


def bare_forward(model_name: str, folder: str) -> None:
    """What any inference script does: build the model, decode, preprocess, forward."""
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(model_name, pretrained=False).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    files = sorted(Path(folder).glob("*.jpg"))
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        model(batch)


def kernels(side: str, store: str) -> None:
    """Time one CKA path on the stored layers; print ``wall cpu`` (reading untimed)."""
    import numpy as np

    from vitcnn_store import open_store

    if side == "memory":
        from vitcnn_store.analysis.cka import cka_matrix_from_grams
        from vitcnn_store.analysis.gram import gram_linear

        run = open_store(store)["vit"]
        xs = [np.asarray(run[layer].values, dtype=np.float32) for layer in run.layers]
        t, c = time.perf_counter(), time.process_time()
        cka_matrix_from_grams([gram_linear(x) for x in xs], unbiased=True)
    else:
        from jobs.analyze.cka import CKAConfig, run_cka
        from vitcnn_store.store.grams import delete_grams

        delete_grams(open_store(store), "vit")
        cfg = CKAConfig(
            store=store, run="vit", estimator="unbiased", recompute=True, progress=False
        )
        t, c = time.perf_counter(), time.process_time()
        run_cka(cfg)
    print(f"{time.perf_counter() - t:.4f} {time.process_time() - c:.4f}")


def kernel_timed(side: str, store: str) -> tuple[float, float]:
    out = subprocess.run(
        [PY, __file__, "--kernels", side, store], capture_output=True, text=True, check=True
    )
    wall, cpu = out.stdout.split()[-2:]
    return float(wall), float(cpu)


# -- the benchmark -----------------------------------------------------------------------


def profile_reuse(store: str) -> None:
    cmd = ["analyze", "cka", store, "v", "--no-progress"]
    out = subprocess.run([PY, "-X", "importtime", *CLI[1:], *cmd], capture_output=True, text=True)
    rows = []
    for line in out.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].strip()))
    top = sorted((r for r in rows if not r[1].startswith(" ")), reverse=True)[:12]
    print("\nreuse: top-level imports (cumulative ms)")
    print("  " + ", ".join(f"{name} {us / 1000:.0f}" for us, name in top))
    prof = subprocess.run(
        [PY, "-m", "cProfile", "-s", "cumtime", *CLI[1:], *cmd], capture_output=True, text=True
    )
    lines = prof.stdout.splitlines()
    start = next((i for i, s in enumerate(lines) if "ncalls" in s), 0)
    print("reuse: cProfile, top by cumulative time")
    print("\n".join(lines[start : start + 30]))


def print_table(med: dict[str, tuple[float, float]], against: dict[str, str]) -> None:
    header = f"{'case':32} {'wall s':>7} {'cpu s':>7}   {'against':24} {'wall ×':>7}"
    header += f" {'cpu ×':>7}"
    print(header)
    print("-" * len(header))
    for name, (wall, cpu) in med.items():
        line = f"{name:32} {wall:7.2f} {cpu:7.2f}"
        if name in against and against[name] in med:
            bw, bc = med[against[name]]
            line += f"   {against[name]:24} {wall / bw:7.2f} {cpu / bc:7.2f}"
        print(line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median kept)")
    p.add_argument("--kernel-images", type=int, default=256)
    p.add_argument("--profile-reuse", action="store_true")
    p.add_argument(
        "--only",
        help="comma-separated words: only the cases (and what they are "
        "judged against) whose names hold one",
    )
    p.add_argument("--bare-forward", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--kernels", nargs=2, metavar=("SIDE", "STORE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_forward:
        bare_forward(*args.bare_forward)
        return 0
    if args.kernels:
        kernels(*args.kernels)
        return 0

    sys.path.insert(0, str(Path(__file__).parent))
    from _photos import photo_folder
    from cka_protocol import write_store

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MPLBACKEND", "Agg")
    tmp = Path(tempfile.mkdtemp(prefix="vitcnn-latency-"))
    try:
        folder = photo_folder(args.images)
        store = str(tmp / "acts.zarr")
        timed(extract_cmd(args.model, folder, store, "v"))
        timed([*CLI, "analyze", "cka", store, "v", "--no-progress"])  # stored: reused below
        kstore = str(tmp / "kernels.zarr")
        write_store(kstore, args.kernel_images, 6, 65, 384, 64)
        cases = {
            "python -c pass": lambda i: timed([PY, "-c", "pass"]),
            "vitcnn --help": lambda i: timed([*CLI, "--help"]),
            "vitcnn ls": lambda i: timed([*CLI, "ls", store]),
            "extract refused (run exists)": lambda i: timed(
                extract_cmd(args.model, folder, store, "v"), ok=(2,)
            ),
            "analyze cka, stored (reuse)": lambda i: timed(
                [*CLI, "analyze", "cka", store, "v", "--no-progress"]
            ),
            f"extract {args.images} images": lambda i: timed(
                extract_cmd(args.model, folder, str(tmp / f"new{i}.zarr"), "v")
            ),
            "bare timm forward": lambda i: timed(
                [PY, __file__, "--bare-forward", args.model, folder]
            ),
            "kernels in memory": lambda i: kernel_timed("memory", kstore),
            "kernels, store path": lambda i: kernel_timed("store", kstore),
        }
        against = {
            "vitcnn --help": "python -c pass",
            "vitcnn ls": "python -c pass",
            "extract refused (run exists)": "vitcnn ls",
            "analyze cka, stored (reuse)": "vitcnn ls",
            f"extract {args.images} images": "bare timm forward",
            "kernels in memory": "kernels, store path",
        }
        if args.only:
            words = args.only.split(",")
            keep = {k for k in cases if any(w in k for w in words)}
            keep |= {against[k] for k in keep if k in against}
            cases = {k: v for k, v in cases.items() if k in keep}
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
        for i in range(args.repeats):
            for name, case in cases.items():
                runs[name].append(case(i))
            print(f"round {i + 1}/{args.repeats} done", file=sys.stderr)
        med = {
            k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for k, v in runs.items()
        }
        print(
            f"{args.model}, {args.images} JPEGs, {args.repeats} interleaved rounds, "
            f"medians; {os.cpu_count()} CPUs"
        )
        print_table(med, against)
        if args.profile_reuse:
            profile_reuse(store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
