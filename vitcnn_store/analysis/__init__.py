"""Analysis kernels: pure functions on numpy arrays (or torch tensors).

The kernels know nothing about zarr, xarray, Ray or dask (see
``docs/architecture.md``): jobs map them over stored chunks. Importing this
package imports numpy only; torch tensors are accepted anywhere an array is
and are converted with ``.detach().cpu().numpy()`` (torch itself is never
imported here). Each formula lives in exactly one function of this package;
``docs/science.md`` states them with references.

Modules
-------
gram
    Gram matrices in float64 from float16 features (blocked), RBF from linear,
    biased and U-centring.
cka
    CKA (biased and unbiased HSIC), one-shot from Grams, minibatch accumulators
    for all layer pairs, minibatch sampling.
attention
    Mean attention distance, attention entropy, CLS attention maps, and an
    accumulator for streaming image chunks.
localization
    CKA between chosen tokens and every input patch (paper §7).
skip
    Skip-connection norm ratios ‖z‖/‖f(z)‖ (paper §6).
probes
    Closed-form ridge linear probes, the penalty chosen by cross-validation,
    train/test splits and chance accuracy (paper App. A).
top_images
    The k images that drive each channel most (max over positions), merged
    exactly across chunks.
"""

from vitcnn_store.analysis.attention import (
    AttentionAccumulator,
    attention_entropy,
    cls_attention_map,
    cls_key_mass,
    mean_attention_distance,
    patch_distance_matrix,
)
from vitcnn_store.analysis.cka import (
    MinibatchCKA,
    MinibatchCKAMatrix,
    cka,
    cka_matrix_from_grams,
    hsic,
    linear_cka,
    sample_batches,
    unbiased_linear_cka,
)
from vitcnn_store.analysis.gram import (
    GramAccumulator,
    center_gram,
    gram_linear,
    gram_rbf,
    kernel_gram,
    rbf_from_linear_gram,
    u_center_gram,
)
from vitcnn_store.analysis.localization import MinibatchLocalization, image_to_patches
from vitcnn_store.analysis.probes import (
    chance_accuracy,
    cross_validate_l2,
    few_shot_split,
    fit_ridge,
    linear_probe_accuracy,
    predict,
    probe_splits,
    ridge_probe,
    stratified_folds,
    stratified_split,
)
from vitcnn_store.analysis.skip import cls_and_spatial_ratio, skip_norm_ratio, skip_norm_ratio_sum
from vitcnn_store.analysis.top_images import TopK, chunk_top_k, merge_top_k

__all__ = [
    "AttentionAccumulator",
    "GramAccumulator",
    "MinibatchCKA",
    "MinibatchCKAMatrix",
    "MinibatchLocalization",
    "TopK",
    "attention_entropy",
    "center_gram",
    "chance_accuracy",
    "chunk_top_k",
    "cka",
    "cka_matrix_from_grams",
    "cls_and_spatial_ratio",
    "cls_attention_map",
    "cls_key_mass",
    "cross_validate_l2",
    "few_shot_split",
    "fit_ridge",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "image_to_patches",
    "kernel_gram",
    "linear_cka",
    "linear_probe_accuracy",
    "mean_attention_distance",
    "merge_top_k",
    "patch_distance_matrix",
    "predict",
    "probe_splits",
    "rbf_from_linear_gram",
    "ridge_probe",
    "sample_batches",
    "skip_norm_ratio",
    "skip_norm_ratio_sum",
    "stratified_folds",
    "stratified_split",
    "u_center_gram",
    "unbiased_linear_cka",
]
