"""CKA between every layer of a run and every layer of the same or another run.

One pass computes the whole (layer_a × layer_b) matrix: per batch, each
layer's Gram matrix is computed once (a dask task reading that layer's batch
rows and calling :func:`~vitcnn_store.analysis.gram.gram_linear`, which casts
float16 to float64 in feature blocks so memory stays at batch × block), and
the kernels turn the Grams into every pair's CKA terms with one matrix
product — never a Gram per pair. A layer is never loaded whole: a task holds
one batch of one layer.

Estimators (docs/science.md): ``unbiased-minibatch`` (sums of HSIC₁ over equal-size
batches sampled without replacement, one ratio at the end, remainder dropped;
repeated with fresh samples, mean and standard deviation reported) and
``biased`` (one batch of all usable images, biased HSIC; for small n).
Cross-run CKA pairs images by ``image_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.executor import Executor, LazyTasks
from jobs.analyze.layers import REDUCTIONS, layer_info, reduce_layer, select_layers
from jobs.analyze.options import AnalysisOptions, cap_batch_size
from jobs.analyze.pipeline import AnalysisResult, run_analysis
from jobs.analyze.runs import align_images, open_runs, usable_mask
from jobs.analyze.tasks import row_pieces, take_rows
from vitcnn_store.analysis.cka import MinibatchCKAMatrix, cka_matrix_from_grams, sample_batches
from vitcnn_store.analysis.gram import gram_linear, rbf_from_linear_gram
from vitcnn_store.errors import UsageError
from vitcnn_store.store.layout import check_name
from vitcnn_store.store.schema import string_coord

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["ESTIMATORS", "KERNELS", "CKAConfig", "layer_gram", "run_cka"]

ESTIMATORS = ("unbiased-minibatch", "biased")
KERNELS = ("linear", "rbf")


@dataclass(frozen=True, kw_only=True)
class CKAConfig(AnalysisOptions):
    """Options of ``vitcnn analyze cka`` (see its ``--help``).

    ``run2`` compares ``run`` with another run (result ``cka__<run2>``);
    ``layers``/``layers2`` restrict either side with glob patterns (``layers2``
    defaults to ``layers`` within a run, to every layer of ``run2`` across runs);
    ``max_batches`` caps the batches per repeat (default: all full batches);
    ``batches_per_round`` batches are computed as one dask graph, reading each
    stored chunk they share once (memory grows with it; results do not change).
    """

    run2: str | None = None
    estimator: str = "unbiased-minibatch"
    batch_size: int = 1024
    repeats: int = 1
    max_batches: int | None = None
    seed: int = 0
    reduce: str = "flatten"
    kernel: str = "linear"
    rbf_threshold: float = 1.0
    layers: str | None = None
    layers2: str | None = None
    batches_per_round: int = 1

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise UsageError(f"--estimator must be one of {', '.join(ESTIMATORS)}")
        if self.reduce not in REDUCTIONS:
            raise UsageError(f"--reduce must be one of {', '.join(REDUCTIONS)}")
        if self.kernel not in KERNELS:
            raise UsageError(f"--kernel must be one of {', '.join(KERNELS)}")
        if self.repeats < 1:
            raise UsageError(f"--repeats must be >= 1, got {self.repeats}")
        if self.max_batches is not None and self.max_batches < 1:
            raise UsageError(f"--batches must be >= 1, got {self.max_batches}")
        if self.batches_per_round < 1:
            raise UsageError(f"--batches-per-round must be >= 1, got {self.batches_per_round}")
        if not self.rbf_threshold > 0:
            raise UsageError(f"--rbf-threshold must be > 0, got {self.rbf_threshold}")
        if self.run2 is not None:
            check_name(self.run2)


# -- per-task functions (run on dask workers) ----------------------------------------


def layer_gram(
    x: Any, kernel: str = "linear", threshold: float = 1.0, layer: str = ""
) -> np.ndarray:
    """Gram matrix (b, b) in float64 of one batch of one layer.

    ``x`` is ``(pieces, perm)`` from :func:`~jobs.analyze.tasks.row_pieces`, or
    an array (b, ...). Stored values that are not finite, or a layer constant
    over the batch under the RBF kernel, are refused naming the layer.
    """
    if isinstance(x, tuple):
        x = take_rows(*x)
    gram = gram_linear(x)
    if not np.isfinite(gram).all():
        raise UsageError(f"layer {layer!r} has NaN/inf values among the usable images")
    if kernel != "rbf":
        return gram
    try:
        return rbf_from_linear_gram(gram, threshold)
    except ValueError:
        raise UsageError(
            f"layer {layer!r} is constant over a batch: the RBF bandwidth is undefined "
            "(use --kernel linear)"
        ) from None


def _unbiased_batch(grams_a: list[np.ndarray], grams_b: list[np.ndarray] | None) -> Any:
    acc = MinibatchCKAMatrix()
    acc.update_grams(grams_a, grams_b)
    return acc


def _biased_all(grams_a: list[np.ndarray], grams_b: list[np.ndarray] | None) -> np.ndarray:
    return cka_matrix_from_grams(grams_a, grams_b, unbiased=False)


# -- the job -------------------------------------------------------------------------


def _reduced(run: Any, layers: list[str], how: str) -> list[Any]:
    return [reduce_layer(run[layer], how)[0] for layer in layers]


def run_cka(cfg: CKAConfig) -> AnalysisResult:
    """Compute (or reuse) the all-pairs CKA matrix and write it to the store.

    The result (``<run>/_analyses/cka`` or ``cka__<run2>``) holds ``cka``
    (layer_a, layer_b), and with repeats ``cka_std`` and ``cka_repeats``.
    """
    cfg.validate()
    names = [cfg.run] if cfg.run2 is None else [cfg.run, cfg.run2]
    runs = open_runs(cfg.store, names)
    run_a = runs[0]
    run_b = runs[1] if len(runs) > 1 else None
    mask_a = usable_mask(run_a, cfg.allow_incomplete)
    layers_a = select_layers(run_a, cfg.layers)
    if run_b is None:
        mask_b = mask_a
        idx_a = idx_b = np.flatnonzero(mask_a)
        layers_b = select_layers(run_a, cfg.layers2, "--layers2") if cfg.layers2 else layers_a
    else:
        mask_b = usable_mask(run_b, cfg.allow_incomplete)
        idx_a, idx_b = align_images(run_a, mask_a, run_b, mask_b)
        layers_b = select_layers(run_b, cfg.layers2, "--layers2")
    src_b = run_b if run_b is not None else run_a
    same = run_b is None and layers_b == layers_a
    # Build the reductions now: a bad --reduce for some layer fails before any work.
    red_a = _reduced(run_a, layers_a, cfg.reduce)
    red_b = red_a if same else _reduced(src_b, layers_b, cfg.reduce)
    n = int(idx_a.size)
    if cfg.estimator == "biased":
        if n < 2:
            raise UsageError(f"the biased estimator needs at least 2 usable images, got {n}")
        batch, batches = n, [[np.arange(n)]]
    else:
        batch = cap_batch_size(cfg.batch_size, n)
        batches = sample_batches(n, batch, cfg.repeats, cfg.seed, cfg.max_batches)

    def compute(executor: Executor) -> xr.Dataset:
        flat = [(r, pos) for r, rep in enumerate(batches) for pos in rep]
        owner = [r for r, _ in flat]
        tasks = LazyTasks(
            len(flat),
            lambda i: _batch_task(
                cfg, red_a, red_b, layers_a, layers_b, same, idx_a[flat[i][1]], idx_b[flat[i][1]]
            ),
        )
        per_repeat = [np.full((len(layers_a), len(layers_b)), np.nan) for _ in batches]
        accs: list[Any] = [MinibatchCKAMatrix() for _ in batches]
        # A round of batches is one dask graph: a stored chunk that several of its batches
        # sample is read once. One batch per round keeps memory at batch × features per
        # layer (its layers already fill the threads); more trades memory for fewer reads.
        window = cfg.batches_per_round
        label = f"cka {cfg.run}" + (f" × {cfg.run2}" if cfg.run2 else "")
        for i, out in executor.imap(tasks, desc=label, window=window):
            if cfg.estimator == "biased":
                per_repeat[owner[i]] = out
            else:
                accs[owner[i]].merge(out)
        if cfg.estimator != "biased":
            per_repeat = [acc.result() for acc in accs]
        return _dataset(
            cfg, run_a, src_b, layers_a, layers_b, per_repeat, n, batch, len(batches[0])
        )

    return run_analysis(
        cfg,
        analysis="cka",
        default_name="cka" if run_b is None else f"cka__{cfg.run2}",
        sources=[(run_a, mask_a)] + ([] if run_b is None else [(run_b, mask_b)]),
        compute=compute,
        extra_parameters={"layers_a": layers_a, "layers_b": layers_b},
    )


def _batch_task(
    cfg: CKAConfig,
    red_a: list[Any],
    red_b: list[Any],
    layers_a: list[str],
    layers_b: list[str],
    same: bool,
    rows_a: np.ndarray,
    rows_b: np.ndarray,
) -> Any:
    from dask import delayed

    def grams(reduced: list[Any], layers: list[str], rows: np.ndarray) -> list[Any]:
        return [
            delayed(layer_gram, pure=True)(row_pieces(x, rows), cfg.kernel, cfg.rbf_threshold, name)
            for x, name in zip(reduced, layers, strict=True)
        ]

    grams_a = grams(red_a, layers_a, rows_a)
    grams_b = None if same else grams(red_b, layers_b, rows_b)
    combine = _biased_all if cfg.estimator == "biased" else _unbiased_batch
    return delayed(combine, pure=True)(grams_a, grams_b)


def _dataset(
    cfg: CKAConfig,
    run_a: Any,
    run_b: Any,
    layers_a: list[str],
    layers_b: list[str],
    per_repeat: list[np.ndarray],
    n: int,
    batch: int,
    n_batches: int,
) -> xr.Dataset:
    import xarray as xr

    def depth(run: Any, layers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        infos = [layer_info(run[name]) for name in layers]
        return (
            np.array([i.depth_fraction for i in infos]),
            np.array([i.depth_index for i in infos]),
        )

    frac_a, index_a = depth(run_a, layers_a)
    frac_b, index_b = depth(run_b, layers_b)
    stack = np.stack(per_repeat)
    dims = ("layer_a", "layer_b")
    data: dict[str, Any] = {"cka": (dims, stack.mean(axis=0))}
    if len(per_repeat) > 1:
        data["cka_std"] = (dims, stack.std(axis=0, ddof=1))
        data["cka_repeats"] = (("repeat", *dims), stack)
    biased = cfg.estimator == "biased"
    repeats = 1 if biased else cfg.repeats
    ds = xr.Dataset(
        data,
        coords={
            "layer_a": string_coord(layers_a),
            "layer_b": string_coord(layers_b),
            "depth_fraction_a": ("layer_a", frac_a),
            "depth_fraction_b": ("layer_b", frac_b),
            "depth_index_a": ("layer_a", index_a),
            "depth_index_b": ("layer_b", index_b),
        },
    )
    ds["cka"].attrs["long_name"] = "CKA (mean over repeats)" if repeats > 1 else "CKA"
    if "cka_std" in ds:
        ds["cka_std"].attrs["long_name"] = "standard deviation over repeats (ddof=1)"
    images = (
        "all usable images, one batch"
        if biased
        else (f"batch {batch} × {n_batches} per repeat, {repeats} repeat(s)")
    )
    ds.attrs.update(
        estimator=cfg.estimator,
        hsic="biased tr(KHLH)/(n-1)^2" if biased else "unbiased HSIC1 (Song et al. 2012)",
        kernel=cfg.kernel,
        rbf_threshold=cfg.rbf_threshold if cfg.kernel == "rbf" else None,
        reduce=cfg.reduce,
        n=n,
        batch_size=batch,
        batch_size_requested=None if biased else cfg.batch_size,
        n_batches=n_batches,
        images_used=n_batches * batch,
        repeats=repeats,
        seed=None if biased else cfg.seed,
        run_a=run_a.name,
        run_b=run_b.name,
        summary=(
            f"{run_a.name} × {run_b.name}: {len(layers_a)}×{len(layers_b)} layers, "
            f"{cfg.estimator}, {cfg.kernel} kernel, {cfg.reduce}, n={n} ({images})"
        ),
    )
    return ds
