"""Latency of the explorer's pages: p50/p99 per page type on a demo-sized store.

Serves a store (``--store``, e.g. ``vitcnn_demo/acts.zarr``; by default the
tests' explorer store is built: a ViT-Ti/16 and a ResNet-18 at 64 px over 24
faces, with every analysis) with ``vitcnn serve`` in its own process on a free
loopback port, then requests every page type ``--rounds`` times in turn, one
client, and prints per page type the first (cold) request and the p50/p99 of
the rest (warm: the run and results reused for a few seconds, pictures from the
cache), and the same for the pictures a page embeds.

    python benchmarks/explorer_pages.py                          # builds a store (~1 min)
    python benchmarks/explorer_pages.py --store vitcnn_demo/acts.zarr --rounds 30
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from vitcnn_store.interface.describe import table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pages(store: str) -> dict[str, str]:
    """One URL per page type, picked from what the store holds."""
    from vitcnn_store import open_store

    s = open_store(store)
    out = {"runs (/)": "/"}
    vit = next((r for r in s.runs if s[r].attention_layers), s.runs[0])
    run = s[vit]
    layer = run.layers[-1]
    out["run"] = f"/runs/{vit}"
    out["layer"] = f"/runs/{vit}/layers/{layer}"
    out["channel"] = f"/runs/{vit}/layers/{layer}/channels/0"
    out["image"] = f"/runs/{vit}/images/0"
    for name in run.analyses:
        kind = str(run.analysis(name).attrs.get("analysis"))
        out.setdefault(f"analysis: {kind}", f"/runs/{vit}/analyses/{name}")
    for other in s.runs:
        for name in s[other].analyses:
            kind = str(s[other].analysis(name).attrs.get("analysis"))
            out.setdefault(f"analysis: {kind}", f"/runs/{other}/analyses/{name}")
    return out


def get(url: str) -> tuple[float, bytes]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        body = r.read()
    return time.perf_counter() - t, body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="store to serve (default: build the tests' explorer store)")
    ap.add_argument("--rounds", type=int, default=20, help="requests per page type")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    store = args.store
    if store is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.serve.explorer_store import build_explorer_store

        store = build_explorer_store(Path(tmp.name) / "explorer.zarr")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vitcnn_store.cli", "serve", store, "--port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                get(base + "/static/explorer.css")
                break
            except OSError:
                time.sleep(0.1)
        rows = []
        for name, path in pages(store).items():
            cold, body = get(base + path)
            warm = [get(base + path)[0] for _ in range(args.rounds)]
            pics = re.findall(r'src="(/png/[^"]+)"', body.decode())[:12]
            pic_cold = [get(base + p.replace("&amp;", "&"))[0] for p in pics]
            pic_warm = [get(base + p.replace("&amp;", "&"))[0] for p in pics]
            ms = np.array(warm) * 1000
            rows.append(
                [
                    name,
                    f"{cold * 1000:.0f}",
                    f"{np.percentile(ms, 50):.0f}",
                    f"{np.percentile(ms, 99):.0f}",
                    str(len(pics)),
                    f"{np.percentile(np.array(pic_cold) * 1000, 50):.0f}" if pics else "-",
                    f"{np.percentile(np.array(pic_warm) * 1000, 50):.0f}" if pics else "-",
                ]
            )
        print(f"explorer pages of {store} (ms; one client, loopback)")
        print(
            table(
                rows,
                [
                    "page",
                    "cold",
                    "p50",
                    "p99",
                    "pictures",
                    "picture cold p50",
                    "picture cached p50",
                ],
            )
        )
    finally:
        server.terminate()
        server.wait(timeout=10)
        tmp.cleanup()


if __name__ == "__main__":
    main()
