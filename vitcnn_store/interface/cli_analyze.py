"""``vitcnn analyze ANALYSIS STORE RUN ...``, one subcommand per registry entry.

The subcommands are the entries of :data:`vitcnn_store.interface.registry.ANALYSES`
(help, config, job, plotter). Each subcommand's options are built from the option
table of the job's config dataclass (:mod:`jobs.analyze.options`: flags, help,
parsers such as ``--tokens`` and ``--shots full``, choices, bounds), and the parsed
arguments become that config (:func:`analysis_config`), which refuses bad values
itself. The command runs the job, draws its figure (:mod:`vitcnn_store.interface.plots`) and
prints where the result and the figure went. Only the option tables load with
the parser; the jobs (dask, xarray, matplotlib) load when a command runs.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.analyze.options import AnalysisOptions, parse_tokens
from vitcnn_store.interface.registry import ANALYSES
from vitcnn_store.options import add_arguments, config_kwargs

if TYPE_CHECKING:
    from jobs.analyze import AnalysisResult

__all__ = [
    "FIGURES",
    "add_analyze_parser",
    "analysis_config",
    "analyze",
    "cmd_analyze",
    "describe_result",
    "parse_tokens",
]

#: Where the figures of a store go, as the help says it
#: (:func:`vitcnn_store.interface.plots.figure_dir`): analyze, report and demo all use this
#: one folder.
FIGURES = "<store>.figures/ beside a local store, ./vitcnn_figures/ for a remote URL"

_EXAMPLES = """examples:
  vitcnn analyze cka acts.zarr vitb16                 # residual stream x residual stream
  vitcnn analyze cka acts.zarr vitb16 r50             # cross-model, aligned by image_id
  vitcnn analyze cka acts.zarr vitb16 --batch-size 1024 --batches 10 --repeats 20
  vitcnn analyze cka acts.zarr vitb16 --estimator unbiased --roles branches
  vitcnn analyze attention acts.zarr vitb16
  vitcnn analyze localization acts.zarr vitb16 --layer blocks.11 --tokens 3:3,7:7
  vitcnn analyze skip acts.zarr vitb16
  vitcnn analyze probe acts.zarr vitb16 --shots 10 --features cls
  vitcnn analyze probe acts.zarr r50 --l2 1.0 --roles branches  # fixed penalty, branch outputs too
  vitcnn analyze top-images acts.zarr vitb16 --k 16     # browse them: vitcnn serve acts.zarr
"""


def _common(p: argparse.ArgumentParser, config: type[AnalysisOptions]) -> None:
    """The positionals, ``config``'s own options, then those every analysis takes."""
    p.add_argument("store", help="store path or fsspec URL")
    p.add_argument("run", help="run name (the result is written under it)")
    if any(f.name == "run2" for f in fields(config)):
        p.add_argument("run2", nargs="?", help="second run (images aligned by image_id)")
    common = [f.name for f in fields(AnalysisOptions)]
    add_arguments(p, config, skip=common)
    g = p.add_argument_group("result and execution")
    add_arguments(g, AnalysisOptions)  # type: ignore[arg-type]  # a group adds arguments too
    g.add_argument("--figures", metavar="DIR", help=f"figure folder (default: {FIGURES})")
    g.add_argument("--no-figure", dest="figure", action="store_false", help="draw no figure")


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``analyze`` and its subcommands to the ``vitcnn`` subparsers.

    Each subcommand's options come from its config's option table
    (:mod:`jobs.analyze.options`, light: no dask, xarray or zarr).
    """
    p = subparsers.add_parser(
        "analyze",
        help="analyses of stored activations (CKA, attention, localization, skip, probes, "
        "top images)",
        description="Dask jobs over a store; results go to <run>/_analyses/<name>/<key> (key: "
        f"a hash of the parameters; earlier results are kept), figures to {FIGURES}. No model "
        "is loaded.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="analysis", required=True, parser_class=type(p))
    for entry in ANALYSES.values():
        parser = sub.add_parser(entry.name, help=entry.help, description=entry.description)
        _common(parser, entry.config)
    return p


def analysis_config(args: argparse.Namespace) -> AnalysisOptions:
    """The config of ``vitcnn analyze <analysis>`` from its parsed arguments (validated)."""
    config = ANALYSES[args.analysis].config
    positional = {k: getattr(args, k) for k in ("store", "run", "run2") if hasattr(args, k)}
    return config(**positional, **config_kwargs(config, args))


def describe_result(result: AnalysisResult, figure: Path | None = None) -> str:
    """What ``vitcnn analyze`` prints: where the result went (or was reused), its
    summary line, and its figure."""
    base = result.store.url.rstrip("/")
    where = f"{base}/{result.group}"
    if result.reused:
        lines = [f"{result.analysis}: reused {where} (same parameters; --recompute to redo)"]
    elif result.replaced:
        lines = [f"{result.analysis}: rewrote {where} (same parameters, --recompute)"]
    else:
        lines = [f"{result.analysis}: wrote {where}"]
    if result.kept:
        lines.append(
            f"  kept {len(result.kept)} earlier result(s) of {result.name!r} "
            "(other parameters; --replace deletes them):"
        )
        lines += [f"    {base}/{group}" for group in result.kept]
    lines += [f"  removed {base}/{group} (--replace)" for group in result.removed]
    summary = result.attrs.get("summary")
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
    (:func:`vitcnn_store.interface.plots.figure_dir`). Each figure is stamped with
    the result it shows (:func:`vitcnn_store.interface.plots.result_stamp`): a reused
    result whose figure carries its stamp is not redrawn (nor loaded, nor matplotlib
    imported), and ``vitcnn report`` keeps the figure too.
    """
    entry = ANALYSES[analysis]
    result = entry.run(config)
    path = None
    if figure and entry.draws_figure:
        from vitcnn_store.interface.plots import figure_dir, figure_is_current, result_stamp

        path = figure_dir(result.store.url, figures) / f"{result.run}__{result.name}.png"
        stamp = result_stamp(result.group, result.digest, str(result.attrs.get("computed_at", "")))
        if not (result.reused and figure_is_current(path, stamp)):
            from vitcnn_store.interface.plots import save_result_figure

            path = save_result_figure(
                result.dataset, result.store.url, result.run, result.name, figures, stamp=stamp
            )
    return result, path


def cmd_analyze(args: argparse.Namespace) -> int:
    """Run the chosen analysis job, draw its figure, print where both went."""
    from jobs.analyze import AnalysisWarning

    config = analysis_config(args)  # bad values are refused here, before any job loads

    def show(message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        print(f"vitcnn analyze {args.analysis}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", AnalysisWarning)
        warnings.showwarning = show
        result, figure = analyze(args.analysis, config, figure=args.figure, figures=args.figures)
    print(describe_result(result, figure))
    return 0
