"""``vitcnn serve STORE [--host 127.0.0.1] [--port 8000] [--token-file F] [--allow-jobs]``.

The CLI registers this subcommand with :func:`add_serve_parser` (argparse
only) and hands the parsed arguments to :func:`cmd_serve`, which checks them
(:func:`~vitcnn_store.serve.config.check_serve_config`: a non-loopback bind
without a token exits 2 with one line) and only then loads FastAPI and
uvicorn.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vitcnn_store.serve.config import MIB, ServeConfig, check_serve_config, read_token

__all__ = ["add_serve_parser", "cmd_serve", "serve_config"]

_EPILOG = """examples:
  vitcnn serve acts.zarr                                  # http://127.0.0.1:8000/docs
  vitcnn serve acts.zarr --host 0.0.0.0 --token-file token.txt --allow-jobs
  # then, anywhere: xarray.open_datatree("http://127.0.0.1:8000/zarr", engine="zarr")
"""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``vitcnn`` subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="serve a store over HTTP: zarr keys, a JSON API, analysis jobs",
        description="Serve one store: its zarr keys at /zarr/, a JSON API at /api/ "
        "(OpenAPI at /docs). Read-only unless --allow-jobs.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", help="store path or fsspec URL")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1; others need --token-file)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free)")
    p.add_argument(
        "--token-file", metavar="F", help="file holding the bearer token every request must carry"
    )
    p.add_argument(
        "--allow-jobs",
        action="store_true",
        help="accept analysis jobs that write results into the store (needs a token)",
    )
    p.add_argument(
        "--cors",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser requests from this origin (repeatable; default: none)",
    )
    p.add_argument(
        "--dask-address",
        metavar="tcp://HOST:PORT",
        help="dask scheduler for analysis jobs (default: the server's threads)",
    )
    p.add_argument(
        "--ray-address",
        metavar="http://HEAD:8265",
        help="Ray job server that extraction jobs are submitted to, as by vitcnn submit "
        "(default: none)",
    )
    p.add_argument("--jobs-dir", metavar="DIR", help="job records (default: STORE.jobs beside it)")
    p.add_argument(
        "--max-response-mib",
        type=int,
        default=256,
        metavar="MIB",
        help="largest slice or result sent (default: 256; 413 beyond)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a request may take (default: 60; 504 beyond)",
    )
    return p


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The checked :class:`ServeConfig` of parsed ``vitcnn serve`` arguments."""
    if args.max_response_mib < 1:
        raise_usage(f"--max-response-mib must be >= 1, got {args.max_response_mib}")
    if not args.timeout > 0:
        raise_usage(f"--timeout must be positive, got {args.timeout}")
    return check_serve_config(
        ServeConfig(
            store=args.store,
            host=args.host,
            port=args.port,
            token=read_token(args.token_file) if args.token_file else None,
            allow_jobs=args.allow_jobs,
            cors_origins=tuple(args.cors),
            jobs_dir=args.jobs_dir,
            dask_address=args.dask_address,
            ray_address=args.ray_address,
            max_response_bytes=args.max_response_mib * MIB,
            request_timeout=args.timeout,
        )
    )


def raise_usage(message: str) -> None:
    from vitcnn_store.errors import UsageError

    raise UsageError(message)


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the options, build the app (opening the store), and serve until stopped."""
    config = serve_config(args)
    from vitcnn_store.serve.app import create_app, run_server

    app = create_app(config)
    print(
        f"vitcnn serve: {config.store} at http://{config.host}:{config.port}/ "
        f"(API docs at /docs{', jobs on' if config.allow_jobs else ''})",
        file=sys.stderr,
    )
    run_server(app, config)
    return 0
