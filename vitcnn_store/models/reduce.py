"""Reductions applied at extraction: keep the CLS token, the mean, or a K×K average pool.

``--reduce PATTERN=HOW`` stores, for the layers matching ``PATTERN``, a reduced
array instead of the full one (full-token stores of every ViT-B layer reach
tens of MB per image):

``cls``
    The CLS token of a token layer: ``(image, channel)``.
``mean``
    The mean over patch tokens (prefix tokens excluded, as timm's average
    pooling does) of a token layer, or over every position of a spatial layer:
    ``(image, channel)``.
``pool:K``
    A K×K average pool with stride K over the spatial grid (a spatial layer's
    ``y, x``, or a token layer's patch grid; prefix tokens are kept as they
    are). Windows at the lower and right edges that the grid does not fill are
    averaged over the positions they cover (``ceil_mode``), so no position is
    dropped. The pooled positions are labelled with the mean pixel centre of
    their window.

The reduction is computed in the model's precision before the cast to the
store's dtype, in the capture hook, so full-size copies of reduced layers are
never made. A reduced layer records ``reduction`` (``cls``, ``mean`` or
``pool:K``) and ``unreduced_shape`` in its attributes.

Examples
--------
>>> parse_reduce_item("blocks.*=pool:2"), parse_reduce_item("blocks.*=gap")
('blocks.*=pool:2', 'blocks.*=mean')
>>> Reduction.parse("mean"), Reduction.parse("pool:3").k
(Reduction(how='mean', k=0), 3)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitcnn_store.errors import LayerPatternError, UsageError
from vitcnn_store.store import schema

if TYPE_CHECKING:  # numpy loads where used: the CLI's parser (--reduce) needs none
    import numpy as np
    import torch

__all__ = [
    "EXTRACT_ALIASES",
    "EXTRACT_REDUCTIONS",
    "Reduction",
    "ResolvedReduction",
    "assign_reductions",
    "parse_reduce_item",
    "reduced_attrs",
    "resolve_reduction",
]

#: What ``--reduce`` keeps of a layer at extraction (recorded as such in the layer's attrs).
EXTRACT_REDUCTIONS = ("cls", "mean", "pool:K")
#: Other spellings accepted where users type them: the analyses call the mean over patch
#: tokens or positions "gap" (store/layout.py FEATURE_REDUCTIONS).
EXTRACT_ALIASES = {"gap": "mean"}
_HELP = "--reduce wants PATTERN=cls, PATTERN=mean or PATTERN=pool:K (K a positive integer)"


@dataclass(frozen=True)
class Reduction:
    """What to keep of a layer: ``cls``, ``mean`` or ``pool`` with window ``k``."""

    how: str
    k: int = 0

    @classmethod
    def parse(cls, text: str) -> Reduction:
        how, _, k = text.strip().partition(":")
        how = EXTRACT_ALIASES.get(how, how)
        if how in ("cls", "mean") and not k:
            return cls(how)
        if how == "pool" and k.isdigit() and int(k) > 0:
            return cls("pool", int(k))
        raise UsageError(f"{_HELP}; got {text!r}")

    def __str__(self) -> str:
        return f"pool:{self.k}" if self.how == "pool" else self.how


def _split(item: str) -> tuple[str, Reduction]:
    pattern, sep, how = item.rpartition("=")
    if not sep or not pattern.strip():
        raise UsageError(f"{_HELP}; got {item!r}")
    return pattern.strip(), Reduction.parse(how)


def parse_reduce_item(item: str) -> str:
    """Check one ``PATTERN=HOW`` item of ``--reduce`` and return it normalised."""
    pattern, reduction = _split(item)
    return f"{pattern}={reduction}"


def assign_reductions(layers: Sequence[str], items: Sequence[str]) -> dict[str, Reduction]:
    """The reduction of each chosen layer that some ``PATTERN=HOW`` item matches.

    A pattern must match at least one chosen layer; a layer matched by two
    items asking for different reductions is refused.

    Examples
    --------
    >>> assign_reductions(["blocks.0", "blocks.1", "norm"], ["blocks.*=cls"])
    {'blocks.0': Reduction(how='cls', k=0), 'blocks.1': Reduction(how='cls', k=0)}
    """
    from vitcnn_store.models.layers import match_patterns

    out: dict[str, Reduction] = {}
    for item in items:
        pattern, reduction = _split(item)
        for name in match_patterns(list(layers), pattern, "chosen layer (--reduce)"):
            if out.get(name, reduction) != reduction:
                raise UsageError(
                    f"--reduce: layer {name!r} is asked for both {out[name]} and {reduction}"
                )
            out[name] = reduction
    return out


@dataclass(frozen=True)
class ResolvedReduction:
    """A reduction fitted to one layer's geometry (what the capture hook applies).

    ``kind`` is the stored layer's kind before reduction; ``prefix`` the number
    of prefix tokens (token layers); ``grid`` the (rows, cols) of the patch grid
    or spatial map; ``cls_index`` the CLS token's index.
    """

    reduction: Reduction
    kind: str
    grid: tuple[int, int] = (0, 0)
    prefix: int = 0
    cls_index: int = -1

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """Reduce a canonical ``(n, token, channel)`` or ``(n, y, x, channel)`` tensor."""
        how = self.reduction.how
        if how == "cls":
            return t[:, self.cls_index, :]
        if self.kind == schema.KIND_TOKEN:
            patches = t[:, self.prefix :, :]
            if how == "mean":
                return patches.mean(dim=1)
            grid = patches.reshape(t.shape[0], *self.grid, t.shape[-1])
            pooled = self._pool(grid)
            return _cat_prefix(t[:, : self.prefix, :], pooled.flatten(1, 2))
        if how == "mean":
            return t.mean(dim=(1, 2))
        return self._pool(t)

    def _pool(self, nhwc: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        k = self.reduction.k
        # ceil_mode: windows over the lower/right edges average the positions they cover.
        pooled = F.avg_pool2d(nhwc.permute(0, 3, 1, 2), k, stride=k, ceil_mode=True)
        return pooled.permute(0, 2, 3, 1)


def _cat_prefix(prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([prefix, patches], dim=1) if prefix.shape[1] else patches


def _window_centres(centres: np.ndarray, k: int) -> np.ndarray:
    import numpy as np

    """Mean pixel centre of each window of ``k`` consecutive positions (last one partial)."""
    return np.array(
        [centres[i : i + k].mean() for i in range(0, len(centres), k)], dtype=np.float32
    )


def resolve_reduction(
    name: str,
    reduction: Reduction,
    kind: str,
    shape: tuple[int, ...],
    coords: Mapping[str, np.ndarray],
) -> tuple[ResolvedReduction, str, tuple[int, ...], dict[str, np.ndarray]]:
    """Fit ``reduction`` to a layer of ``kind``/``shape`` (per image) with ``coords``.

    Returns the resolved reduction and the reduced layer's kind, shape and
    coordinates; refuses a reduction the layer cannot take (``cls`` without a
    CLS token, any reduction of a pooled layer, ``pool`` of a token layer with
    no patch grid).
    """
    import numpy as np

    how = reduction.how
    where = f"--reduce {name}={reduction}"
    if kind not in (schema.KIND_TOKEN, schema.KIND_SPATIAL):
        raise LayerPatternError(f"{where}: the layer is {kind}, there is nothing to reduce")
    if kind == schema.KIND_SPATIAL:
        h, w, c = shape
        if how == "mean":
            return ResolvedReduction(reduction, kind, (h, w)), schema.KIND_POOLED, (c,), {}
        if how == "cls":
            raise LayerPatternError(
                f"{where}: a spatial layer has no CLS token; use mean or pool:K"
            )
        ys, xs = (
            _window_centres(coords["y"], reduction.k),
            _window_centres(coords["x"], reduction.k),
        )
        resolved = ResolvedReduction(reduction, kind, (h, w))
        return resolved, kind, (len(ys), len(xs), c), {"y": ys, "x": xs}
    n_tokens, c = shape
    kinds = schema.as_str_array(coords["token_kind"])
    cls = np.flatnonzero(kinds == schema.CLS)
    patch = np.flatnonzero(kinds == schema.PATCH)
    prefix = int(patch[0]) if patch.size else n_tokens
    if how == "cls":
        if not cls.size:
            raise LayerPatternError(f"{where}: the layer has no CLS token; use mean or pool:K")
        return (
            ResolvedReduction(reduction, kind, cls_index=int(cls[0])),
            schema.KIND_POOLED,
            (c,),
            {},
        )
    if not patch.size or not np.array_equal(patch, np.arange(prefix, n_tokens)):
        raise LayerPatternError(
            f"{where}: the layer's tokens are not prefix tokens followed by a patch grid"
        )
    if how == "mean":
        return ResolvedReduction(reduction, kind, prefix=prefix), schema.KIND_POOLED, (c,), {}
    ty, tx = coords["token_y"][prefix:], coords["token_x"][prefix:]
    rows, cols = np.unique(ty), np.unique(tx)
    if rows.size * cols.size != patch.size:
        raise LayerPatternError(f"{where}: the patch tokens do not form a grid")
    prows, pcols = _window_centres(rows, reduction.k), _window_centres(cols, reduction.k)
    n_new = prows.size * pcols.size
    new = {
        "token_kind": np.concatenate([kinds[:prefix], np.full(n_new, schema.PATCH)]).astype(str),
        "token_y": np.concatenate([coords["token_y"][:prefix], np.repeat(prows, pcols.size)]),
        "token_x": np.concatenate([coords["token_x"][:prefix], np.tile(pcols, prows.size)]),
    }
    new["token_y"] = new["token_y"].astype(np.float32)
    new["token_x"] = new["token_x"].astype(np.float32)
    resolved = ResolvedReduction(reduction, kind, (rows.size, cols.size), prefix=prefix)
    return resolved, kind, (prefix + n_new, c), new


def reduced_attrs(resolved: ResolvedReduction | None, unreduced: tuple[int, ...]) -> dict[str, Any]:
    """The layer attributes recording a reduction (empty for none)."""
    if resolved is None:
        return {}
    return {"reduction": str(resolved.reduction), "unreduced_shape": list(unreduced)}
