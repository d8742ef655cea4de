"""The names of the metrics, in the order the metric documentation lists them.

They live with the metrics (the accumulators produce them); the report and the
threshold profiles read them from here.
"""

from __future__ import annotations

#: Per-model metric keys, in the order docs/metrics.md lists them.
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
    # Included tokens whose activation was finite
    # but whose CE or KL was NaN/Inf (overflow after the hook), as a fraction.
    "nonfinite_loss_fraction",
)


#: Paired (base vs finetune) metric keys, in docs/metrics.md order.
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


#: Further paired keys a profile may check (transfer rate, dense shift), in report order.
#:
#: * ``n_regular_base``: features regular on the base (-5 <= log10 density <= -1), the
#:   denominator of the transfer rate.
#: * ``n_transferred``: of those, the features still regular on the finetune whose
#:   activation similarity is defined and at least ``TRANSFER_MIN_SIMILARITY``.
#: * ``feature_transfer_rate``: ``n_transferred / n_regular_base``; null when the base has
#:   no regular feature. A feature that turned dead, dense or rare on the finetune, or
#:   whose similarity is undefined, counts as not transferred.
#: * ``n_dense_base_only`` / ``n_dense_finetune_only``: features dense (density above
#:   ``DENSE_DENSITY``) in one model only; ``dense_shift_fraction`` is their sum over d_sae,
#:   the dense counterpart of ``dead_shift_fraction``.
#: * ``density_log10_pearson_resolved``: ``density_log10_pearson`` with every log density
#:   floored at the sample's resolution, log10(0.5 / n_tokens): a feature that never fired
#:   in n tokens has a density somewhere below 1/n, not at 1e-10, so one rare feature seen
#:   in one model and not the other no longer decides the correlation.
PAIRED_EXTRA_KEYS: tuple[str, ...] = (
    "density_log10_pearson_resolved",
    "n_regular_base",
    "n_transferred",
    "feature_transfer_rate",
    "n_dense_base_only",
    "n_dense_finetune_only",
    "dense_shift_fraction",
)

#: Every paired key a threshold profile may name.
CHECKABLE_PAIRED_KEYS: tuple[str, ...] = PAIRED_METRIC_KEYS + PAIRED_EXTRA_KEYS

#: A feature transfers when its activation similarity is at least this (and it stays regular).
TRANSFER_MIN_SIMILARITY = 0.8

#: A feature is dense when it fires on more than this fraction of included tokens.
DENSE_DENSITY = 0.1


#: Names of the per-feature vectors that go to the sidecar.
FEATURE_VECTOR_KEYS: tuple[str, ...] = (
    "density_base",
    "density_finetune",
    "activation_similarity",
    "logit_similarity",
    "dead_activation_error",
)

