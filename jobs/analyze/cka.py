"""CKA between every layer of a run and every layer of the same or another run, Gram-first.

1. **Checks before any work**: options, runs, usable images, the pairing of two
   runs' images by ``image_id``, layers (the residual stream by default,
   :mod:`jobs.analyze.depth`), reductions, batches.
2. **The Gram cache**: each layer's n × n linear Gram over its run's usable
   images is reused from ``<run>/_grams`` or computed in one pass over the
   stored chunks (:mod:`jobs.analyze.grams`). No estimator reads activations.
3. **One pass over the Gram tiles** (:mod:`jobs.analyze.cka_tiles`) adds up every
   batch's HSIC sums for every layer pair, and cuts out the whole batch Grams
   of the permutation null (and, for the RBF kernel, of every batch).

Estimators (docs/science.md): ``unbiased-minibatch`` (the paper's: sums of
HSIC₁ over equal batches sampled without replacement, one ratio at the end,
the remainder dropped; repeated with fresh samples), ``unbiased`` (HSIC₁ over
all the images at once) and ``biased`` (HSIC₀ over all the images). The result
records every batch (repeat × batch × member → image index and id) and the
**null**: the same estimate with the second side's images randomly permuted,
i.e. the CKA of unrelated images under the same protocol.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.cka_tiles import GramSide, TilePass, run_tile_pass
from jobs.analyze.depth import block_depth, layer_role_names, select_by_role
from jobs.analyze.executor import Executor
from jobs.analyze.grams import ensure_grams
from jobs.analyze.layers import layer_attrs, reduce_layer
from jobs.analyze.options import ESTIMATORS, KERNELS, AnalysisWarning, CKAConfig, cap_batch_size
from jobs.analyze.pipeline import AnalysisResult, run_analysis
from jobs.analyze.protocol import cka_protocol
from jobs.analyze.runs import align_images, open_runs, usable_mask
from vitcnn_store.analysis.bootstrap import null_percentile
from vitcnn_store.analysis.cka import (
    ConstantRepresentationWarning,
    MinibatchCKAMatrix,
    cka_matrix_from_grams,
    sample_batches,
)
from vitcnn_store.analysis.gram import rbf_from_linear_gram
from vitcnn_store.analysis.tiles import BatchLayout, GatheredGrams
from vitcnn_store.errors import DamagedDataError, UsageError
from vitcnn_store.store.grams import (
    GramInfo,
    delete_grams,
    gram_layer,
    source_states,
)
from vitcnn_store.store.reader import Run
from vitcnn_store.store.schema import string_coord

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["ESTIMATORS", "KERNELS", "NULL_BYTES", "CKAConfig", "run_cka"]

NULL_BYTES = 2**30  # batch Grams the null holds at once (both sides); sets its default size
_NULL_SEED = 0x6E756C6C  # "null": the permutation's stream, apart from the batches'


@dataclass
class _Plan:
    """Everything decided before any work."""

    run_a: Run
    run_b: Run  # run_a itself within a run
    mask_a: np.ndarray
    mask_b: np.ndarray
    layers_a: list[str]
    layers_b: list[str]
    idx_a: np.ndarray  # per position: image index in run_a
    idx_b: np.ndarray  # per position: image index in run_b
    batches: list[list[np.ndarray]]  # positions, per repeat and batch
    null_a: list[np.ndarray] = field(default_factory=list)  # positions, per null batch
    null_b: list[np.ndarray] = field(default_factory=list)
    # Per permutation k >= 1 and null batch: a reordering of that batch's side-b members
    # (k = 0, the identity, is the null of one permutation).
    null_perms: list[list[np.ndarray]] = field(default_factory=list)
    states_a: dict[str, dict[str, Any]] = field(default_factory=dict)  # per layer of run_a
    states_b: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def cross(self) -> bool:
        return self.run_b is not self.run_a

    @property
    def same_layers(self) -> bool:
        return not self.cross and self.layers_a == self.layers_b

    @property
    def n(self) -> int:
        return int(self.idx_a.size)

    @property
    def batch(self) -> int:
        return int(self.batches[0][0].size)


def _plan(cfg: CKAConfig) -> _Plan:
    names = [cfg.run] if cfg.run2 is None else [cfg.run, cfg.run2]
    # The unit records key the Gram cache (source_states): read with the other progress.
    runs = open_runs(cfg.store, names, ("done", "failed", "unit_record", "image_id"))
    run_a = runs[0]
    run_b = runs[-1]
    mask_a = usable_mask(run_a, cfg.allow_incomplete)
    layers_a, _ = select_by_role(run_a, cfg.layers, cfg.roles)
    if run_b is run_a:
        mask_b = mask_a
        idx_a = idx_b = np.flatnonzero(mask_a)
        layers_b = (
            select_by_role(run_a, cfg.layers2, cfg.roles, "--layers2")[0]
            if cfg.layers2
            else layers_a
        )
    else:
        mask_b = usable_mask(run_b, cfg.allow_incomplete)
        idx_a, idx_b = align_images(run_a, mask_a, run_b, mask_b)
        layers_b, _ = select_by_role(run_b, cfg.layers2, cfg.roles, "--layers2")
    n = int(idx_a.size)
    if cfg.full_sample:
        need = 4 if cfg.estimator == "unbiased" else 2
        if n < need:
            raise UsageError(
                f"the {cfg.estimator} estimator needs at least {need} usable images, got {n}"
            )
        batches = [[np.arange(n)]]
    else:
        batch = cap_batch_size(cfg.batch_size, n)
        batches = sample_batches(n, batch, cfg.repeats, cfg.seed, cfg.max_batches)
    plan = _Plan(run_a, run_b, mask_a, mask_b, layers_a, layers_b, idx_a, idx_b, batches)
    _plan_null(cfg, plan)
    wanted_a = layers_a + ([] if plan.cross else layers_b)
    plan.states_a = source_states(run_a, wanted_a, mask_a)
    plan.states_b = plan.states_a if not plan.cross else source_states(run_b, layers_b, mask_b)
    return plan


def _check_reductions(cfg: CKAConfig, plan: _Plan) -> None:
    """A bad ``--reduce`` for some layer fails before any work (not needed to reuse:
    the layers are opened only here and in the computation)."""
    if cfg.reduce == "flatten":
        # Every layer flattens as stored: nothing to check, and opening the layers would
        # read their token coordinates (three requests a token layer on object storage).
        return
    for run, layers in ((plan.run_a, plan.layers_a), (plan.run_b, plan.layers_b)):
        run.prefetch(layers)  # the coordinates of these layers only, in one round
        for layer in layers:
            reduce_layer(run[layer], cfg.reduce)


def _plan_null(cfg: CKAConfig, plan: _Plan) -> None:
    """The null's batches: side a as the first repeat's, side b randomly permuted."""
    if cfg.null_batches == 0:
        return
    per_batch = (len(plan.layers_a) + len(plan.layers_b)) * 8
    rng = np.random.default_rng((cfg.seed, _NULL_SEED))
    perm = rng.permutation(plan.n)
    m = plan.batch
    if cfg.full_sample:
        # One batch of all images, unless its two Grams per layer would not fit.
        m = min(plan.n, max(4, int((NULL_BYTES / per_batch) ** 0.5)))
        firsts = [np.sort(rng.permutation(plan.n)[:m])] if m < plan.n else [np.arange(plan.n)]
    else:
        firsts = list(plan.batches[0])
    fit = max(1, NULL_BYTES // (per_batch * m * m))
    count = min(len(firsts), fit if cfg.null_batches is None else cfg.null_batches)
    if cfg.null_batches is not None and cfg.null_batches > len(firsts):
        warnings.warn(
            f"--null-batches {cfg.null_batches} is more than the {len(firsts)} batch(es) of "
            f"one repeat: using {len(firsts)}",
            AnalysisWarning,
            stacklevel=3,
        )
    plan.null_a = firsts[:count]
    plan.null_b = [perm[b] for b in plan.null_a]
    # More permutations reorder each gathered side-b batch Gram's rows and columns: a
    # fresh random pairing of the same images, with no further pass over the cache.
    plan.null_perms = [
        [
            np.random.default_rng((cfg.seed, _NULL_SEED, k, g)).permutation(b.size)
            for g, b in enumerate(plan.null_a)
        ]
        for k in range(1, cfg.null_permutations)
    ]


# -- computing ----------------------------------------------------------------------------


def _transform(grams: np.ndarray, cfg: CKAConfig, layers: list[str]) -> list[np.ndarray]:
    if cfg.kernel != "rbf":
        return list(grams)
    out = []
    for g, layer in zip(grams, layers, strict=True):
        try:
            out.append(rbf_from_linear_gram(g, cfg.rbf_threshold))
        except ValueError:
            raise UsageError(
                f"layer {layer!r} is constant over a batch: the RBF bandwidth is undefined "
                "(use --kernel linear)"
            ) from None
    return out


def _from_gathered(
    cfg: CKAConfig,
    plan: _Plan,
    ga: GatheredGrams,
    gb: GatheredGrams,
    groups: list[list[int]],
    perms: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """CKA of each group of gathered batches (one group per repeat); ``perms`` reorders
    the side-b Grams of the i-th member of each group (an image permutation is a
    permutation of a Gram's rows and columns, and commutes with the RBF transform)."""

    def side_b(g: int, i: int) -> list[np.ndarray]:
        grams = _transform(gb.grams(g), cfg, plan.layers_b)
        if perms is None:
            return grams
        p = perms[i]
        return [k[np.ix_(p, p)] for k in grams]

    out = []
    for group in groups:
        if cfg.estimator == "biased":
            (g,) = group
            grams_a = _transform(ga.grams(g), cfg, plan.layers_a)
            out.append(cka_matrix_from_grams(grams_a, side_b(g, 0)))
            continue
        acc = MinibatchCKAMatrix()
        for i, g in enumerate(group):
            acc.update_grams(_transform(ga.grams(g), cfg, plan.layers_a), side_b(g, i))
        out.append(acc.result(warn=False))
    return out


def _null(
    cfg: CKAConfig, plan: _Plan, ga: GatheredGrams, gb: GatheredGrams, first: int
) -> list[np.ndarray]:
    """The null of every permutation (the gathered null batches start at ``first``)."""
    group = [first + i for i in range(len(plan.null_a))]
    out = _from_gathered(cfg, plan, ga, gb, [group])
    for perms in plan.null_perms:
        out += _from_gathered(cfg, plan, ga, gb, [group], perms)
    return out


def _sides(plan: _Plan, grams_a: dict[str, GramInfo], grams_b: dict[str, GramInfo]) -> Any:
    side_a = GramSide(tuple(grams_a[n] for n in plan.layers_a), plan.idx_a)
    if plan.same_layers:
        return side_a, None
    source = grams_b if plan.cross else grams_a
    return side_a, GramSide(tuple(source[n] for n in plan.layers_b), plan.idx_b)


def _compute(cfg: CKAConfig, plan: _Plan, executor: Executor) -> tuple[Any, ...]:
    """Grams, then the tile pass; a damaged Gram (the cache, not the run) is dropped and
    computed again from the activations, once."""
    try:
        return _compute_once(cfg, plan, executor)
    except DamagedDataError as e:
        layer = gram_layer(e.layer or "")
        if layer is None or e.run is None:
            raise
        warnings.warn(
            f"the Gram cache of {e.run}/{layer} is damaged: computing it again",
            AnalysisWarning,
            stacklevel=3,
        )
        delete_grams(plan.run_a.store, e.run, layer)
        return _compute_once(cfg, plan, executor)


def _compute_once(cfg: CKAConfig, plan: _Plan, executor: Executor) -> tuple[Any, ...]:
    label = f"cka {cfg.run}" + (f" × {cfg.run2}" if cfg.run2 else "")
    opts: dict[str, Any] = {"tile": cfg.gram_tile, "dtype": cfg.gram_dtype, "label": "grams"}
    wanted_a = list(dict.fromkeys(plan.layers_a + ([] if plan.cross else plan.layers_b)))
    infos, computed = ensure_grams(
        executor, plan.run_a, wanted_a, cfg.reduce, plan.mask_a, plan.states_a, **opts
    )
    grams_a = dict(zip(wanted_a, infos, strict=True))
    grams_b: dict[str, GramInfo] = {}
    if plan.cross:
        infos_b, computed_b = ensure_grams(
            executor,
            plan.run_b,
            plan.layers_b,
            cfg.reduce,
            plan.mask_b,
            plan.states_b,
            **opts,
        )
        grams_b = dict(zip(plan.layers_b, infos_b, strict=True))
        computed = [f"{plan.run_a.name}/{n}" for n in computed] + [
            f"{plan.run_b.name}/{n}" for n in computed_b
        ]
    else:
        computed = [f"{plan.run_a.name}/{n}" for n in computed]
    side_a, side_b = _sides(plan, grams_a, grams_b)
    null: list[np.ndarray] | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantRepresentationWarning)
        if cfg.kernel == "linear":
            job = TilePass(
                side_a,
                side_b,
                BatchLayout.from_batches(plan.n, plan.batches),
                unbiased=cfg.estimator != "biased",
                requests_a=plan.null_a,
                requests_b=plan.null_b,
            )
            acc, ga, gb = run_tile_pass(executor, job, desc=label)
            assert acc is not None
            per_repeat = list(acc.result(warn=False))
            if ga is not None and gb is not None:
                null = _null(cfg, plan, ga, gb, 0)
        else:
            per_repeat, null = _compute_rbf(cfg, plan, executor, side_a, side_b, label)
    return (
        per_repeat,
        null,
        computed,
        [grams_a[n].path for n in plan.layers_a]
        + [(grams_b if plan.cross else grams_a)[n].path for n in plan.layers_b],
    )


def _compute_rbf(
    cfg: CKAConfig,
    plan: _Plan,
    executor: Executor,
    side_a: GramSide,
    side_b: GramSide | None,
    label: str,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """RBF needs each batch Gram whole (its bandwidth is a median): gather them, in as
    many passes over the tiles as ``gather_bytes`` requires."""
    flat = [(r, j) for r in range(len(plan.batches)) for j in range(len(plan.batches[r]))]
    per = (len(plan.layers_a) + len(plan.layers_b)) * 8 * plan.batch**2
    if per > cfg.gather_bytes:
        raise UsageError(
            f"the RBF kernel needs each batch's Grams whole: {per / 2**30:.1f} GiB per batch, "
            f"over --gather-memory ({cfg.gather_bytes / 2**30:.1f} GiB); raise it, or use "
            "smaller batches or --kernel linear"
        )
    per_round = max(1, cfg.gather_bytes // per)
    accs = [MinibatchCKAMatrix() for _ in plan.batches]
    biased: list[np.ndarray] = []
    null: list[np.ndarray] | None = None
    for start in range(0, len(flat), per_round):
        chunk = flat[start : start + per_round]
        first = start == 0
        requests = [plan.batches[r][j] for r, j in chunk]
        extra_a = plan.null_a if first else []
        extra_b = plan.null_b if first else []
        job = TilePass(
            side_a, side_b, None, requests_a=requests + extra_a, requests_b=requests + extra_b
        )
        _, ga, gb = run_tile_pass(executor, job, desc=f"{label} (rbf {start // per_round + 1})")
        assert ga is not None and gb is not None
        for k, (r, _) in enumerate(chunk):
            if cfg.estimator == "biased":
                biased += _from_gathered(cfg, plan, ga, gb, [[k]])
            else:
                acc = accs[r]
                acc.update_grams(
                    _transform(ga.grams(k), cfg, plan.layers_a),
                    _transform(gb.grams(k), cfg, plan.layers_b),
                )
        if first and plan.null_a:
            null = _null(cfg, plan, ga, gb, len(chunk))
    if cfg.estimator == "biased":
        return biased, null
    return [acc.result(warn=False) for acc in accs], null


def run_cka(cfg: CKAConfig) -> AnalysisResult:
    """Compute (or reuse) the all-pairs CKA matrix and write it to the store.

    The result (``<run>/_analyses/cka`` or ``cka__<run2>``) holds ``cka``
    (layer_a, layer_b), with repeats ``cka_std`` and ``cka_repeats``, the null
    ``cka_null`` (with ``--null-permutations K``, K >= 2: ``cka_null_permutations``
    (permutation, layer_a, layer_b) and ``cka_percentile``), and the batches
    (``batch_image``, ``batch_image_id``, and for two runs ``batch_image_b``; the
    null's ``null_image_a``/``null_image_b``).
    """
    plan = _plan(cfg)
    states = {f"{plan.run_a.name}/{k}": v["digest"] for k, v in plan.states_a.items()}
    states.update({f"{plan.run_b.name}/{k}": v["digest"] for k, v in plan.states_b.items()})

    def compute(executor: Executor) -> xr.Dataset:
        per_repeat, null, computed, paths = _compute(cfg, plan, executor)
        ds = _dataset(cfg, plan, per_repeat, null)
        ds.attrs.update(grams=paths, grams_computed=computed)
        _warn_constant(ds)
        return ds

    return run_analysis(
        cfg,
        analysis="cka",
        default_name="cka" if cfg.run2 is None else f"cka__{cfg.run2}",
        sources=[(plan.run_a, plan.mask_a)] + ([(plan.run_b, plan.mask_b)] if plan.cross else []),
        compute=compute,
        prepare=lambda: _check_reductions(cfg, plan),
        # The layers' source states: a rewritten unit changes the result, not only the Gram.
        extra_parameters={
            "layers_a": plan.layers_a,
            "layers_b": plan.layers_b,
            "source_states": states,
        },
    )


def _warn_constant(ds: xr.Dataset) -> None:
    cka = np.asarray(ds["cka"].values)
    names_a = [str(v) for v in ds["layer_a"].values]
    names_b = [str(v) for v in ds["layer_b"].values]
    dead = [names_a[i] for i in range(len(names_a)) if np.isnan(cka[i]).all()]
    dead += [names_b[j] for j in range(len(names_b)) if np.isnan(cka[:, j]).all()]
    dead = list(dict.fromkeys(dead))
    if dead:
        warnings.warn(
            f"layer(s) {', '.join(dead)} constant over the images: their CKA is NaN "
            f"(centred Gram below 1e-10 of its trace)",
            AnalysisWarning,
            stacklevel=4,
        )


def _dataset(
    cfg: CKAConfig, plan: _Plan, per_repeat: list[np.ndarray], nulls: list[np.ndarray] | None
) -> xr.Dataset:
    import xarray as xr

    null = None if nulls is None else nulls[0]

    def axis(run: Run, layers: list[str]) -> dict[str, Any]:
        # From the layers' attributes (the run's metadata): opening a layer would read
        # its coordinates, which no axis needs.
        attrs = [layer_attrs(run, name) for name in layers]
        return {
            "depth": block_depth(run, layers)[0],
            "depth_fraction": np.array([float(a.get("depth_fraction", np.nan)) for a in attrs]),
            "depth_index": np.array([int(a.get("depth_index", -1)) for a in attrs]),
            "role": string_coord(layer_role_names(run, layers)),
        }

    ax_a, ax_b = axis(plan.run_a, plan.layers_a), axis(plan.run_b, plan.layers_b)
    stack = np.stack(per_repeat)
    dims = ("layer_a", "layer_b")
    data: dict[str, Any] = {"cka": (dims, stack.mean(axis=0))}
    if len(per_repeat) > 1:
        data["cka_std"] = (dims, stack.std(axis=0, ddof=1))
        data["cka_repeats"] = (("repeat", *dims), stack)
    members = np.asarray(plan.batches)  # (repeat, batch, member) positions
    data["batch_image"] = (("repeat", "batch", "member"), plan.idx_a[members])
    data["batch_image_id"] = (
        ("repeat", "batch", "member"),
        string_coord(plan.run_a.image_ids[plan.idx_a[members]].ravel()).reshape(members.shape),
    )
    if plan.cross:
        data["batch_image_b"] = (("repeat", "batch", "member"), plan.idx_b[members])
    if null is not None:
        data["cka_null"] = (dims, null)
        data["null_image_a"] = (("null_batch", "null_member"), plan.idx_a[np.asarray(plan.null_a)])
        data["null_image_b"] = (("null_batch", "null_member"), plan.idx_b[np.asarray(plan.null_b)])
        if nulls is not None and len(nulls) > 1:
            null_dims = ("permutation", *dims)
            data["cka_null_permutations"] = (null_dims, np.stack(nulls))
            data["cka_percentile"] = (dims, null_percentile(data["cka"][1], np.stack(nulls)))
            order = [np.asarray(plan.null_b)] + [
                np.stack([b[p] for b, p in zip(plan.null_b, perms, strict=True)])
                for perms in plan.null_perms
            ]
            data["null_permutation_image_b"] = (
                ("permutation", "null_batch", "null_member"),
                plan.idx_b[np.stack(order)],
            )
    coords: dict[str, Any] = {
        "layer_a": string_coord(plan.layers_a),
        "layer_b": string_coord(plan.layers_b),
    }
    for key in ax_a:
        coords[f"{key}_a"] = ("layer_a", ax_a[key])
        coords[f"{key}_b"] = ("layer_b", ax_b[key])
    ds = xr.Dataset(data, coords=coords)
    _label(ds, cfg, plan, null)
    return ds


def _label(ds: xr.Dataset, cfg: CKAConfig, plan: _Plan, null: np.ndarray | None) -> None:
    repeats, n_batches, batch = len(plan.batches), len(plan.batches[0]), plan.batch
    ds["cka"].attrs["long_name"] = "CKA (mean over repeats)" if repeats > 1 else "CKA"
    if "cka_std" in ds:
        ds["cka_std"].attrs["long_name"] = "standard deviation over repeats (ddof=1)"
    for side in ("a", "b"):
        ds[f"depth_{side}"].attrs["long_name"] = (
            "fraction of the residual stream: stem 0, last stored block output 1"
        )
    ds["batch_image"].attrs["long_name"] = f"image index in run {plan.run_a.name!r} of each member"
    if "batch_image_b" in ds:
        ds["batch_image_b"].attrs["long_name"] = f"image index in run {plan.run_b.name!r}"
    if null is not None:
        ds["cka_null"].attrs["long_name"] = (
            "null: the same estimate with the second side's images randomly permuted"
        )
        ds["null_image_b"].attrs["long_name"] = "image paired with null_image_a on the second side"
    if "cka_percentile" in ds:
        k = ds.sizes["permutation"]
        ds["cka_null_permutations"].attrs["long_name"] = (
            f"null distribution: the same estimate under {k} random pairings of the images "
            "(permutation 0 is cka_null)"
        )
        ds["cka_percentile"].attrs["long_name"] = (
            f"percentile of cka among the {k} permutations (ties count half; 100: above all)"
        )
        ds["null_permutation_image_b"].attrs["long_name"] = (
            "image paired with null_image_a on the second side, per permutation"
        )
    hsic = {
        "biased": "biased HSIC0 tr(KHLH)/(n-1)^2 over all images",
        "unbiased": "unbiased HSIC1 (Song et al. 2012) over all images",
        "unbiased-minibatch": "unbiased HSIC1 (Song et al. 2012) summed over batches",
    }[cfg.estimator]
    null_note = "no null"
    if null is not None:
        null_note = (
            f"null {np.nanmean(null):.3f} (max {np.nanmax(np.abs(null)):.3f}) over "
            f"{len(plan.null_a)} permuted batch(es) of {plan.null_a[0].size}"
            if np.isfinite(null).any()
            else "null NaN"
        )
    attrs: dict[str, Any] = dict(
        estimator=cfg.estimator,
        hsic=hsic,
        kernel=cfg.kernel,
        rbf_threshold=cfg.rbf_threshold if cfg.kernel == "rbf" else None,
        reduce=cfg.reduce,
        roles=cfg.roles if not (cfg.layers or cfg.layers2) else "as given by --layers",
        n=plan.n,
        batch_size=batch,
        batch_size_requested=None if cfg.full_sample else cfg.batch_size,
        n_batches=n_batches,
        images_used=n_batches * batch,
        repeats=repeats,
        seed=None if cfg.full_sample else cfg.seed,
        null_batches=len(plan.null_a),
        null_permutations=1 + len(plan.null_perms) if plan.null_a else 0,
        null_batch_size=int(plan.null_a[0].size) if plan.null_a else 0,
        null_seed=[cfg.seed, _NULL_SEED],
        gram_dtype=cfg.gram_dtype,
        gram_accumulation="float64",
        run_a=plan.run_a.name,
        run_b=plan.run_b.name,
    )
    attrs["summary"] = (
        f"{plan.run_a.name} × {plan.run_b.name}: {len(plan.layers_a)}×{len(plan.layers_b)} "
        f"layers, {cka_protocol(attrs)}; {null_note}"
    )
    ds.attrs.update(attrs)
