"""The ``vitcnn`` command line: a thin shell over the jobs and the store.

Bad input exits with code 2 and a one-line message naming the problem and the
fix; failures of the environment (disk full, missing credentials, a read-only
store, an unreachable cluster, damaged data) exit with code 1 and one line.
``--debug`` shows the traceback. Heavy libraries are imported only by the
subcommand that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vitcnn_store.errors import UsageError, VitcnnError
from vitcnn_store.models.factory import ModelSpec
from vitcnn_store.options import add_arguments, config_kwargs, option

__all__ = ["build_parser", "main"]

#: What ``vitcnn --help`` says first (plain text: argparse prints it as is).
DESCRIPTION = (
    "The vitcnn command line: extract activations into a zarr store, analyse them, report."
)
STORE_HELP = "store path or fsspec URL"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_extract_options(p: argparse.ArgumentParser) -> None:
    from jobs.config import ExtractConfig  # light: the option table, no torch or Ray

    add_arguments(p, ExtractConfig)


def build_parser() -> argparse.ArgumentParser:
    from vitcnn_store.interface.cli_analyze import (  # argparse only: cheap
        FIGURES,
        add_analyze_parser,
    )

    parser = _Parser(prog="vitcnn", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "extract", help="extract activations into a store (in this process, or on Ray actors)"
    )
    _add_extract_options(p)

    p = sub.add_parser("submit", help="submit a job to a remote Ray cluster (Ray Jobs API)")
    jobs = p.add_subparsers(dest="job", required=True, parser_class=_Parser)
    p = jobs.add_parser("extract", help="vitcnn extract, run as a Ray Job")
    _add_extract_options(p)
    from jobs.submit import SubmitOptions

    add_arguments(p, SubmitOptions)

    p = sub.add_parser("layers", help="list a model's capturable layers with output shapes")
    add_arguments(p, LayersOptions)

    p = sub.add_parser("ls", help="list the runs of a store")
    p.add_argument("store", help=STORE_HELP)

    p = sub.add_parser("show", help="provenance, layers and failed images of a run")
    p.add_argument("store", help=STORE_HELP)
    p.add_argument("run", help="run name (vitcnn ls lists them)")

    p = sub.add_parser(
        "verify",
        help="read every chunk of a store; report damaged or missing data",
        description="Scrub a store: every chunk of every done unit must exist and match its "
        "checksum. Exit 0 when all is well, 1 when anything is wrong.",
    )
    p.add_argument("store", help=STORE_HELP)
    p.add_argument("run", nargs="?", help="check only this run")
    p.add_argument(
        "--repair",
        action="store_true",
        help="mark damaged units as not done, so that vitcnn extract ... --resume rewrites them",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("query", help="read stored activations of one layer")
    p.add_argument("store", help=STORE_HELP)
    p.add_argument("run", help="run name (vitcnn ls lists them)")
    p.add_argument("layer", help="layer name (vitcnn show lists them)")
    p.add_argument(
        "--images",
        default=":",
        help="index slice START:STOP[:STEP] or list i,j,k (default: every image)",
    )
    p.add_argument("--ids", help="comma-separated image ids (instead of --images)")
    p.add_argument("--attention", action="store_true", help="read attention, not activation")
    p.add_argument(
        "--out", metavar="FILE.npz", help="write the values with their image ids to this .npz file"
    )

    p = sub.add_parser("report", help="an HTML report of every analysis in a store")
    p.add_argument("store", help=STORE_HELP)
    p.add_argument(
        "--out",
        metavar="DIR",
        help=f"folder of report.html, its figures and data (default: {FIGURES})",
    )

    p = sub.add_parser("demo", help="the whole pipeline on built-in images, no network")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    p.add_argument(
        "--out",
        default="vitcnn_demo",
        help="output folder: the store acts.zarr and its figures beside it (default: vitcnn_demo)",
    )
    p.add_argument("--workers", type=int, default=2, help="Ray actors (default: 2)")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights")
    p.add_argument("--vit-checkpoint", metavar="PATH", help="weights for the ViT")
    p.add_argument("--resnet-checkpoint", metavar="PATH", help="weights for the ResNet")

    add_analyze_parser(sub)
    from vitcnn_store.serve.command import add_serve_parser  # argparse only: cheap

    add_serve_parser(sub)
    _add_storage_options(parser)
    return parser


STORAGE_OPTION_HELP = (
    "fsspec option for a remote store, KEY=VALUE (repeatable; VALUE a JSON literal or text, "
    "dotted KEY for nested options): e.g. endpoint_url=http://minio:9000, anon=true, "
    "client_kwargs.region_name=auto"
)


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    """``--storage-option`` on every (sub)command that takes a store."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _add_storage_options(sub)
    if any(a.dest == "store" for a in parser._actions):
        parser.add_argument(
            "--storage-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            dest="storage_option",
            help=STORAGE_OPTION_HELP,
        )


def parse_storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "client_kwargs.region_name=auto"]`` → ``{"a": 1, "client_kwargs": {...}}``.

    Examples
    --------
    >>> parse_storage_options(["anon=true", "client_kwargs.region_name=auto", "key=AK"])
    {'anon': True, 'client_kwargs': {'region_name': 'auto'}, 'key': 'AK'}
    """
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--storage-option wants KEY=VALUE, got {item!r}")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--storage-option {item!r}: {part} is not a nested option")
        node[leaf] = value
    return out


def _use_storage_options(args: argparse.Namespace) -> None:
    """Register ``--storage-option`` for the command's store (and for processes it starts:
    Ray actors of a local cluster inherit ``VITCNN_STORAGE_OPTIONS``)."""
    import json

    from vitcnn_store.store.layout import OPTIONS_ENV, use_storage_options

    options = parse_storage_options(getattr(args, "storage_option", None) or [])
    store = getattr(args, "store", None)
    if not options or not store:
        return
    use_storage_options(str(store), options)
    merged = {**json.loads(os.environ.get(OPTIONS_ENV) or "{}"), **options}
    os.environ[OPTIONS_ENV] = json.dumps(merged)


@dataclass(frozen=True)
class LayersOptions:
    """Options of ``vitcnn layers``."""

    model: ModelSpec = option(flag="model", nested=ModelSpec)  # noqa: RUF009 (field specifier)
    layers: str | None = option(
        None,
        flag="--layers",
        parse=str,
        metavar="PATTERNS",
        help="show only what these patterns select",
    )


def _extract_config(args: argparse.Namespace) -> Any:
    from jobs.config import ExtractConfig

    return ExtractConfig(**config_kwargs(ExtractConfig, args))


def cmd_extract(args: argparse.Namespace) -> int:
    from jobs.extract import extract

    print(extract(_extract_config(args)))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submit import SubmitOptions, SubmitRequest, submit

    cfg = _extract_config(args)
    cfg.validate()  # refuse bad input here, not on the cluster
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("submit needs --address http://HEAD:8265 or RAY_ADDRESS")
    options = SubmitOptions(**config_kwargs(SubmitOptions, args))
    return submit(SubmitRequest(address, cfg, options))


def cmd_layers(args: argparse.Namespace) -> int:
    from vitcnn_store.interface.describe import describe_model_layers

    options = LayersOptions(**config_kwargs(LayersOptions, args))
    print(describe_model_layers(options.model, options.layers))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from vitcnn_store.interface.describe import describe_store
    from vitcnn_store.store import open_store

    print(describe_store(open_store(args.store)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from vitcnn_store.interface.describe import describe_run
    from vitcnn_store.store import check_name, open_store

    check_name(args.run)  # a bad name is refused before the store is opened
    print(describe_run(open_store(args.store), args.run))
    return 0


def _ints(items: list[str]) -> list[int | None] | None:
    """Each item as an int (blank: None), or None where one is not a number."""
    try:
        return [int(p) if p.strip() else None for p in items]
    except ValueError:
        return None


def _parse_images(text: str, n: int) -> Any:
    """``--images`` as a list of indices or a slice, refused where it reaches past ``n`` images."""
    parts = _ints(text.split(":" if ":" in text else ","))
    if parts is None or not (":" not in text or 2 <= len(parts) <= 3):
        raise UsageError(f"--images wants START:STOP[:STEP] or i,j,k, got {text!r}")
    if ":" not in text:
        indices = [i for i in parts if i is not None]
        if not indices or any(not 0 <= i < n for i in indices):
            raise UsageError(
                f"--images {text}: indices must be in 0..{n - 1} (the run has {n} images)"
            )
        return indices
    if len(parts) == 3 and parts[2] == 0:
        raise UsageError(f"--images {text!r}: the step must not be zero (START:STOP:STEP)")
    # A slice past the end would be cut short silently (numpy's rule): say so instead.
    if any(p is not None and not -n <= p <= n for p in parts[:2]):
        raise UsageError(f"--images {text}: the run has {n} images (0:{n} takes them all)")
    return slice(*parts)


def _out_path(path: str | None) -> str | None:
    """The file ``--out`` writes: ``.npz`` added where missing; a folder that must exist.

    Checked before anything is read, so a refusal writes nothing.
    """
    if path is None:
        return None
    if path.endswith(".npy"):
        raise UsageError(
            f"--out {path}: query writes the values with their image ids as "
            f"one .npz file; name it {path[:-4]}.npz"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {path}: folder {folder} does not exist; create it first")
    return path if path.endswith(".npz") else f"{path}.npz"


def cmd_query(args: argparse.Namespace) -> int:
    import numpy as np

    from vitcnn_store.store import open_store

    out = _out_path(args.out)
    run = open_store(args.store)[args.run]
    data = run.attention(args.layer) if args.attention else run[args.layer]
    if args.ids:
        ids = [i.strip() for i in args.ids.split(",") if i.strip()]
        missing = sorted(set(ids) - set(run.image_ids))
        if missing:
            raise UsageError(f"unknown image id(s): {', '.join(missing[:5])}")
        data = data.sel(image=data.image_id.isin(ids))
    else:
        data = data.isel(image=_parse_images(args.images, run.n_images))
    values = data.values
    if out:
        from vitcnn_store.store.layout import store_io

        # The image ids travel with the values: an array alone loses which image is which.
        with store_io(out), open(out, "wb") as f:
            np.savez(
                f,
                values=values,
                dims=np.array(data.dims, dtype=str),
                image=data["image"].values,
                image_id=data["image_id"].values.astype(str),
                label=data["label"].values,
            )
    mask = ~np.isnan(values.reshape(values.shape[0], -1)).all(axis=1) if values.size else []
    print(
        f"{args.run}/{args.layer} {'attention' if args.attention else 'activation'} "
        f"{dict(zip(data.dims, values.shape, strict=True))} {values.dtype}, "
        f"{int(np.sum(mask))} image(s) with data" + (f" -> {out}" if out else "")
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from vitcnn_store.interface.describe import describe_verify
    from vitcnn_store.store import verify_store

    report = verify_store(args.store, args.run, repair=args.repair, progress=not args.no_progress)
    print(describe_verify(report))
    return 0 if report.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from vitcnn_store.interface.report import build_report
    from vitcnn_store.store import open_store

    print(f"report: {build_report(open_store(args.store), args.out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vitcnn_store.interface.demo import run_demo

    return run_demo(args)


def cmd_analyze(args: argparse.Namespace) -> int:
    from vitcnn_store.interface.cli_analyze import cmd_analyze as run_analyze

    return run_analyze(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from vitcnn_store.serve.command import cmd_serve as run_serve

    return run_serve(args)


COMMANDS = {
    "extract": cmd_extract,
    "submit": cmd_submit,
    "layers": cmd_layers,
    "ls": cmd_ls,
    "show": cmd_show,
    "query": cmd_query,
    "verify": cmd_verify,
    "report": cmd_report,
    "demo": cmd_demo,
    "analyze": cmd_analyze,
    "serve": cmd_serve,
}


def _as_user_error(e: Exception, url: str) -> VitcnnError | None:
    """The typed error to report for ``e``; ``None`` for a bug (keep the traceback)."""
    if isinstance(e, VitcnnError):
        return e
    from vitcnn_store.store.layout import environment_error

    return environment_error(url, e)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitcnn`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("VITCNN_DEBUG"))
    if debug:
        os.environ["VITCNN_DEBUG"] = "1"  # Ray workers' logs reach the terminal too
    from vitcnn_store.store.layout import storage_options_scope

    try:
        with storage_options_scope():
            _use_storage_options(args)
            return COMMANDS[args.command](args)
    except Exception as e:
        error = _as_user_error(e, getattr(args, "store", None) or "the store")
        if debug or error is None:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"vitcnn {args.command}: error: {message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("vitcnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
