"""Reading a store locally, on S3 (moto on loopback) and over HTTP without listing.

One store is extracted locally (a tiny ViT, ``preset:paper``, so many layers),
its CKA computed once (the Gram cache filled), then copied as is to an S3
bucket served by moto (in a process of its own, as a real S3 is) and served by
Python's http.server answering 404 for every folder (as CDNs and gateways do).
Each operation runs in this process through the real CLI on each location,
``--repeats`` times (medians), and ``ls`` and ``show`` again as whole commands
(a process each, as a user runs them). The script prints seconds, the ratio to
local and the requests each made (counted by the servers), and checks that
``query``'s output is byte-identical everywhere and that ``analyze cka`` on
the S3 copy rewrites no Gram object (it computes a new result, with a new
seed, from the copied Grams).

    python benchmarks/remote_store.py                 # 96 images, depth 6
    python benchmarks/remote_store.py --images 384 --depth 12
    python benchmarks/remote_store.py --moto all      # moto's stock server

The S3 server is moto's S3 application alone, answering on kept-alive HTTP/1.1
connections, as S3 endpoints do. ``--moto all`` runs ``python -m moto.server``
instead, which serves every AWS service: it finds each request's service by
listing moto's package folders, and closes the connection after each answer,
costs of the fake server (about 4 ms a request here) that no S3 endpoint has,
and that hid what our requests cost.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import MOTO_REQUEST
from tests.http_store import serve_without_listing


def _cli(argv: list[str]) -> str:
    from vitcnn_store.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err.getvalue()[-500:]}")
    return out.getvalue()


#: moto's S3 application alone on loopback, HTTP/1.1 (kept-alive connections), logging
#: each request to stderr as ``python -m moto.server`` does.
_MOTO_S3 = """
import sys
from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

class KeepAlive(MotoRequestHandler):
    protocol_version = "HTTP/1.1"

app = create_backend_app("s3")
port = int(sys.argv[1])
make_server("127.0.0.1", port, app, threaded=True, request_handler=KeepAlive).serve_forever()
"""


class _MotoProcess:
    """moto's S3 server in a child process; counts the requests it logs (and, with
    ``BENCH_TRACE=1``, groups them by path)."""

    def __init__(self, server: str = "s3") -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _MOTO_S3, str(port)]
            if server == "s3"
            else [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines = 0
        self.paths: dict[str, int] = {}
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 30
        while True:  # ready when it answers
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise SystemExit("moto's server did not start") from None
                time.sleep(0.2)

    def _read(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            m = MOTO_REQUEST.search(line)
            if not m:
                continue
            self._lines += 1
            if os.environ.get("BENCH_TRACE"):
                key = m.group(1) + " " + re.sub(r"/c/[0-9/]+$", "/c/*", m.group(2))
                key = re.sub(r"blocks\.\d+[^/]*", "L", key)
                key += " (list)" if m.group(3) and "list-type" in m.group(3) else ""
                self.paths[key] = self.paths.get(key, 0) + 1

    @property
    def n(self) -> int:
        """Requests answered so far (the log trails the answers: wait until it is still)."""
        seen = -1
        while seen != self._lines:
            seen = self._lines
            time.sleep(0.3)
        return seen

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


def _command(argv: list[str]) -> float:
    """Seconds of ``vitcnn ARGV`` as a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "vitcnn_store.cli", *argv],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t


def _timed(fn: Callable[[], object], counter: Callable[[], int]) -> tuple[float, int, object]:
    before, t = counter(), time.perf_counter()
    value = fn()
    return time.perf_counter() - t, counter() - before, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3, help="medians of this many (default: 3)")
    p.add_argument(
        "--moto",
        choices=("s3", "all"),
        default="s3",
        help="moto's S3 app on HTTP/1.1 (default), or its stock every-service server",
    )
    args = p.parse_args()

    from jobs.extract import ExtractConfig, extract
    from vitcnn_store.models import ModelSpec

    work = Path(tempfile.mkdtemp(prefix="remote_store_"))
    local = str(work / "acts.zarr")
    model = ModelSpec("vit_tiny_patch16_224", img_size=32, model_args={"depth": args.depth})
    extract(
        ExtractConfig(
            model=model,
            store=local,
            run="v",
            images="builtin:faces",
            limit=args.images,
            chunk_size=32,
            layers="preset:paper",
            progress=False,
        )
    )
    figures = str(work / "figures")
    cka = ["--batch-size", "32", "--figures", figures]
    _cli(["analyze", "cka", local, "v", *cka])  # fills the Gram cache

    # moto in a process of its own, as a real S3 is: in this process its request
    # handling would share the GIL with the client being measured.
    moto = _MotoProcess(args.moto)
    endpoint = moto.endpoint
    os.environ.pop("AWS_ENDPOINT_URL", None)
    opts = {"endpoint_url": endpoint, "key": "k", "secret": "s"}
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("bench")
    fs.put(local, "bench/acts.zarr", recursive=True)  # a copy: new modification times
    s3 = "s3://bench/acts.zarr"
    flags = [f"--storage-option={k}={v}" for k, v in opts.items()]

    def grams() -> dict[str, str]:
        return {
            k: str(v.get("ETag"))
            for k, v in fs.find("bench/acts.zarr/v/_grams", detail=True).items()
        }

    rows: list[list[str]] = []
    with serve_without_listing(str(work)) as (base, http_requests):
        http = f"{base}/acts.zarr"
        where = {
            "local": (local, [], lambda: 0),
            "S3 (moto)": (s3, flags, lambda: moto.n),
            "HTTP, no listing": (http, [], lambda: http_requests[0]),
        }
        ops: dict[str, Callable[[str, list[str]], object]] = {
            "ls": lambda u, f: _cli(["ls", u, *f]).replace(u, "STORE"),
            "show": lambda u, f: _cli(["show", u, "v", *f]).replace(u, "STORE"),
            "query (4 images)": lambda u, f: _cli(
                ["query", u, "v", "blocks.1", "--images", "0:4", *f]
            ).replace(u, "STORE"),
            "xr.open_datatree": lambda u, f: _datatree(u, opts if f else None),
        }
        for name, op in ops.items():
            base_s = None
            outputs = set()
            for label, (url, f, counter) in where.items():
                runs = [
                    _timed(lambda op=op, url=url, f=f: op(url, f), counter)
                    for _ in range(args.repeats)
                ]
                seconds = statistics.median(r[0] for r in runs)
                outputs.update(r[2] for r in runs if isinstance(r[2], str))
                base_s = base_s or seconds
                requests = str(runs[0][1]) if label != "local" else "-"
                rows.append([name, label, f"{seconds:.2f}", f"{seconds / base_s:.2f}×", requests])
            if len(outputs) > 1:
                raise SystemExit(f"{name}: outputs differ between locations")
        # Whole commands, as a user runs them: each pays the interpreter, its imports and
        # (on S3) a new client, which the in-process rows above share.
        for name in ("ls", "show"):
            base_s = None
            for label, (url, f, _) in where.items():
                argv = [name, url, *(["v"] if name == "show" else []), *f]
                seconds = statistics.median(_command(argv) for _ in range(args.repeats))
                base_s = base_s or seconds
                rows.append(
                    [
                        f"{name} (whole command)",
                        label,
                        f"{seconds:.2f}",
                        f"{seconds / base_s:.2f}×",
                        "",
                    ]
                )
        before = grams()
        moto.paths.clear()
        cka_local, cka_s3, cka_requests = [], [], 0
        for seed in range(1, args.repeats + 1):  # a new seed: computed, not reused
            new = [*cka, "--seed", str(seed)]
            cka_local.append(
                _timed(lambda new=new: _cli(["analyze", "cka", local, "v", *new]), lambda: 0)[0]
            )
            seconds, requests, _ = _timed(
                lambda new=new: _cli(["analyze", "cka", s3, "v", *new, *flags]), lambda: moto.n
            )
            cka_s3.append(seconds)
            cka_requests = cka_requests or requests
        if os.environ.get("BENCH_TRACE"):
            print(sorted(moto.paths.items(), key=lambda kv: -kv[1])[:25])
        rewritten = sum(1 for k, v in grams().items() if before.get(k) != v)
        seconds_local, seconds_s3 = statistics.median(cka_local), statistics.median(cka_s3)
        rows.append(["analyze cka (new seed)", "local", f"{seconds_local:.2f}", "1.00×", "-"])
        rows.append(
            [
                "analyze cka (new seed)",
                "S3 copy",
                f"{seconds_s3:.2f}",
                f"{seconds_s3 / seconds_local:.2f}×",
                str(cka_requests),
            ]
        )
    moto.stop()
    print(
        f"store: {args.images} images, depth {args.depth}, preset:paper; S3 server: moto "
        f"{'S3 app, HTTP/1.1' if args.moto == 's3' else 'stock (every service)'}; "
        f"Gram objects rewritten on the S3 copy: {rewritten}"
    )
    print("| operation | where | seconds | vs local | requests |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _datatree(url: str, options: dict[str, str] | None) -> object:
    import xarray as xr

    with contextlib.redirect_stderr(io.StringIO()):
        tree = xr.open_datatree(url, engine="zarr", storage_options=options)
    return len(tree["v"].children)


if __name__ == "__main__":
    main()
