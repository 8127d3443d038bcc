"""Which layers an across-depth analysis shows, and where they sit along the network.

The paper's depth axes follow the residual stream: the stem (or input tokens)
and each block's output. Branch outputs (``blocks.i.attn``, a bottleneck's
``bn3``) and taps inside a block sit between two stream tensors and are shown
only on request (:func:`select_by_role`). :func:`block_depth` puts every layer
on one axis by block, from 0 (the stem) to 1 (the last stored block), so a ViT
and a ResNet line up however many taps each run stored. CKA matrices, probe
curves and skip ratios all use these two functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jobs.analyze.layers import layer_attrs, run_roles, select_layers
from jobs.analyze.options import ROLE_SETS
from vitcnn_store.errors import UsageError
from vitcnn_store.models.families import BRANCH, is_residual_stream
from vitcnn_store.store.reader import Run

__all__ = ["ROLE_SETS", "block_depth", "layer_role_names", "select_by_role"]


def select_by_role(
    run: Run, patterns: str | None, roles: str = "stream", option: str = "--layers"
) -> tuple[list[str], str]:
    """Stored layers to analyse, and how they were chosen (recorded with the result).

    ``patterns`` pick layers by name. Without them, by role: ``stream``
    (default) the residual stream — the stem and every block output, one point
    per block, so a curve measures depth and not the mix of taps a run happens
    to store; ``branches`` those and each block's branch outputs; ``all``
    every stored layer. A run whose layers have no residual-stream role (an
    unknown family) gives every stored layer.
    """
    if roles not in ROLE_SETS:
        raise UsageError(f"--roles must be one of {', '.join(ROLE_SETS)}, got {roles!r}")
    if patterns:
        return select_layers(run, patterns, option), f"stored layers matching {patterns!r}"
    names = select_layers(run, None, option)
    if roles == "all":
        return names, "every stored layer"
    attrs = run_roles(run)
    chosen = [
        n
        for n in names
        if is_residual_stream(n, attrs.get(n))
        or (roles == "branches" and attrs.get(n, {}).get("role") == BRANCH)
    ]
    if not chosen:
        return names, "every stored layer (no residual-stream layers are known for this model)"
    what = "residual stream: the stem and every block output"
    return chosen, what + (", with each block's branch outputs" if roles == "branches" else "")


def layer_role_names(run: Run, layers: Sequence[str]) -> list[str]:
    """Each layer's role as the ``role`` coordinate of a result states it (``stream``,
    ``branch``, ...): recorded or derived (:func:`~jobs.analyze.layers.run_roles`), else
    ``stream`` where the name rules put the layer on the residual stream, else ``""``."""
    attrs = run_roles(run)
    out = []
    for name in layers:
        role = str(attrs.get(name, {}).get("role", ""))
        if not role and is_residual_stream(name, attrs.get(name)):
            role = "stream"
        out.append(role)
    return out


def block_depth(run: Run, layers: Sequence[str]) -> tuple[np.ndarray, str]:
    """Normalized depth of ``layers`` by block, and a sentence saying how it was measured.

    With K blocks stored, block k (1-based, forward order) ends at k / K and the
    stem sits at 0, so a 12-block ViT and a 16-block ResNet share one axis
    whichever taps each run stores. A tap inside block k is placed at
    (k − 1 + j/m) / K, j its rank among the block's m stored taps in forward
    order (the block output is last, at k / K). Layers outside every block go
    to 0 before the first block and 1 after the last. Runs without recorded
    blocks keep their stored ``depth_fraction`` (forward order of stored layers).
    """
    roles = run_roles(run)
    attrs = {n: layer_attrs(run, n) for n in run.layers}
    order = {n: int(attrs[n].get("depth_index", i)) for i, n in enumerate(run.layers)}
    members: dict[str, list[str]] = {}
    for name in sorted(run.layers, key=order.__getitem__):
        block = roles.get(name, {}).get("block")
        if block:
            members.setdefault(str(block), []).append(name)
    if not members:
        stored = [float(attrs[n].get("depth_fraction", np.nan)) for n in layers]
        return np.array(stored), "stored depth_fraction (forward order of the stored layers)"
    blocks = sorted(members, key=lambda b: order[members[b][-1]])
    first = min(order[members[b][0]] for b in blocks)
    out = []
    for name in layers:
        block = roles.get(name, {}).get("block")
        if block and str(block) in members:
            taps = members[str(block)]
            k = blocks.index(str(block))
            out.append((k + (taps.index(name) + 1) / len(taps)) / len(blocks))
        else:
            out.append(0.0 if order[name] < first else 1.0)
    return np.array(out, dtype=np.float64), (
        f"block k of the {len(blocks)} stored blocks at k/{len(blocks)}, the stem at 0"
    )
