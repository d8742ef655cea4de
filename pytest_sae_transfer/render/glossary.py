"""One-line definitions of every metric key, for tooltips and legends.

``GLOSSARY`` maps each key the report can carry (per-model metrics, paired metrics, the
extra paired keys, the per-feature vectors and the report-only counts) to a plain-English
line of at most 120 characters. The full definitions, with formulas, are in
``docs/metrics.md``; ``tests/test_glossary.py`` keeps the two and ``metrics/keys.py`` in step.

Imports nothing from the package, so any renderer can use it.
"""

from __future__ import annotations

GLOSSARY: dict[str, str] = {
    # -- per model: run health
    "n_tokens": "Token positions the statistics cover: non-special tokens (in the paired block: those finite in both models).",
    "outlier_fraction": "Share of included tokens whose activation norm is above the outlier threshold (0 when the mask is off).",
    "nonfinite_fraction": "Share of included tokens whose activation, SAE features or reconstruction contain NaN or Inf.",
    "nonfinite_loss_fraction": "Share of included tokens with finite activations but a NaN or Inf loss (CE or KL).",
    "n_outliers": "Included tokens flagged as outliers; left out of the reconstruction metrics, never spliced.",
    "n_nonfinite": "Included tokens with a NaN or Inf activation, feature or reconstruction; counted, left out of every mean.",
    "n_nonfinite_loss": "Tokens with finite activations whose CE or KL was NaN or Inf; left out of the loss means only.",
    # -- per model: sparsity
    "l0": "Average number of SAE features active on a token.",
    "dead_fraction": "Share of the SAE's features that never fired on this model's evaluated tokens.",
    "dense_fraction": "Share of the SAE's features that fire on more than 10% of evaluated tokens.",
    # -- per model: loss
    "ce_loss_clean": "Next-token cross-entropy of the unmodified model, in nats per token.",
    "ce_loss_spliced": "Next-token cross-entropy with the SAE's reconstruction replacing the activation at the hook.",
    "ce_loss_delta": "Loss the SAE costs: spliced minus clean cross-entropy, in nats; lower is better.",
    "ce_loss_zero_ablation": "Next-token cross-entropy with the activation at the hook set to zero: the no-information reference.",
    "ce_loss_recovered": "Share of the zero-ablation loss gap the SAE closes: (zero - spliced) / (zero - clean); 1 is perfect.",
    "kl_div_spliced": "Mean KL divergence of the spliced next-token distribution from the clean one, in nats.",
    # -- per model: reconstruction
    "explained_variance": "1 - squared reconstruction error / variance around each dimension's mean (sae_lens); 1 is perfect.",
    "r2_pooled": "The study's R²: like explained variance, but variance taken around one mean of all coordinates.",
    "mse": "Mean over tokens of the squared L2 distance between activation and reconstruction.",
    "cossim": "Mean cosine similarity between each activation and its SAE reconstruction.",
    # -- paired: residual stream and weights
    "resid_cosine_mean": "Mean cosine between the base's and the finetune's activations at the hook on the same tokens.",
    "resid_cosine_by_position": "The base-vs-finetune activation cosine averaged at each position of the context.",
    "resid_euclidean_mean": "Mean L2 distance between the base's and the finetune's activations at the hook.",
    "resid_euclidean_by_position": "The base-vs-finetune activation distance averaged at each position of the context.",
    "unembed_frobenius_ratio": "Frobenius norm of the finetune's unembedding over the base's (shared vocabulary); 1 = same size.",
    "weight_deviation": "Per block: norm of the finetune's weight change relative to the base weights' norm; 0 = unchanged.",
    "n_shared_vocab": "Vocabulary rows the weight-based metrics use: the smaller of the two models' vocabularies.",
    # -- paired: features
    "density_log10_pearson": "Correlation over all features of log10 firing density on the base and on the finetune.",
    "density_log10_pearson_resolved": "The same correlation with log densities floored at half a firing in the sample (what it can resolve).",
    "n_dead_base_only": "Features dead on the base but alive on the finetune (turned alive).",
    "n_dead_finetune_only": "Features alive on the base but dead on the finetune (turned dead).",
    "n_dead_both": "Features dead on both models.",
    "dead_shift_fraction": "Features dead in exactly one of the two models, as a share of all features.",
    "n_regular_features": "Features with density between 1e-5 and 0.1 on both models: those the similarities cover.",
    "activation_similarity_mean": "Mean over regular features of the token-by-token correlation of a feature's base and finetune activations.",
    "activation_similarity_median": "Median over regular features of the base-vs-finetune activation correlation.",
    "activation_similarity_frac_above_0_8": "Share of regular features whose base-vs-finetune activation correlation is above 0.8.",
    "n_activation_similarity_undefined": "Regular features whose activation correlation is undefined (no variance on one model).",
    "logit_similarity_mean": "Mean over regular features of how alike a feature's output-logit effect is through both unembeddings.",
    "logit_similarity_median": "Median over regular features of the base-vs-finetune logit-effect correlation.",
    "dead_activation_error_base_only_mean": "For features dead on the base only: mean log10 gap between their base and finetune activations.",
    "dead_activation_error_finetune_only_mean": "For features dead on the finetune only: mean log10 gap between their base and finetune activations.",
    "n_regular_base": "Features regular on the base (density between 1e-5 and 0.1): the ones that could transfer.",
    "n_transferred": "Base-regular features still regular on the finetune with activation similarity of at least 0.8.",
    "feature_transfer_rate": "Share of the base's regular features that transfer (n_transferred / n_regular_base).",
    "n_dense_base_only": "Features dense (density above 0.1) on the base but not on the finetune.",
    "n_dense_finetune_only": "Features dense (density above 0.1) on the finetune but not on the base.",
    "dense_shift_fraction": "Features dense in exactly one of the two models, as a share of all features.",
    # -- per-feature vectors (the sidecar)
    "density_base": "Per feature: share of the base's evaluated tokens it fires on.",
    "density_finetune": "Per feature: share of the finetune's evaluated tokens it fires on.",
    "activation_similarity": "Per feature: correlation of its base and finetune activations (regular features only).",
    "logit_similarity": "Per feature: correlation of its logit effect through the two unembeddings (regular features only).",
    "dead_activation_error": "Per feature dead in exactly one model: mean log10 gap between its base and finetune activations.",
}

_SCOPES = ("base.", "finetune.", "paired.")


def define(key: str) -> str | None:
    """The one-line definition of ``key``, or None for an unknown key.

    A scoped name such as ``"finetune.ce_loss_delta"`` (a check's metric) is looked up
    by its metric key."""
    if key in GLOSSARY:
        return GLOSSARY[key]
    for scope in _SCOPES:
        if key.startswith(scope):
            return GLOSSARY.get(key[len(scope):])
    return None
