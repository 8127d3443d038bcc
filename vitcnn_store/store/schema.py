"""The store's vocabulary, defined once: dimension names, layer kinds, token kinds.

Capture uses these names to lay out what it hooks, the extraction job to
create arrays, and the analysis jobs to read them back; nothing else spells
them out. The layout of groups and the format's rules live in
:mod:`vitcnn_store.store.layout`.

Examples
--------
>>> DIMS_BY_KIND[KIND_SPATIAL]
('y', 'x', 'channel')
>>> kind_of_dims(("image", "token", "channel"))
'token'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy loads in the functions that use it: the CLI's parser needs none
    import numpy as np

__all__ = [
    "CHANNEL",
    "CLS",
    "DIMS_BY_KIND",
    "HEAD",
    "IMAGE",
    "INPUT_DIMS",
    "KEY",
    "KINDS",
    "KIND_ATTENTION",
    "KIND_BY_NDIM",
    "KIND_POOLED",
    "KIND_SPATIAL",
    "KIND_TOKEN",
    "LAYER_KINDS",
    "PATCH",
    "QUERY",
    "REGISTER",
    "TOKEN",
    "TOKEN_KINDS",
    "X",
    "Y",
    "as_str_array",
    "kind_of_dims",
    "string_coord",
]

# -- dimension names --------------------------------------------------------------------
IMAGE = "image"
TOKEN = "token"
CHANNEL = "channel"
Y, X = "y", "x"
HEAD, QUERY, KEY = "head", "query", "key"
INPUT_DIMS = ("input_y", "input_x", "rgb")  # the stored model input, per image

# -- layer kinds (the ``kind`` attribute of a layer group) ------------------------------
KIND_TOKEN = "token"  # (image, token, channel): ViT token sequences
KIND_SPATIAL = "spatial"  # (image, y, x, channel): CNN feature maps, channels last
KIND_POOLED = "pooled"  # (image, channel)
KIND_ATTENTION = "attention"  # (image, head, query, key): softmax probabilities
LAYER_KINDS = (KIND_TOKEN, KIND_SPATIAL, KIND_POOLED)
KINDS = (*LAYER_KINDS, KIND_ATTENTION)

# Dims after ``image`` for each kind.
DIMS_BY_KIND: dict[str, tuple[str, ...]] = {
    KIND_TOKEN: (TOKEN, CHANNEL),
    KIND_SPATIAL: (Y, X, CHANNEL),
    KIND_POOLED: (CHANNEL,),
    KIND_ATTENTION: (HEAD, QUERY, KEY),
}
# Kind of a captured activation tensor by its number of dims, batch axis included.
KIND_BY_NDIM = {3: KIND_TOKEN, 4: KIND_SPATIAL, 2: KIND_POOLED}

# -- values of the ``token_kind`` coordinate --------------------------------------------
CLS, REGISTER, PATCH = "cls", "reg", "patch"
TOKEN_KINDS = (CLS, REGISTER, PATCH, "other")  # prefix tokens first, as timm orders them


def kind_of_dims(dims: Sequence[str]) -> str:
    """The kind of a stored activation from its dimension names.

    Examples
    --------
    >>> kind_of_dims(("image", "y", "x", "channel")), kind_of_dims(("image", "channel"))
    ('spatial', 'pooled')
    """
    if TOKEN in dims:
        return KIND_TOKEN
    if Y in dims and X in dims:
        return KIND_SPATIAL
    if HEAD in dims:
        return KIND_ATTENTION
    return KIND_POOLED


def as_str_array(values: Any) -> np.ndarray:
    """Plain ``str`` array from a stored string array (zarr reads numpy's ``StringDType``).

    Examples
    --------
    >>> import numpy as np
    >>> as_str_array(np.array(["cls", "patch"], dtype=object)).dtype.kind
    'U'
    """
    import numpy as np

    return np.array([str(v) for v in np.asarray(values).tolist()], dtype=str)


def string_coord(values: Iterable[Any]) -> np.ndarray:
    """Strings as an object array: zarr v3 stores those as portable variable-length strings.

    Examples
    --------
    >>> string_coord(["blocks.0", "blocks.1"]).dtype
    dtype('O')
    """
    import numpy as np

    return np.array([str(v) for v in values], dtype=object)
