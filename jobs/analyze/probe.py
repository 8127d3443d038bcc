"""Linear probes per layer (paper App. A): closed-form ridge onto {−1, 1} targets.

Per layer, features are the CLS token (``cls``; layers without one fall back
to ``gap``, recorded per layer) or the mean over patch tokens / spatial
positions (``gap``), computed lazily by dask as (image, channel) — never the
whole layer — and handed to one task per layer that scores
:func:`~vitcnn_store.analysis.probes.linear_probe_accuracy` on each split.
Splits come from :func:`~vitcnn_store.analysis.probes.probe_splits`:
``shots = k`` draws k training images per class, ``shots = 0`` (full) is a
stratified train/test split. Both are deterministic given ``seed``; with
``repeats`` the seeds are ``seed, seed + 1, ...`` and the result holds the mean
and standard deviation of the accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.executor import Executor
from jobs.analyze.layers import layer_info, reduce_layer, select_layers
from jobs.analyze.options import AnalysisOptions
from jobs.analyze.pipeline import AnalysisResult, run_analysis
from jobs.analyze.runs import open_runs, usable_mask
from vitcnn_store.analysis.probes import linear_probe_accuracy, probe_splits
from vitcnn_store.errors import UsageError
from vitcnn_store.store.schema import string_coord

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["FEATURES", "ProbeConfig", "run_probe"]

FEATURES = ("cls", "gap")


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(AnalysisOptions):
    """Options of ``vitcnn analyze probe``: ``shots`` per class (0 = full split with
    ``test_fraction`` held out), ``features`` cls|gap, ridge ``l2``, ``repeats`` seeds."""

    shots: int = 0
    features: str = "cls"
    seed: int = 0
    l2: float = 1e-3
    repeats: int = 1
    test_fraction: float = 0.25
    layers: str | None = None

    def validate(self) -> None:
        if self.shots < 0:
            raise UsageError(f"--shots must be >= 0 (0 = full), got {self.shots}")
        if self.features not in FEATURES:
            raise UsageError(f"--features must be one of {', '.join(FEATURES)}")
        if self.repeats < 1:
            raise UsageError(f"--repeats must be >= 1, got {self.repeats}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UsageError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.l2 < 0:
            raise UsageError(f"--l2 must be >= 0, got {self.l2}")


def _splits(cfg: ProbeConfig, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    try:
        return probe_splits(labels, cfg.shots, cfg.seed, cfg.repeats, cfg.test_fraction)
    except ValueError as e:  # too few images of some class
        raise UsageError(f"--shots {cfg.shots}: {e}" if cfg.shots else str(e)) from None


def _probe_layer(
    features: Any,
    labels: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    n_classes: int,
    l2: float,
) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    return np.array(
        [
            linear_probe_accuracy(
                x[train], labels[train], x[test], labels[test], l2=l2, n_classes=n_classes
            )
            for train, test in splits
        ]
    )


def run_probe(cfg: ProbeConfig) -> AnalysisResult:
    """Compute (or reuse) linear-probe accuracy of every (selected) layer.

    The result (``<run>/_analyses/probe``) holds ``accuracy`` (layer) and, with
    repeats, ``accuracy_std`` and ``accuracy_repeats`` (repeat, layer).
    """
    cfg.validate()
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
    splits = _splits(cfg, labels)
    layers = select_layers(run, cfg.layers)
    reduced = [reduce_layer(run[name], cfg.features, cls_fallback=True) for name in layers]

    def compute(executor: Executor) -> xr.Dataset:
        from dask import delayed

        tasks = [
            delayed(_probe_layer, pure=True)(feat[rows], labels, splits, n_classes, cfg.l2)
            for feat, _ in reduced
        ]
        accs = np.full((cfg.repeats, len(layers)), np.nan)
        for i, acc in executor.imap(tasks, desc=f"probe {cfg.run}"):
            accs[:, i] = acc
        return _dataset(cfg, run, layers, [how for _, how in reduced], accs, splits, n_classes)

    return run_analysis(
        cfg,
        analysis="probe",
        default_name="probe",
        sources=[(run, mask)],
        compute=compute,
        extra_parameters={"layers": layers},
    )


def _dataset(
    cfg: ProbeConfig,
    run: Any,
    layers: list[str],
    feats: list[str],
    accs: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    n_classes: int,
) -> xr.Dataset:
    import xarray as xr

    infos = [layer_info(run[name]) for name in layers]
    data: dict[str, Any] = {"accuracy": (("layer",), accs.mean(axis=0))}
    if cfg.repeats > 1:
        data["accuracy_std"] = (("layer",), accs.std(axis=0, ddof=1))
        data["accuracy_repeats"] = (("repeat", "layer"), accs)
    ds = xr.Dataset(
        data,
        coords={
            "layer": string_coord(layers),
            "depth_fraction": ("layer", np.array([i.depth_fraction for i in infos])),
            "depth_index": ("layer", np.array([i.depth_index for i in infos])),
            "feature": ("layer", string_coord(feats)),
        },
    )
    ds["accuracy"].attrs["long_name"] = "test accuracy of a ridge probe"
    names = [str(v) for v in run.attrs.get("label_names") or []]
    best = int(np.nanargmax(ds["accuracy"].values))
    ds.attrs.update(
        shots=cfg.shots,
        split="few-shot (k per class)" if cfg.shots else f"stratified, test {cfg.test_fraction}",
        features=cfg.features,
        features_note="cls falls back to gap for layers without a CLS token (see `feature`)",
        l2=cfg.l2,
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
            f"{len(splits[0][1])} test); best {layers[best]} {ds['accuracy'].values[best]:.3f}"
        ),
    )
    return ds
