"""Which layers an across-depth analysis shows, and where they sit along the network.

The paper's depth axes follow the residual stream: the stem (or input tokens)
and each block's output. Branch outputs (``blocks.i.attn``, a bottleneck's
``bn3``) and taps inside a block sit between two stream tensors and are shown
only on request (:func:`select_by_role`). :func:`normalized_depth` puts every
layer on one axis from 0 (the stem) to 1 (the last stored block output), so a
ViT and a ResNet line up however many taps each stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jobs.analyze.layers import layer_info, layer_roles, select_layers
from vitcnn_store.errors import UsageError
from vitcnn_store.models.families import BRANCH, is_residual_stream
from vitcnn_store.store.reader import Run

__all__ = ["ROLE_SETS", "layer_role_names", "normalized_depth", "select_by_role"]

ROLE_SETS = ("stream", "branches", "all")


def _stream(run: Run, layers: Sequence[str]) -> list[str]:
    roles = layer_roles(run)
    return [name for name in layers if is_residual_stream(name, roles.get(name))]


def select_by_role(
    run: Run, patterns: str | None, roles: str = "stream", option: str = "--layers"
) -> list[str]:
    """Stored layers to analyse: those matching ``patterns`` when given; else by role.

    ``stream`` (default): the residual stream (stem and block outputs);
    ``branches``: those and each block's branch outputs; ``all``: every stored
    layer. A run whose layers have no residual-stream structure (an unknown
    family) gives every layer.
    """
    if roles not in ROLE_SETS:
        raise UsageError(f"--roles must be one of {', '.join(ROLE_SETS)}, got {roles!r}")
    if patterns:
        return select_layers(run, patterns, option)
    layers = select_layers(run, None, option)
    if roles == "all":
        return layers
    stream = set(_stream(run, layers))
    if not stream:
        return layers
    attrs = layer_roles(run)
    keep = stream | ({n for n in layers if attrs.get(n, {}).get("role") == BRANCH}
                     if roles == "branches" else set())  # fmt: skip
    return [n for n in layers if n in keep]


def layer_role_names(run: Run, layers: Sequence[str]) -> list[str]:
    """Each layer's recorded role (``stream``, ``branch``, ...; ``""`` when unknown)."""
    attrs = layer_roles(run)
    out = []
    for name in layers:
        role = str(attrs.get(name, {}).get("role", ""))
        if not role and is_residual_stream(name, attrs.get(name)):
            role = "stream"
        out.append(role)
    return out


def normalized_depth(run: Run, layers: Sequence[str]) -> np.ndarray:
    """Depth of each layer along the run's stored residual stream, 0 (stem) to 1 (last block).

    Stream layers sit at k/K (the k-th of K + 1); any other layer is placed by
    its forward order between its neighbouring stream layers (a branch output
    of block k lies between blocks k-1 and k). Runs with fewer than two stream
    layers use the stored ``depth_fraction``.
    """
    index = {name: layer_info(run[name]).depth_index for name in run.layers}
    stream = sorted(_stream(run, run.layers), key=lambda n: index[n])
    if len(stream) < 2:
        return np.array([layer_info(run[name]).depth_fraction for name in layers])
    xp = np.array([index[n] for n in stream], dtype=float)
    fp = np.linspace(0.0, 1.0, len(stream))
    return np.interp([float(index[name]) for name in layers], xp, fp)
