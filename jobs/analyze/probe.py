"""Linear probes per layer (paper App. A): closed-form ridge onto {−1, 1} targets.

Which layers: the residual stream by default (the stem and every block
output, from the roles recorded at extraction), branch outputs on request,
or any stored layers by pattern (:func:`~jobs.analyze.depth.select_by_role`);
each gets a normalized depth by block so ViT and ResNet curves share an axis
(:func:`~jobs.analyze.depth.block_depth`).

Which features: ``cls`` (the CLS token; a layer without one is refused),
``gap`` (the mean over patch tokens or spatial positions) or ``auto`` (CLS
where the layer has one that varies between images, else the mean). The
feature used and the reason are recorded per layer — never a silent
fallback. Features are reduced lazily by dask to (image, channel) and handed
to one task per layer.

Which penalty: chosen per layer and split by stratified k-fold
cross-validation on the training split over a grid
(:func:`~vitcnn_store.analysis.probes.ridge_probe`), or fixed with ``l2``;
the choice and the validation curve are stored. Splits come from
:func:`~vitcnn_store.analysis.probes.probe_splits`: ``shots = k`` draws k
training images per class, ``shots = 0`` (full) is a stratified train/test
split. With ``repeats`` the seeds are ``seed, seed + 1, ...`` and the result
holds the mean and standard deviation of the accuracy. Chance is the largest
class share of each test split.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.depth import block_depth, layer_role_names, select_by_role
from jobs.analyze.executor import Executor
from jobs.analyze.layers import layer_info, reduce_layer
from jobs.analyze.options import FEATURES, ProbeConfig
from jobs.analyze.pipeline import AnalysisResult, run_analysis
from jobs.analyze.runs import open_runs, usable_mask
from vitcnn_store.analysis.probes import (
    chance_accuracy,
    probe_splits,
    ridge_probe,
)
from vitcnn_store.errors import UsageError
from vitcnn_store.store import schema
from vitcnn_store.store.schema import string_coord

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["FEATURES", "ProbeConfig", "run_probe"]

_CONSTANT_CLS = (
    "CLS token identical on every image (it has attended to no patch yet): patch-token mean"
)


_PHOTO_CROP = re.compile(r"^photos/([^/]+)/\d+$")  # builtin:photos (vitcnn_store/data/builtin.py)


def image_groups(cfg: ProbeConfig, image_ids: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Each image's group (or None: every image its own) and how it was chosen.

    Examples
    --------
    >>> cfg = ProbeConfig(store="s", run="r")
    >>> image_groups(cfg, np.array(["photos/coffee/00", "photos/coffee/01", "photos/cat/00"]))
    (array(['coffee', 'coffee', 'cat'], dtype='<U6'), 'source photograph (builtin:photos crops)')
    """
    ids = [str(i) for i in image_ids]
    if cfg.groups == "none":
        return None, "none: every image on its own"
    if cfg.groups == "parent":
        return np.array([i.rsplit("/", 1)[0] if "/" in i else i for i in ids]), "image_id folder"
    matches = [_PHOTO_CROP.match(i) for i in ids]
    if ids and all(matches):
        return (
            np.array([m.group(1) for m in matches if m]),
            "source photograph (builtin:photos crops)",
        )
    return None, "none: every image on its own (auto: not builtin:photos crops)"


def _splits(
    cfg: ProbeConfig, labels: np.ndarray, groups: np.ndarray | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    try:
        return probe_splits(labels, cfg.shots, cfg.seed, cfg.repeats, cfg.test_fraction, groups)
    except ValueError as e:  # too few images (or groups) of some class
        hint = (
            "; the labels name the groups themselves (e.g. builtin:photos: label = "
            "photograph), so a probe would measure instance identity; --groups none "
            "allows it anyway"
            if groups is not None
            else ""
        )
        raise UsageError((f"--shots {cfg.shots}: {e}" if cfg.shots else str(e)) + hint) from None


def _no_cls_reason(kind: str) -> str:
    return {
        schema.KIND_SPATIAL: "spatial map, no CLS token: mean over positions",
        schema.KIND_POOLED: "pooled vector, no tokens: used as it is",
    }.get(kind, "no CLS token: mean over patch tokens")


def _plan_features(cfg: ProbeConfig, run: Any, layers: list[str]) -> list[tuple[Any, Any, str]]:
    """Per layer: lazy CLS features (or None), lazy mean features (or None), and the reason
    for the choice made before any data is read."""
    out: list[tuple[Any, Any, str]] = []
    missing = []
    for name in layers:
        x = run[name]
        info = layer_info(x)
        if cfg.features == "cls" and info.cls_index is None:
            missing.append(f"{name} ({info.kind})")
            continue
        has_cls = info.cls_index is not None
        cls = reduce_layer(x, "cls")[0] if cfg.features != "gap" and has_cls else None
        gap = reduce_layer(x, "gap")[0] if cfg.features != "cls" else None
        if cfg.features == "gap":
            reason = "requested (--features gap)" + (
                "" if info.kind == schema.KIND_TOKEN else f"; {_no_cls_reason(info.kind)}"
            )
        elif cfg.features == "cls":
            reason = "requested (--features cls)"
        elif cls is None:
            reason = _no_cls_reason(info.kind)
        else:
            reason = "CLS token (the layer has one)"
        out.append((cls, gap, reason))
    if missing:
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        raise UsageError(
            f"--features cls: layers without a CLS token: {', '.join(missing[:4])}{more}; "
            "use --features auto (CLS where a layer has one, else the mean, recorded per "
            "layer) or gap, or pick token layers with --layers"
        )
    return out


def _probe_layer(
    joined: np.ndarray,
    cls_width: int | None,
    reason: str,
    labels: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    cfg: ProbeConfig,
    n_classes: int,
    groups: np.ndarray | None = None,
) -> tuple[str, str, np.ndarray, np.ndarray, np.ndarray | None, int, list[Any]]:
    """One layer: the feature used and why, then per split the test accuracy, the
    penalty and (with cross-validation) the validation accuracy per grid value, the
    number of folds, and the fits (per test image correct, per training image fold)."""
    joined = np.asarray(joined, dtype=np.float64)
    cls = None if cls_width is None else joined[:, :cls_width]
    rest = joined if cls_width is None else joined[:, cls_width:]
    gap = rest if rest.shape[1] else None
    feature = "cls" if cls is not None else "gap"
    x = np.asarray(cls if cls is not None else gap, dtype=np.float64)
    # A CLS token identical on every image carries no information about the image.
    constant = cls is not None and bool(np.all(np.ptp(x, axis=0) == 0.0))
    if cfg.features == "auto" and constant and gap is not None:
        feature, reason, x = "gap", _CONSTANT_CLS, np.asarray(gap, dtype=np.float64)
    fits = [
        ridge_probe(
            x[tr],
            labels[tr],
            x[te],
            labels[te],
            n_classes=n_classes,
            l2=cfg.l2,
            l2_grid=cfg.l2_grid,
            cv_folds=cfg.cv_folds,
            seed=cfg.seed + r,
            groups=None if groups is None else groups[tr],
        )
        for r, (tr, te) in enumerate(splits)
    ]
    cv = [f.cv_accuracy for f in fits]
    return (
        feature,
        reason,
        np.array([f.accuracy for f in fits]),
        np.array([f.l2 for f in fits]),
        None if cv[0] is None else np.stack([c for c in cv if c is not None]),
        min(f.cv_folds for f in fits),
        [(f.correct, f.folds) for f in fits],
    )


def _joined(cls: Any, gap: Any, rows: np.ndarray) -> tuple[Any, int | None]:
    """The chosen rows of a layer's CLS and mean features as one lazy array, and the
    width of its CLS part (None without one): two arrays handed to one task would
    each read the layer's chunks."""
    import dask.array as da

    parts = [f.astype(np.float64) for f in (cls, gap) if f is not None]
    joined = parts[0] if len(parts) == 1 else da.concatenate(parts, axis=1)
    return joined[rows], (None if cls is None else int(cls.shape[1]))


def run_probe(cfg: ProbeConfig) -> AnalysisResult:
    """Compute (or reuse) linear-probe accuracy of every chosen layer.

    The result (``<run>/_analyses/probe``) holds ``accuracy`` (layer),
    ``l2`` (repeat, layer), ``chance_accuracy`` and, with cross-validation,
    ``cv_accuracy`` (layer, l2_grid); with repeats also ``accuracy_std`` and
    ``accuracy_repeats`` (repeat, layer); the splits (``train_image``,
    ``test_image``, ``cv_fold``); with a stored input the raw-pixel baseline
    ``input_accuracy``; with ``bootstrap`` the intervals ``*_lo``/``*_hi``.
    """
    (run,) = open_runs(cfg.store, [cfg.run])
    mask = usable_mask(run, cfg.allow_incomplete)
    labels_all = np.asarray(run.labels, dtype=np.int64)
    if not (labels_all >= 0).any():
        raise UsageError(
            f"run {run.name!r} has no labels (all -1): probes need a labelled image set "
            "(a folder with one subfolder per class, or a manifest with a label column)"
        )
    rows = np.flatnonzero(mask & (labels_all >= 0))
    labels = labels_all[rows]
    n_classes = int(labels.max()) + 1
    if np.unique(labels).size < 2:
        raise UsageError(f"run {run.name!r} has a single labelled class: nothing to probe")
    groups, grouping = image_groups(cfg, run.image_ids[rows])
    splits = _splits(cfg, labels, groups)
    layers, selection = select_by_role(run, cfg.layers, cfg.roles)
    planned: list[Any] = []  # each layer's features, planned only to compute

    def prepare() -> None:
        planned.extend(_plan_features(cfg, run, layers))

    has_input = "input" in run.group

    def compute(executor: Executor) -> xr.Dataset:
        from dask import delayed

        probe = delayed(_probe_layer, pure=True)
        tasks = [
            probe(*_joined(cls, gap, rows), reason, labels, splits, cfg, n_classes, groups)
            for cls, gap, reason in planned
        ]
        if has_input:  # the raw-pixel baseline: the same probe on the stored input
            pixels = run.inputs.data
            flat = pixels.reshape(pixels.shape[0], -1).astype(np.float64)[rows]
            tasks.append(
                probe(flat, None, "stored input pixels", labels, splits, cfg, n_classes, groups)
            )
        out: list[Any] = [None] * len(tasks)
        for i, res in executor.imap(tasks, desc=f"probe {cfg.run}"):
            out[i] = res
        chance = [chance_accuracy(labels[test]) for _, test in splits]
        raw = out.pop() if has_input else None
        ds = _dataset(cfg, run, layers, selection, out, splits, chance, n_classes)
        _record_splits(ds, rows, splits, out[0][6], groups, grouping)
        _intervals(cfg, ds, out, raw)
        return ds

    return run_analysis(
        cfg,
        analysis="probe",
        default_name="probe",
        sources=[(run, mask)],
        compute=compute,
        prepare=prepare,
        extra_parameters={"layers": layers},
    )


def _padded(parts: list[np.ndarray], fill: int = -1) -> np.ndarray:
    width = max(p.size for p in parts)
    return np.stack([np.pad(p, (0, width - p.size), constant_values=fill) for p in parts])


def _record_splits(
    ds: xr.Dataset,
    rows: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    fits: list[Any],
    groups: np.ndarray | None,
    grouping: str,
) -> None:
    """Each repeat's training and test images (run image indices, -1 past the end) and
    each training image's cross-validation fold, as CKA records its batches."""
    ds["train_image"] = (("repeat", "train_member"), _padded([rows[tr] for tr, _ in splits]))
    ds["test_image"] = (("repeat", "test_member"), _padded([rows[te] for _, te in splits]))
    ds["train_image"].attrs["long_name"] = "image index in the run of each training image"
    ds["test_image"].attrs["long_name"] = "image index in the run of each test image"
    if fits[0][1] is not None:
        ds["cv_fold"] = (("repeat", "train_member"), _padded([f for _, f in fits]))
        ds["cv_fold"].attrs["long_name"] = "validation fold of each training image (-1: padding)"
    ds.attrs.update(
        groups=grouping,
        n_groups=0 if groups is None else int(np.unique(groups).size),
    )


def _intervals(cfg: ProbeConfig, ds: xr.Dataset, out: list[Any], raw: Any) -> None:
    """``accuracy_lo``/``_hi``: percentile bootstrap over test images (each repeat's test
    set resampled, the replicates averaged over repeats as the accuracy is); and the
    raw-pixel probe ``input_accuracy`` with its interval."""
    from vitcnn_store.analysis.bootstrap import bootstrap_means, percentile_interval

    def replicates(results: list[Any]) -> np.ndarray:
        reps = [
            bootstrap_means(
                np.stack([r[6][k][0] for r in results], axis=1),
                n_boot=cfg.bootstrap,
                seed=(cfg.seed, k),
            )
            for k in range(cfg.repeats)
        ]
        return np.mean(reps, axis=0)

    if raw is not None:
        ds["input_accuracy"] = ((), float(np.mean(raw[2])))
        ds["input_accuracy"].attrs["long_name"] = (
            "test accuracy of the same probe (same splits) on the flattened stored input "
            "pixels: the raw-pixel baseline"
        )
    if not cfg.bootstrap:
        return
    lo, hi = percentile_interval(replicates(out), cfg.ci_level)
    ds["accuracy_lo"], ds["accuracy_hi"] = ("layer", lo), ("layer", hi)
    if raw is not None:
        rlo, rhi = percentile_interval(replicates([raw]), cfg.ci_level)
        ds["input_accuracy_lo"], ds["input_accuracy_hi"] = ((), float(rlo[0])), ((), float(rhi[0]))
    for name in [v for v in ds.data_vars if str(v).endswith(("_lo", "_hi"))]:
        ds[name].attrs["long_name"] = (
            f"{'lower' if str(name).endswith('_lo') else 'upper'} end of the {cfg.ci_level:g} "
            f"percentile bootstrap interval over test images ({cfg.bootstrap} resamples)"
        )
    ds.attrs.update(
        ci_level=cfg.ci_level,
        bootstrap_resamples=cfg.bootstrap,
        bootstrap_seed=f"({cfg.seed}, repeat)",
    )


def _protocol(cfg: ProbeConfig, splits: list[tuple[np.ndarray, np.ndarray]]) -> str:
    n_train, n_test = len(splits[0][0]), len(splits[0][1])
    split = (
        f"{cfg.shots}-shot: {cfg.shots} training images per class, the rest tested"
        if cfg.shots
        else f"full: stratified split, {cfg.test_fraction:g} of each class held out"
    )
    return f"{split} ({n_train} train / {n_test} test, {cfg.repeats} split(s))"


def _dataset(
    cfg: ProbeConfig,
    run: Any,
    layers: list[str],
    selection: str,
    out: list[Any],
    splits: list[tuple[np.ndarray, np.ndarray]],
    chance: list[float],
    n_classes: int,
) -> xr.Dataset:
    import xarray as xr

    accs = np.stack([o[2] for o in out], axis=1)  # (repeat, layer)
    l2s = np.stack([o[3] for o in out], axis=1)
    depth, depth_axis = block_depth(run, layers)
    data: dict[str, Any] = {
        "accuracy": (("layer",), accs.mean(axis=0)),
        "l2": (("repeat", "layer"), l2s),
        "chance_accuracy": ((), float(np.mean(chance))),
    }
    if cfg.repeats > 1:
        data["accuracy_std"] = (("layer",), accs.std(axis=0, ddof=1))
        data["accuracy_repeats"] = (("repeat", "layer"), accs)
    coords: dict[str, Any] = {
        "layer": string_coord(layers),
        "depth_fraction": ("layer", depth),
        "depth_index": ("layer", np.array([layer_info(run[n]).depth_index for n in layers])),
        "role": ("layer", string_coord(layer_role_names(run, layers))),
        "feature": ("layer", string_coord(o[0] for o in out)),
        "feature_reason": ("layer", string_coord(o[1] for o in out)),
        "repeat": np.arange(cfg.repeats),
    }
    if cfg.l2 is None:
        data["cv_accuracy"] = (("layer", "l2_grid"), np.stack([o[4].mean(axis=0) for o in out]))
        coords["l2_grid"] = np.asarray(cfg.l2_grid, dtype=np.float64)
    ds = xr.Dataset(data, coords=coords)
    ds["accuracy"].attrs["long_name"] = "test accuracy of a ridge probe"
    ds["chance_accuracy"].attrs["long_name"] = "largest class share of the test split"
    ds["l2"].attrs["long_name"] = "ridge penalty used (chosen per layer and split)"
    ds["depth_fraction"].attrs["long_name"] = depth_axis
    if "cv_accuracy" in ds:
        ds["cv_accuracy"].attrs["long_name"] = "mean validation accuracy over the CV folds"
    names = [str(v) for v in run.attrs.get("label_names") or []]
    best = int(np.nanargmax(ds["accuracy"].values))
    grid = np.asarray(cfg.l2_grid, dtype=float)
    folds = min(o[5] for o in out)
    feats = ds["feature"].values.tolist()
    ds.attrs.update(
        shots=cfg.shots,
        protocol=_protocol(cfg, splits),
        split="few-shot (k per class)" if cfg.shots else f"stratified, test {cfg.test_fraction}",
        features=cfg.features,
        features_used=", ".join(f"{f} × {feats.count(f)}" for f in dict.fromkeys(feats)),
        l2_selection=(
            f"fixed at {cfg.l2:g}"
            if cfg.l2 is not None
            else f"per layer and split: stratified {folds}-fold cross-validation on the "
            f"training split over {grid.size} values {grid.min():g}…{grid.max():g} "
            "(mean validation accuracy; ties to the larger penalty), then refit"
        ),
        layer_selection=selection,
        depth_axis=depth_axis,
        chance=f"{float(np.mean(chance)):.3f} (largest class share of the test split)",
        seed=cfg.seed,
        repeats=cfg.repeats,
        n_classes=n_classes,
        label_names=names,
        n=int(sum(len(t) for t in splits[0])),
        n_train=len(splits[0][0]),
        n_test=len(splits[0][1]),
        targets="{-1, 1} one-hot, closed-form ridge on standardized features",
        summary=(
            f"{len(layers)} layers, {n_classes} classes, "
            f"{'full' if not cfg.shots else f'{cfg.shots}-shot'} ({len(splits[0][0])} train / "
            f"{len(splits[0][1])} test); best {layers[best]} {ds['accuracy'].values[best]:.3f} "
            f"(chance {float(np.mean(chance)):.3f})"
        ),
    )
    return ds
