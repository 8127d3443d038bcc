"""The option table of every analysis job, and the batch-size policy.

Each config dataclass declares its options once with
:func:`vitcnn_store.options.option` (flag, help, parser, choices, bounds):
``vitcnn analyze`` builds its argparse options from these tables, and
:meth:`AnalysisOptions.validate` (run on construction) refuses bad values
with the same words whether the config came from the CLI or from Python.
The text parsers (``--tokens``, ``--shots full``, ``--l2 auto``, lists, MiB)
live here beside the fields that use them; they only convert text, the
bounds are the table's.

This module is light (no dask, xarray or zarr) so the CLI can build its
parser from it without loading the jobs.

Examples
--------
>>> ProbeConfig(store="acts.zarr", run="vit", cv_folds=1)
Traceback (most recent call last):
...
vitcnn_store.errors.UsageError: --cv-folds must be >= 2, got 1
"""

from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from vitcnn_store.defaults import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_L2_GRID,
    DEFAULT_LEVEL,
    MIN_HSIC_SAMPLES,
)
from vitcnn_store.errors import UsageError
from vitcnn_store.options import check_options, option, resolve_aliases
from vitcnn_store.store.layout import (
    FEATURE_ALIASES,
    FEATURE_REDUCTIONS,
    GRAM_DTYPES,
    check_name,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ESTIMATORS",
    "EXECUTION_OPTIONS",
    "FEATURES",
    "GROUPINGS",
    "KERNELS",
    "ROLE_SETS",
    "AnalysisOptions",
    "AnalysisWarning",
    "AttentionConfig",
    "BootstrapOptions",
    "CKAConfig",
    "HeadsConfig",
    "LocalizationConfig",
    "ProbeConfig",
    "SkipConfig",
    "TokenSpec",
    "TopImagesConfig",
    "cap_batch_size",
    "parse_l2",
    "parse_mebibytes",
    "parse_numbers",
    "parse_shots",
    "parse_tokens",
]

# Options that change how a result is computed, never what it is: left out of the
# parameter dict compared for reuse.
EXECUTION_OPTIONS = frozenset(
    {
        "store",
        "recompute",
        "replace",
        "dask_address",
        "threads",
        "progress",
        "gram_tile",
        "gather_bytes",
    }
)
ESTIMATORS = ("unbiased-minibatch", "biased", "unbiased")
KERNELS = ("linear", "rbf")
FEATURES = ("auto", "cls", "gap")
#: ``--groups`` of probes: which images a split keeps together.
GROUPINGS = ("auto", "parent", "none")
#: A batch's size check: the unbiased HSIC₁ (every batched estimate here) needs 4 images.
_AT_LEAST_BATCH = f"at least {MIN_HSIC_SAMPLES[True]}"

#: Layer selections of the analyses drawn along depth (:func:`jobs.analyze.depth.select_by_role`).
ROLE_SETS = ("stream", "branches", "all")
# A target token: a grid position (row, col) or a flat patch index (row-major).
TokenSpec = tuple[int, int] | int
#: ``--batch-size`` of CKA and localization when not given (the paper's minibatch).
DEFAULT_BATCH_SIZE = 1024


# The sampling options, declared once: the analyses that sample images share them.
def _batch_size() -> Any:
    return option(
        DEFAULT_BATCH_SIZE,
        flag="--batch-size",
        parse=int,
        check=_AT_LEAST_BATCH,
        help="images per batch, capped to the usable images",
    )


def _max_batches(help: str) -> Any:
    return option(
        None,
        flag="--batches",
        parse=int,
        check="positive",
        metavar="N",
        help=f"{help} (default: every full batch)",
    )


def _seed(help: str = "sampling seed") -> Any:
    return option(0, flag="--seed", parse=int, check="non-negative", help=help)


def parse_mebibytes(text: str) -> int:
    """``--gather-memory``: MiB as text → bytes.

    Examples
    --------
    >>> parse_mebibytes("2")
    2097152
    """
    try:
        return int(text) * 2**20
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer (MiB), got {text!r}") from None


def parse_l2(text: str) -> float | None:
    """``--l2``: ``auto`` (None: chosen by cross-validation) or a number.

    Examples
    --------
    >>> parse_l2("auto"), parse_l2("0.5")
    (None, 0.5)
    """
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def parse_numbers(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers (``--l2-grid``).

    Examples
    --------
    >>> parse_numbers("0.1, 1,")
    (0.1, 1.0)
    """
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def parse_shots(text: str) -> int:
    """``--shots``: training images per class, or ``full`` (0: a stratified split).

    Examples
    --------
    >>> parse_shots("full"), parse_shots("10")
    (0, 10)
    """
    if text.strip().lower() == "full":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or full, got {text!r}") from None


def parse_tokens(text: str) -> tuple[TokenSpec, ...]:
    """``--tokens``: grid positions ``row:col`` or flat patch indices, comma-separated.

    Ranges are checked by the job against the layer's grid.

    Examples
    --------
    >>> parse_tokens("0:1, 5")
    ((0, 1), 5)
    """
    out: list[TokenSpec] = []
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


class AnalysisWarning(UserWarning):
    """A job adjusted an option (e.g. capped the batch size); the CLI prints one line."""


@dataclass(frozen=True, kw_only=True)
class AnalysisOptions:
    """Options every analysis job takes (see ``vitcnn analyze --help``).

    Parameters
    ----------
    store, run : str
        Store URL and run name (the result is written under this run).
    name : str or None
        Result name under ``<run>/_analyses/``; each job has a default.
    recompute : bool
        Recompute even when a result with the same parameters is stored (and
        rewrite that result).
    replace : bool
        Delete the name's results with other parameters once this one is
        written (by default they are kept beside it).
    allow_incomplete : bool
        Use the written units of an unfinished run (the result says so).
    dask_address : str or None
        ``tcp://...`` of a dask scheduler; ``None`` runs on local threads.
    threads : int or None
        Local thread count (default: one per core).
    progress : bool
        Show a progress bar on stderr.

    Examples
    --------
    >>> AnalysisOptions(store="acts.zarr", run="vit", threads=2).parameters()
    {'run': 'vit', 'name': None, 'allow_incomplete': False}
    """

    store: str  # the positionals of the CLI, typed by hand there
    run: str
    name: str | None = option(
        None,
        flag="--name",
        parse=str,
        help="result name under <run>/_analyses/ (default: the analysis)",
    )
    recompute: bool = option(
        False,
        flag="--recompute",
        action="true",
        help="recompute even if a result with the same parameters is stored (rewriting it)",
    )
    replace: bool = option(
        False,
        flag="--replace",
        action="true",
        help="delete this name's results with other parameters once the new one is written "
        "(default: keep them)",
    )
    allow_incomplete: bool = option(
        False,
        flag="--allow-incomplete",
        action="true",
        help="analyse the written units of an unfinished run (recorded in the result)",
    )
    dask_address: str | None = option(
        None,
        flag="--dask-address",
        parse=str,
        metavar="tcp://HOST:PORT",
        help="dask scheduler to run on (default: local threads)",
    )
    threads: int | None = option(
        None,
        flag="--threads",
        parse=int,
        check="positive",
        help="local threads (default: all cores)",
    )
    progress: bool = option(True, flag="--no-progress", action="false", help="no progress bar")

    def __post_init__(self) -> None:
        resolve_aliases(self)  # --reduce mean is stored as gap
        self.validate()

    def validate(self) -> None:
        """Refuse what the option table forbids; subclasses add checks across fields."""
        check_options(self)

    def parameters(self) -> dict[str, Any]:
        """The options that define the result (compared to decide on reuse)."""
        return {k: v for k, v in asdict(self).items() if k not in EXECUTION_OPTIONS}


_ROLES_HELP = (
    "layers without --layers: the residual stream (stem and block outputs), plus "
    "branch outputs, or every stored layer"
)


@dataclass(frozen=True, kw_only=True)
class CKAConfig(AnalysisOptions):
    """Options of ``vitcnn analyze cka`` (see its ``--help``).

    ``run2`` compares ``run`` with another run (result ``cka__<run2>``);
    ``layers``/``layers2`` pick layers with glob patterns (``layers2`` defaults
    to ``layers`` within a run, to the same roles of ``run2`` across runs);
    without patterns ``roles`` picks them: ``stream`` (default), ``branches``
    or ``all``. ``max_batches`` caps the batches per repeat. ``null_batches``
    sizes the permutation null (default: one repeat's batches, within
    :data:`jobs.analyze.cka.NULL_BYTES`; 0: none); ``null_permutations`` draws
    that many pairings of the null's images (K >= 2: a distribution and each
    value's percentile against it). ``gram_dtype`` stores the
    Gram cache in float64 (default) or float32. ``gram_tile`` (images per Gram
    tile) and ``gather_bytes`` (memory for whole batch Grams, RBF only) change
    how the result is computed, never what it is.
    """

    run2: str | None = None  # the optional positional RUN2 of the CLI
    estimator: str = option(
        "unbiased-minibatch",
        flag="--estimator",
        choices=ESTIMATORS,
        help="unbiased HSIC1 summed over minibatches (the paper's), biased HSIC over all "
        "images, or unbiased HSIC1 over all images",
    )
    batch_size: int = _batch_size()
    repeats: int = option(
        1,
        flag="--repeats",
        parse=int,
        check="positive",
        help="fresh samplings, averaged (std reported)",
    )
    max_batches: int | None = _max_batches("at most N batches per repeat")
    seed: int = _seed()
    reduce: str = option(
        "flatten",
        flag="--reduce",
        choices=FEATURE_REDUCTIONS,
        aliases=FEATURE_ALIASES,
        help="flatten tokens x channels, gap: the token/spatial mean (also spelled mean), "
        "or cls: the CLS token",
    )
    kernel: str = option("linear", flag="--kernel", choices=KERNELS, help="the CKA kernel")
    rbf_threshold: float = option(
        1.0,
        flag="--rbf-threshold",
        parse=float,
        check="positive",
        help="RBF bandwidth as a fraction of the median distance",
    )
    layers: str | None = option(
        None, flag="--layers", parse=str, metavar="PATTERNS", help="pick the first run's layers"
    )
    layers2: str | None = option(
        None,
        flag="--layers2",
        parse=str,
        metavar="PATTERNS",
        help="pick the second side's layers (default: --layers within a run, the same "
        "roles of RUN2 across runs)",
    )
    roles: str = option("stream", flag="--roles", choices=ROLE_SETS, help=_ROLES_HELP)
    null_batches: int | None = option(
        None,
        flag="--null-batches",
        parse=int,
        check="non-negative",
        metavar="K",
        help="batches of the permutation null (default: one repeat's, within 1 GiB of batch "
        "Grams; 0: no null)",
    )
    null_permutations: int = option(
        1,
        flag="--null-permutations",
        parse=int,
        check="positive",
        metavar="K",
        help="permutations of the null: K >= 2 stores the null distribution (a permutation "
        "dimension) and each CKA value's percentile against it",
    )
    gram_dtype: str = option(
        "float64",
        flag="--gram-dtype",
        choices=GRAM_DTYPES,
        help="storage of the Gram cache (always accumulated in float64; float32 halves it "
        "and changes CKA by ~1e-10, benchmarks/cka_gram_precision.py)",
    )
    gram_tile: int | None = option(
        None,
        flag="--gram-tile",
        parse=int,
        check="positive",
        metavar="N",
        help="images per Gram tile when computing the cache (default 512, whole units)",
    )
    gather_bytes: int = option(
        2 * 2**30,
        flag="--gather-memory",
        parse=parse_mebibytes,
        check="positive",
        metavar="MIB",
        shown="2048 MiB",
        note=" bytes (the flag takes MiB)",
        help="memory for whole batch Grams of the RBF kernel",
    )

    def validate(self) -> None:
        super().validate()
        if self.run2 is not None:
            check_name(self.run2)
        if self.null_batches == 0 and self.null_permutations > 1:
            raise UsageError(
                f"--null-permutations {self.null_permutations} with --null-batches 0: "
                "there is no null to permute"
            )

    @property
    def full_sample(self) -> bool:
        return self.estimator != "unbiased-minibatch"


@dataclass(frozen=True, kw_only=True)
class BootstrapOptions(AnalysisOptions):
    """Options of the analyses with bootstrap intervals over images (attention,
    localization, skip, probe): ``bootstrap`` resamples (0: no interval) and the
    interval's coverage ``ci_level``; the resamples are drawn from the analysis's
    ``--seed`` where it has one, else from 0."""

    bootstrap: int = option(
        DEFAULT_BOOTSTRAP,
        flag="--bootstrap",
        parse=int,
        check="non-negative",
        metavar="N",
        help="bootstrap resamples of the images for the intervals (0: none)",
    )
    ci_level: float = option(
        DEFAULT_LEVEL,
        flag="--ci-level",
        parse=float,
        check="fraction",
        help="coverage of the percentile bootstrap intervals",
    )


@dataclass(frozen=True, kw_only=True)
class AttentionConfig(BootstrapOptions):
    """Options of ``vitcnn analyze attention``: ``renormalize`` rows over patch keys
    (default: the mass on CLS and registers is dropped, not rescaled; the result
    reports it per head as ``cls_key_mass`` either way, and records the choice);
    ``layers`` restricts the attention modules with glob patterns."""

    renormalize: bool = option(
        False,
        flag="--renormalize",
        action="true",
        help="rescale rows to sum to 1 over patch keys after dropping prefix tokens "
        "(default: drop the CLS-key mass without rescaling, as the reference code)",
    )
    layers: str | None = option(
        None, flag="--layers", parse=str, metavar="PATTERNS", help="restrict the attention layers"
    )


@dataclass(frozen=True, kw_only=True)
class LocalizationConfig(BootstrapOptions):
    """Options of ``vitcnn analyze localization``.

    ``layer`` defaults to the last stored block output; ``tokens`` lists grid
    positions ``(row, col)`` or flat patch indices ``k`` (row-major), and
    defaults to :func:`jobs.analyze.localization.default_targets`.
    """

    layer: str | None = option(
        None, flag="--layer", parse=str, help="layer (default: the last stored block)"
    )
    tokens: tuple[TokenSpec, ...] | None = option(
        None,
        flag="--tokens",
        parse=parse_tokens,
        metavar="LIST",
        help="grid positions row:col or flat patch indices, comma-separated "
        "(default: 4-5 spread over the grid)",
    )
    batch_size: int = _batch_size()
    seed: int = _seed()


@dataclass(frozen=True, kw_only=True)
class SkipConfig(BootstrapOptions):
    """Options of ``vitcnn analyze skip`` (the common ones only)."""


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(BootstrapOptions):
    """Options of ``vitcnn analyze probe``.

    ``shots`` per class (0 = full split with ``test_fraction`` held out);
    ``features`` auto|cls|gap; ridge ``l2`` (None: chosen by ``cv_folds``-fold
    cross-validation over ``l2_grid``); ``repeats`` splits from ``seed``;
    ``layers`` patterns (default: the residual stream; ``roles`` as in
    :func:`~jobs.analyze.depth.select_by_role`); ``groups`` keeps groups of
    images (the crops of one photograph) on one side of every split and fold.
    """

    shots: int = option(
        0,
        flag="--shots",
        parse=parse_shots,
        check="non-negative",
        metavar="K|full",
        shown="full",
        note=" (0 or full: a stratified split)",
        help="training images per class; full: a stratified split",
    )
    features: str = option(
        "auto",
        flag="--features",
        choices=FEATURES,
        aliases=FEATURE_ALIASES,
        help="auto: the CLS token where a layer has one that varies between images, else "
        "the token/spatial mean, recorded per layer with the reason; cls: the CLS token "
        "(layers without one are refused); gap: the token/spatial mean, also spelled mean",
    )
    seed: int = _seed("split (and fold) seed")
    l2: float | None = option(
        None,
        flag="--l2",
        parse=parse_l2,
        check="non-negative",
        metavar="auto|VALUE",
        help="ridge penalty: auto (default) chooses it per layer by "
        "cross-validation over --l2-grid; a number fixes it",
    )
    l2_grid: tuple[float, ...] = option(
        DEFAULT_L2_GRID,
        flag="--l2-grid",
        parse=parse_numbers,
        check="positive",
        metavar="LIST",
        shown="1e-3 to 1e5 in half decades",
        help="penalties tried by cross-validation, comma-separated",
    )
    cv_folds: int = option(
        5,
        flag="--cv-folds",
        parse=int,
        check="at least 2",
        metavar="K",
        help="stratified folds of the training split (capped at the smallest class count)",
    )
    repeats: int = option(1, flag="--repeats", parse=int, check="positive", help="splits, averaged")
    test_fraction: float = option(
        0.25,
        flag="--test-fraction",
        parse=float,
        check="fraction",
        help="held-out share of each class for --shots full",
    )
    layers: str | None = option(
        None,
        flag="--layers",
        parse=str,
        metavar="PATTERNS",
        help="layers by pattern (default: the residual stream, one point per block)",
    )
    roles: str = option("stream", flag="--roles", choices=ROLE_SETS, help=_ROLES_HELP)
    groups: str = option(
        "auto",
        flag="--groups",
        choices=GROUPINGS,
        help="images that must stay on one side of every split and fold: auto (the crops "
        "of one photograph of builtin:photos, else none), parent (the image_id's folder), "
        "none",
    )

    def validate(self) -> None:
        super().validate()
        if self.l2 is None and self.shots == 1:
            raise UsageError(
                "--shots 1 leaves one training image per class: nothing to cross-validate "
                "the ridge penalty on; give --l2 VALUE (e.g. --l2 1.0) or use --shots >= 2"
            )


@dataclass(frozen=True, kw_only=True)
class HeadsConfig(AnalysisOptions):
    """Options of ``vitcnn analyze heads`` (per-head CKA against mean attention distance).

    ``run`` holds the per-head outputs (``--attention-heads``) and the attention
    (``--attention``); ``run2`` the network compared with (images paired by
    ``image_id``); ``layers`` picks head layers, ``layers2`` the second run's
    layers (default: its residual stream up to half depth).
    """

    run2: str = ""  # the positional RUN2 of the CLI (required)
    layers: str | None = option(
        None,
        flag="--layers",
        parse=str,
        metavar="PATTERNS",
        help="head layers by pattern (default: every <attention module>.norm stored by "
        "--attention-heads)",
    )
    layers2: str | None = option(
        None,
        flag="--layers2",
        parse=str,
        metavar="PATTERNS",
        help="layers of RUN2 (default: its residual stream up to half depth)",
    )
    batch_size: int = _batch_size()
    max_batches: int | None = _max_batches("at most N batches")
    seed: int = _seed()

    def validate(self) -> None:
        super().validate()
        if not self.run2:
            raise UsageError("heads compares two runs: give RUN2 (the CNN)")
        check_name(self.run2)


@dataclass(frozen=True, kw_only=True)
class TopImagesConfig(AnalysisOptions):
    """Options of ``vitcnn analyze top-images``: ``k`` images per channel of every layer
    matching ``layers`` (default: every stored layer), ranked by the channel's maximum
    over positions (:mod:`vitcnn_store.analysis.top_images`)."""

    layers: str | None = option(
        None,
        flag="--layers",
        parse=str,
        metavar="PATTERNS",
        help="layers by pattern (default: every stored layer)",
    )
    k: int = option(
        16,
        flag="--k",
        parse=int,
        check="positive",
        help="images kept per channel (capped to the usable images)",
    )


def cap_batch_size(requested: int, n: int, what: str = "--batch-size") -> int:
    """The batch size to use: ``requested`` capped to ``n`` (with a warning), at least 4.

    The unbiased HSIC₁ needs 4 images per batch; a batch larger than the usable
    images is shrunk to all of them and :class:`AnalysisWarning` says so, in
    words that do not claim the user asked for :data:`DEFAULT_BATCH_SIZE`.

    Examples
    --------
    >>> cap_batch_size(16, 40)
    16
    """
    least = MIN_HSIC_SAMPLES[True]
    if requested < least:
        raise UsageError(f"{what} must be >= {least} for the unbiased estimator, got {requested}")
    if n < least:
        raise UsageError(f"the unbiased estimator needs at least {least} usable images, got {n}")
    if requested > n:
        given = (
            f"the default batch size {requested}"
            if requested == DEFAULT_BATCH_SIZE
            else f"{what} {requested}"
        )
        warnings.warn(
            f"{given} is more than the {n} usable images: using {n}",
            AnalysisWarning,
            stacklevel=2,
        )
        return n
    return requested
