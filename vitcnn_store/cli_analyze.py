"""``vitcnn analyze {cka,attention,localization,skip,probe} STORE RUN ...``.

Each subcommand maps its options one to one onto the fields of the job's
config dataclass in :mod:`jobs.analyze` (argparse ``dest`` = field name), runs
the job, draws its figure (:mod:`vitcnn_store.plots`) and prints where the
result and the figure went. Parsing text options (``--tokens``, ``--shots
full``) happens here; jobs take typed values. This module imports only
argparse; the jobs (dask, xarray, matplotlib) load when a command runs.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.analyze import AnalysisOptions, AnalysisResult

__all__ = ["add_analyze_parser", "analyze", "cmd_analyze", "describe_result", "parse_tokens"]

_EXAMPLES = """examples:
  vitcnn analyze cka acts.zarr vitb16                 # all layers x all layers
  vitcnn analyze cka acts.zarr vitb16 r50             # cross-model, aligned by image_id
  vitcnn analyze cka acts.zarr vitb16 --batch-size 1024 --batches 10 --repeats 20
  vitcnn analyze cka acts.zarr vitb16 --estimator unbiased --roles branches
  vitcnn analyze attention acts.zarr vitb16
  vitcnn analyze localization acts.zarr vitb16 --layer blocks.11 --tokens 3:3,7:7
  vitcnn analyze skip acts.zarr vitb16
  vitcnn analyze probe acts.zarr vitb16 --shots 10 --features cls
  vitcnn analyze probe acts.zarr r50 --l2 1.0 --roles branches  # fixed penalty, branch outputs too
"""


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _mebibytes(text: str) -> int:
    return int(_int_at_least(1)(text)) * 2**20


# The default --l2-grid as text: argparse parses string defaults with the option's type.
DEFAULT_L2_GRID_TEXT = ",".join(repr(10.0 ** (e / 2)) for e in range(-6, 11))


def _l2(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a penalty >= 0, got {text!r}")
    return value


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not 0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _roles(parser: argparse.ArgumentParser) -> None:
    """``--roles``, shared by the analyses drawn along depth (CKA, probes)."""
    parser.add_argument(
        "--roles",
        choices=["stream", "branches", "all"],  # jobs.analyze.depth.ROLE_SETS
        default="stream",
        help="layers without --layers: the residual stream (default: stem and block "
        "outputs), plus branch outputs, or every stored layer",
    )


def _shots(text: str) -> int:
    if text.strip().lower() == "full":
        return 0
    return int(_int_at_least(0)(text))


def parse_tokens(text: str) -> tuple[tuple[int, int] | int, ...]:
    """``--tokens``: grid positions ``row:col`` or flat patch indices, comma-separated.

    Ranges are checked by the job against the layer's grid.

    Examples
    --------
    >>> parse_tokens("0:1, 5")
    ((0, 1), 5)
    """
    out: list[tuple[int, int] | int] = []
    for item in (s.strip() for s in re.split(r"[,;]", text)):
        if not item:
            continue
        try:
            if ":" in item:
                row, col = (int(v) for v in item.split(":"))
                out.append((row, col))
            else:
                out.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--tokens wants row:col or patch indices, comma-separated; got {item!r}"
            ) from None
    if not out:
        raise argparse.ArgumentTypeError("--tokens names no token")
    return tuple(out)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="store path or fsspec URL")
    p.add_argument("run", help="run name (the result is written under it)")


def _options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("result and execution")
    g.add_argument("--name", help="result name under <run>/_analyses/ (default: the analysis)")
    g.add_argument(
        "--recompute",
        action="store_true",
        help="recompute even if a result with the same parameters is stored",
    )
    g.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="analyse the written units of an unfinished run (recorded in the result)",
    )
    g.add_argument(
        "--figures",
        metavar="DIR",
        help="figure folder (default: <store>.figures/ beside a local store, "
        "./vitcnn_figures/ for remote URLs)",
    )
    g.add_argument("--no-figure", dest="figure", action="store_false", help="draw no figure")
    g.add_argument(
        "--dask-address",
        metavar="tcp://HOST:PORT",
        help="dask scheduler to run on (default: local threads)",
    )
    g.add_argument("--threads", type=_int_at_least(1), help="local threads (default: all cores)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``analyze`` and its five subcommands to the ``vitcnn`` subparsers."""
    p = subparsers.add_parser(
        "analyze",
        help="analyses of stored activations (CKA, attention, localization, skip, probes)",
        description="Dask jobs over a store; results go to <run>/_analyses/<name>, figures "
        "beside the store. No model is loaded.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="analysis", required=True, parser_class=type(p))

    c = sub.add_parser("cka", help="all-pairs CKA between layers of one or two runs")
    _common(c)
    c.add_argument("run2", nargs="?", help="second run (images aligned by image_id)")
    c.add_argument(
        "--estimator",
        choices=["unbiased-minibatch", "biased", "unbiased"],
        default="unbiased-minibatch",
        help="unbiased HSIC1 summed over minibatches (default, the paper's), biased HSIC "
        "over all images, or unbiased HSIC1 over all images",
    )
    c.add_argument(
        "--batch-size",
        type=_int_at_least(4),
        default=1024,
        help="images per batch (default 1024, capped to the usable images)",
    )
    c.add_argument(
        "--batches",
        dest="max_batches",
        type=_int_at_least(1),
        metavar="N",
        help="at most N batches per repeat (default: every full batch)",
    )
    c.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=1,
        help="fresh samplings, averaged (std reported)",
    )
    c.add_argument("--seed", type=int, default=0, help="sampling seed")
    c.add_argument(
        "--reduce",
        choices=["flatten", "gap", "cls"],
        default="flatten",
        help="flatten tokens x channels (default), token/spatial mean, or CLS",
    )
    c.add_argument("--kernel", choices=["linear", "rbf"], default="linear")
    c.add_argument(
        "--rbf-threshold",
        type=float,
        default=1.0,
        help="RBF bandwidth as a fraction of the median distance",
    )
    _roles(c)
    c.add_argument("--layers", metavar="PATTERNS", help="pick the first run's layers")
    c.add_argument(
        "--layers2",
        metavar="PATTERNS",
        help="pick the second side's layers (default: --layers within a run, "
        "the same roles of RUN2 across runs)",
    )
    c.add_argument(
        "--null-batches",
        type=_int_at_least(0),
        metavar="K",
        help="batches of the permutation null (default: one repeat's, within 1 GiB of "
        "batch Grams; 0: no null)",
    )
    c.add_argument(
        "--gram-dtype",
        choices=["float64", "float32"],
        default="float64",
        help="storage of the Gram cache (always accumulated in float64; float32 halves it "
        "and costs ~1e-7 in CKA)",
    )
    c.add_argument(
        "--gram-tile",
        type=_int_at_least(1),
        metavar="N",
        help="images per Gram tile when computing the cache (default 512, whole units)",
    )
    c.add_argument(
        "--gather-memory",
        dest="gather_bytes",
        type=_mebibytes,
        default=2 * 2**30,
        metavar="MIB",
        help="memory for whole batch Grams of the RBF kernel (default 2048 MiB)",
    )
    _options(c)

    a = sub.add_parser("attention", help="mean attention distance, entropy, CLS maps per head")
    _common(a)
    a.add_argument(
        "--renormalize",
        action="store_true",
        help="rescale rows over patch keys after dropping prefix tokens",
    )
    a.add_argument("--layers", metavar="PATTERNS", help="restrict the attention layers")
    _options(a)

    lo = sub.add_parser("localization", help="CKA of chosen tokens with every input patch")
    _common(lo)
    lo.add_argument("--layer", help="layer (default: the last stored block)")
    lo.add_argument(
        "--tokens",
        type=parse_tokens,
        metavar="LIST",
        help="grid positions row:col or flat patch indices, comma-separated "
        "(default: 4-5 spread over the grid)",
    )
    lo.add_argument("--batch-size", type=_int_at_least(4), default=1024)
    lo.add_argument("--seed", type=int, default=0)
    _options(lo)

    s = sub.add_parser("skip", help="skip-connection norm ratios ||z||/||f(z)|| per block")
    _common(s)
    _options(s)

    pr = sub.add_parser(
        "probe",
        help="linear probes per layer (closed-form ridge, penalty by cross-validation)",
        description="Ridge probes onto {-1,1} one-hot targets per layer, plotted against "
        "normalized depth with the chance level. The penalty is chosen per layer by "
        "stratified k-fold cross-validation on the training split unless --l2 fixes it.",
    )
    _common(pr)
    pr.add_argument(
        "--shots",
        type=_shots,
        default=0,
        metavar="K|full",
        help="training images per class (default full: a stratified split)",
    )
    pr.add_argument(
        "--features",
        choices=["auto", "cls", "gap"],
        default="auto",
        help="auto (default): the CLS token where a layer has one that varies between "
        "images, else the token/spatial mean, recorded per layer with the reason; cls: "
        "the CLS token (layers without one are refused); gap: the token/spatial mean",
    )
    pr.add_argument("--seed", type=int, default=0, help="split (and fold) seed")
    pr.add_argument("--repeats", type=_int_at_least(1), default=1, help="splits, averaged")
    pr.add_argument(
        "--l2",
        type=_l2,
        default=None,
        metavar="auto|VALUE",
        help="ridge penalty: auto (default) chooses it per layer by cross-validation "
        "over --l2-grid; a number fixes it",
    )
    pr.add_argument(
        "--l2-grid",
        type=_float_list,
        default=DEFAULT_L2_GRID_TEXT,
        metavar="LIST",
        help="penalties tried by cross-validation, comma-separated "
        "(default 1e-3 to 1e5 in half decades)",
    )
    pr.add_argument(
        "--cv-folds",
        type=_int_at_least(2),
        default=5,
        metavar="K",
        help="stratified folds of the training split (capped at the smallest class count)",
    )
    pr.add_argument(
        "--test-fraction",
        type=float,
        default=0.25,
        help="held-out share of each class for --shots full",
    )
    pr.add_argument(
        "--layers",
        metavar="PATTERNS",
        help="layers by pattern (default: the residual stream, one point per block)",
    )
    _roles(pr)
    _options(pr)
    return p


def describe_result(result: AnalysisResult, figure: Path | None = None) -> str:
    """What ``vitcnn analyze`` prints: where the result went (or was reused), its
    summary line, and its figure."""
    where = f"{result.store.rstrip('/')}/{result.group}"
    if result.reused:
        lines = [f"{result.analysis}: reused {where} (same parameters; --recompute to redo)"]
    else:
        lines = [f"{result.analysis}: wrote {where}"]
    summary = result.dataset.attrs.get("summary")
    if summary:
        lines.append(f"  {summary}")
    if figure is not None:
        lines.append(f"figure: {figure}")
    return "\n".join(lines)


def analyze(
    analysis: str, config: AnalysisOptions, *, figure: bool = True, figures: str | None = None
) -> tuple[AnalysisResult, Path | None]:
    """Run analysis job ``analysis`` on ``config`` and draw its figure (unless not ``figure``).

    Figures go to ``figures``, by default beside a local store
    (:func:`vitcnn_store.plots.figure_dir`).
    """
    from jobs.analyze import JOBS

    result = JOBS[analysis][1](config)
    path = None
    if figure:
        from vitcnn_store.plots import save_result_figure

        path = save_result_figure(result.dataset, result.store, result.run, result.name, figures)
    return result, path


def cmd_analyze(args: argparse.Namespace) -> int:
    """Run the chosen analysis job, draw its figure, print where both went."""
    from jobs.analyze import JOBS, AnalysisWarning

    config_cls, _ = JOBS[args.analysis]
    kwargs = {f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)}

    def show(message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        print(f"vitcnn analyze {args.analysis}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", AnalysisWarning)
        warnings.showwarning = show
        result, figure = analyze(
            args.analysis, config_cls(**kwargs), figure=args.figure, figures=args.figures
        )
    print(describe_result(result, figure))
    return 0
