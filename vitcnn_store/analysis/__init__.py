"""Analysis kernels: pure functions on numpy arrays (or torch tensors).

The kernels know nothing about zarr, xarray, Ray or dask (DESIGN §1): jobs map
them over stored chunks. Importing this package imports numpy only; torch
tensors are accepted anywhere an array is and are converted with
``.detach().cpu().numpy()`` (torch itself is never imported here).

Modules
-------
cka
    Linear/RBF CKA (biased and unbiased HSIC), minibatch and all-pairs accumulators.
attention
    Mean attention distance, attention entropy, CLS attention maps, and an
    accumulator for streaming image chunks.
localization
    CKA between one token and every input patch (paper §7).
skip
    Skip-connection norm ratios ‖z‖/‖f(z)‖ (paper §6).
probes
    Closed-form ridge linear probes and few-shot splits (paper App. A).
"""

from vitcnn_store.analysis.attention import (
    AttentionAccumulator,
    attention_entropy,
    cls_attention_map,
    mean_attention_distance,
    patch_distance_matrix,
)
from vitcnn_store.analysis.cka import (
    MinibatchCKA,
    MinibatchCKAMatrix,
    center_gram,
    cka,
    cka_matrix,
    gram_linear,
    gram_rbf,
    hsic,
    linear_cka,
    u_center_gram,
    unbiased_linear_cka,
)
from vitcnn_store.analysis.localization import (
    MinibatchLocalization,
    image_to_patches,
    localization_map,
)
from vitcnn_store.analysis.probes import (
    few_shot_split,
    fit_ridge,
    linear_probe_accuracy,
    predict,
)
from vitcnn_store.analysis.skip import cls_and_spatial_ratio, skip_norm_ratio, skip_norm_ratio_sum

__all__ = [
    "AttentionAccumulator",
    "MinibatchCKA",
    "MinibatchCKAMatrix",
    "MinibatchLocalization",
    "attention_entropy",
    "center_gram",
    "cka",
    "cka_matrix",
    "cls_and_spatial_ratio",
    "cls_attention_map",
    "few_shot_split",
    "fit_ridge",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "image_to_patches",
    "linear_cka",
    "linear_probe_accuracy",
    "localization_map",
    "mean_attention_distance",
    "patch_distance_matrix",
    "predict",
    "skip_norm_ratio",
    "skip_norm_ratio_sum",
    "u_center_gram",
    "unbiased_linear_cka",
]
