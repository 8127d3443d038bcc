"""Checks a referee would make before reading a figure: identical layers, CKA of one.

Random-init networks produce figures with structure that says nothing about
learned representations, and some of it is plain arithmetic: timm
initialises the last BatchNorm of every ResNet residual branch to zero
(``zero_init_last``), so at random init a block adds nothing to its skip path
and the blocks of a stage repeat their input bit for bit; a CKA matrix then
shows blocks of exactly 1. These functions find such artifacts in a run and
in stored results so the report can name them next to the figures.

:func:`identical_layers` compares stored activations (the first work unit of
the run, so the check reads a bounded amount whatever the run's size);
:func:`cka_one_blocks` reads a stored within-run CKA result;
:func:`dead_branches` reads a stored skip result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.store.schema import as_str_array

if TYPE_CHECKING:
    import xarray as xr

    from vitcnn_store.store.reader import Run

__all__ = [
    "ZERO_INIT_LAST",
    "Finding",
    "cka_one_blocks",
    "dead_branches",
    "identical_layers",
    "run_findings",
    "zero_layers",
]

CKA_ONE = 0.9999  # off-diagonal CKA at or above this reads as "the same representation"


@dataclass(frozen=True)
class Finding:
    """An artifact found in a run: what, where, and the likely cause ("" if unknown)."""

    run: str
    kind: str  # "identical-layers" | "zero-layers" | "cka-one" | "dead-branches"
    layers: tuple[str, ...]
    message: str
    cause: str = ""


ZERO_INIT_LAST = (
    "timm zero-initialises the last BatchNorm of every ResNet residual branch "
    "(zero_init_last=True): at random init each block adds 0 to its skip path, so the "
    "blocks of a stage repeat their input bit for bit (flat depth curves, CKA exactly 1) "
    "and the skip ratio ‖z‖/‖f(z)‖ is undefined. Trained weights, or "
    "--model-arg zero_init_last=False, do not have this."
)


def _first_rows(run: Run, mask: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the usable images of the run's first work unit (at most ``limit``)."""
    chunk = int(run.attrs.get("chunk_size") or limit)
    rows = np.flatnonzero(mask)
    return rows[rows < rows[0] + min(chunk, limit)] if rows.size else rows


def _compare(run: Run, limit: int) -> tuple[list[tuple[str, ...]], list[str]]:
    """Groups of identical layers, and the layers that are exactly zero."""
    rows = _first_rows(run, np.asarray(run.valid, dtype=bool), limit)
    if not rows.size:
        return [], []
    by_key: dict[tuple[Any, ...], list[str]] = {}
    zeros = []
    for name in run.layers:
        x = run[name]
        values = np.ascontiguousarray(x.data[rows[0] : rows[-1] + 1].compute())
        values = values[rows - rows[0]]
        if not np.any(values):  # all zero (NaN is not zero): no identity to speak of
            zeros.append(name)
            continue
        digest = hashlib.sha256(values.tobytes()).hexdigest()
        by_key.setdefault((x.shape[1:], str(values.dtype), digest), []).append(name)
    return [tuple(group) for group in by_key.values() if len(group) > 1], zeros


def identical_layers(run: Run, *, limit: int = 64) -> list[tuple[str, ...]]:
    """Groups of stored layers whose activations are bitwise identical, in forward order.

    Compared on the usable images of the run's first work unit (at most
    ``limit``): layers of one shape are hashed (sha256 of their stored bytes)
    and equal hashes grouped; layers that are exactly zero are left out (see
    :func:`zero_layers`). One stored chunk per layer is read.

    Examples
    --------
    >>> identical_layers(store["resnet"])  # doctest: +SKIP
    [('layer1.0', 'layer1.1', 'layer1.2'), ...]
    """
    return _compare(run, limit)[0]


def zero_layers(run: Run, *, limit: int = 64) -> list[str]:
    """Stored layers that are exactly zero on the images :func:`identical_layers` reads."""
    return _compare(run, limit)[1]


def _random_resnet(run: Run) -> bool:
    args = run.attrs.get("model_args") or {}
    return (
        run.attrs.get("model_family") == "resnet"
        and run.attrs.get("weights_source") == "random-init"
        and args.get("zero_init_last", True) is not False
    )


def cka_one_blocks(ds: xr.Dataset, threshold: float = CKA_ONE) -> list[tuple[str, ...]]:
    """Groups of distinct layers whose within-run CKA is at least ``threshold``.

    Layers are grouped by connected components of the pairs at or above the
    threshold (off the diagonal). Cross-run results give nothing.
    """
    if ds.attrs.get("run_a") != ds.attrs.get("run_b") or "cka" not in ds:
        return []
    cka = np.asarray(ds["cka"].values, dtype=float)
    names = list(as_str_array(ds["layer_a"].values))
    if list(as_str_array(ds["layer_b"].values)) != names:
        return []
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    with np.errstate(invalid="ignore"):
        high = np.argwhere(np.nan_to_num(cka, nan=0.0) >= threshold)
    for i, j in high:
        if i != j:
            parent[root(int(i))] = root(int(j))
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(root(i), []).append(name)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def dead_branches(ds: xr.Dataset) -> list[str]:
    """Branch outputs of a stored skip result that are exactly zero on every image."""
    if "dead_fraction" not in ds:
        return []
    dead = np.asarray(ds["dead_fraction"].values, dtype=float) == 1.0
    taps = np.asarray(ds["branch_tap"].values)
    return [str(t) for t in taps[dead].ravel().tolist()]


def run_findings(run: Run, results: Sequence[xr.Dataset] = (), *, limit: int = 64) -> list[Finding]:
    """Every artifact found in ``run`` and in its stored ``results`` (CKA, skip)."""
    rows = _first_rows(run, np.asarray(run.valid, dtype=bool), limit)
    zero_init = ZERO_INIT_LAST if _random_resnet(run) else ""
    compared = f"bitwise-identical activations on the {rows.size} images compared"
    groups, zeros = _compare(run, limit)
    out = [
        Finding(run.name, "identical-layers", group, f"{' = '.join(group)}: {compared}", zero_init)
        for group in groups
    ]
    named_dead = {
        t for ds in results if ds.attrs.get("analysis") == "skip" for t in dead_branches(ds)
    }
    if zeros and not set(zeros) <= named_dead:  # dead branches are named with the skip result
        more = f" (+{len(zeros) - 4} more)" if len(zeros) > 4 else ""
        out.append(
            Finding(
                run.name,
                "zero-layers",
                tuple(zeros),
                (
                    f"{len(zeros)} layer(s) exactly 0 on the {rows.size} images compared: "
                    f"{', '.join(zeros[:4])}{more}"
                ),
                zero_init,
            )
        )
    named = {frozenset(f.layers) for f in out}
    for ds in results:
        kind = ds.attrs.get("analysis")
        if kind == "cka":
            for group in cka_one_blocks(ds):
                if frozenset(group) in named:
                    continue  # already explained by identical activations
                out.append(
                    Finding(
                        run.name,
                        "cka-one",
                        group,
                        (
                            f"CKA ≥ {CKA_ONE} between {', '.join(group)}: one representation up to "
                            "rotation and scale, shown as a block of 1 in the CKA figure"
                        ),
                    )
                )
        elif kind == "skip" and (dead := dead_branches(ds)):
            extra = f" (+{len(dead) - 4} more)" if len(dead) > 4 else ""
            out.append(
                Finding(
                    run.name,
                    "dead-branches",
                    tuple(dead),
                    (
                        f"{len(dead)} residual branch(es) output exactly 0 on every image: "
                        f"{', '.join(dead[:4])}{extra}; their skip ratio is undefined and not drawn"
                    ),
                    zero_init,
                )
            )
    return out
