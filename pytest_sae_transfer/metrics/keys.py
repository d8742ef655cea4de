"""The names of the metrics, in the order the metric documentation lists them.

They live with the metrics (the accumulators produce them); the report and the
threshold profiles read them from here.
"""

from __future__ import annotations

#: Per-model metric keys, in the order SPEC.md lists them.
MODEL_METRIC_KEYS: tuple[str, ...] = (
    "n_tokens",
    "l0",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_delta",
    "ce_loss_zero_ablation",
    "ce_loss_recovered",
    "kl_div_spliced",
    "explained_variance",
    "r2_pooled",
    "mse",
    "cossim",
    "dead_fraction",
    "dense_fraction",
    "outlier_fraction",
    "nonfinite_fraction",
    # Beyond SPEC (extra keys are allowed): included tokens whose activation was finite
    # but whose CE or KL was NaN/Inf (overflow after the hook), as a fraction.
    "nonfinite_loss_fraction",
)


#: Paired (base vs finetune) metric keys, in SPEC.md order.
PAIRED_METRIC_KEYS: tuple[str, ...] = (
    "resid_cosine_mean",
    "resid_cosine_by_position",
    "resid_euclidean_mean",
    "resid_euclidean_by_position",
    "density_log10_pearson",
    "n_dead_base_only",
    "n_dead_finetune_only",
    "dead_shift_fraction",
    "n_regular_features",
    "activation_similarity_mean",
    "activation_similarity_median",
    "activation_similarity_frac_above_0_8",
    "n_activation_similarity_undefined",
    "logit_similarity_mean",
    "logit_similarity_median",
    "dead_activation_error_base_only_mean",
    "dead_activation_error_finetune_only_mean",
    "unembed_frobenius_ratio",
    "weight_deviation",
)


#: Names of the per-feature vectors that go to the sidecar.
FEATURE_VECTOR_KEYS: tuple[str, ...] = (
    "density_base",
    "density_finetune",
    "activation_similarity",
    "logit_similarity",
    "dead_activation_error",
)

