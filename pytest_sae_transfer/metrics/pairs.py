"""A finetune's paired block, computed after the pass from the streamed sums: densities,
the regular, dead-in-one-model and dense-in-one-model feature sets, activation and logit
similarity, the share of the base's regular features that transfer, the dead-feature
activation error, and the residual-stream similarity."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from .keys import DENSE_DENSITY, TRANSFER_MIN_SIMILARITY
from .model import ModelAccumulator
from .paired import P_COS, P_EUC, P_N, PairedAccumulator
from .stats import LOG_EPS, pearson_from_sums, rowwise_pearson


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Non-finite floats become None (JSON has no NaN)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def _summary(values: torch.Tensor) -> tuple[float | None, float | None, float | None]:
    arr = values.numpy()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return None, None, None
    return float(arr.mean()), float(np.median(arr)), float((arr > 0.8).mean())


def regular_mask(log_density: torch.Tensor) -> torch.Tensor:
    """Features with -5 <= log10 density <= -1 (the "regular" band)."""
    return (log_density >= -5) & (log_density <= -1)


def feature_transfer(
    log_b: torch.Tensor, log_f: torch.Tensor, dens_b: torch.Tensor, dens_f: torch.Tensor, similarity: torch.Tensor
) -> dict[str, Any]:
    """Which of the base's regular features survive the finetune, and which turned dense.

    ``similarity`` is every feature's activation similarity (NaN where undefined). A
    feature regular on the base transfers when it is regular on the finetune too and its
    similarity is defined and at least ``TRANSFER_MIN_SIMILARITY``; one that turned dead,
    dense or rare, or whose similarity is undefined, does not. The rate is null when the
    base has no regular feature (nothing to transfer).
    """
    d_sae = int(log_b.numel())
    on_base = regular_mask(log_b)
    kept = on_base & regular_mask(log_f) & (similarity >= TRANSFER_MIN_SIMILARITY)  # NaN compares False
    n_base, n_kept = int(on_base.sum()), int(kept.sum())
    dense_b, dense_f = dens_b > DENSE_DENSITY, dens_f > DENSE_DENSITY
    n_dense_b_only = int((dense_b & ~dense_f).sum())
    n_dense_f_only = int((~dense_b & dense_f).sum())
    return {
        "n_regular_base": n_base,
        "n_transferred": n_kept,
        "feature_transfer_rate": n_kept / n_base if n_base else None,
        "n_dense_base_only": n_dense_b_only,
        "n_dense_finetune_only": n_dense_f_only,
        "dense_shift_fraction": (n_dense_b_only + n_dense_f_only) / d_sae if d_sae else None,
    }


def paired_metrics(
    base_fire_count: torch.Tensor,
    base_n_eval: float,
    ft_acc: ModelAccumulator,
    pair: PairedAccumulator,
    weights_part: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    notes: list[str] = list(weights_part["notes"])
    d_sae = pair.d_sae
    dens_b = base_fire_count / base_n_eval if base_n_eval > 0 else torch.full((d_sae,), math.nan, dtype=torch.float64)
    dens_f = ft_acc.densities()
    log_b = torch.log10(dens_b + LOG_EPS)
    log_f = torch.log10(dens_f + LOG_EPS)
    dead_b = base_fire_count == 0
    dead_f = ft_acc.fire_count == 0
    regular = regular_mask(log_b) & regular_mask(log_f)

    act_sim_all = pearson_from_sums(pair.n, pair.sum_a, pair.sum_b, pair.sum_aa, pair.sum_bb, pair.sum_ab)
    act_sim = torch.where(regular, act_sim_all, torch.nan)
    undefined = int((regular & torch.isnan(act_sim_all)).sum())
    act_mean, act_median, act_frac = _summary(act_sim[regular])

    logit_sim = torch.where(regular, weights_part["logit_similarity"], torch.nan)
    logit_mean, logit_median, _ = _summary(logit_sim[regular])

    mean_log_err = pair.sum_log_err / pair.n if pair.n > 0 else torch.full((d_sae,), math.nan, dtype=torch.float64)
    base_only = dead_b & ~dead_f
    ft_only = ~dead_b & dead_f
    dead_err = torch.where(base_only | ft_only, mean_log_err, torch.nan)

    def mean_over(mask: torch.Tensor) -> float | None:
        return float(mean_log_err[mask].mean()) if bool(mask.any()) and pair.n > 0 else None

    density_r = rowwise_pearson(log_b.unsqueeze(0), log_f.unsqueeze(0))[0]
    # The sample's resolution: below half a firing in n tokens a density is not measured.
    floor = math.log10(0.5 / max(base_n_eval, 1.0))
    resolved_r = rowwise_pearson(log_b.clamp_min(floor).unsqueeze(0), log_f.clamp_min(floor).unsqueeze(0))[0]
    paired: dict[str, Any] = {
        **_residual(pair),
        "density_log10_pearson": float(density_r) if math.isfinite(float(density_r)) else None,
        "n_dead_base_only": int(base_only.sum()),
        "n_dead_finetune_only": int(ft_only.sum()),
        "n_dead_both": int((dead_b & dead_f).sum()),
        "dead_shift_fraction": float((base_only.sum() + ft_only.sum()) / d_sae),
        "n_regular_features": int(regular.sum()),
        "activation_similarity_mean": act_mean,
        "activation_similarity_median": act_median,
        "activation_similarity_frac_above_0_8": act_frac,
        "n_activation_similarity_undefined": undefined,
        "logit_similarity_mean": logit_mean,
        "logit_similarity_median": logit_median,
        "dead_activation_error_base_only_mean": mean_over(base_only),
        "dead_activation_error_finetune_only_mean": mean_over(ft_only),
        "unembed_frobenius_ratio": weights_part["unembed_frobenius_ratio"],
        "weight_deviation": weights_part["weight_deviation"],
        "n_shared_vocab": int(weights_part["n_shared_vocab"]),
    }
    paired["density_log10_pearson_resolved"] = float(resolved_r) if math.isfinite(float(resolved_r)) else None
    paired.update(feature_transfer(log_b, log_f, dens_b, dens_f, act_sim_all))
    vectors = {
        "density_base": dens_b.numpy(),
        "density_finetune": dens_f.numpy(),
        "activation_similarity": act_sim.numpy(),
        "logit_similarity": logit_sim.numpy(),
        "dead_activation_error": dead_err.numpy(),
    }
    return paired, vectors, notes


def _residual(pair: PairedAccumulator) -> dict[str, Any]:
    """The residual-stream similarity of the pair: means over the paired tokens, and by position."""
    table = pair.context_table()
    n_pair = float(table[:, P_N].sum())
    cos_by_pos, euc_by_pos = pair.by_position()
    return {
        "n_tokens": int(n_pair),
        "resid_cosine_mean": float(table[:, P_COS].sum() / n_pair) if n_pair > 0 else None,
        "resid_cosine_by_position": cos_by_pos,
        "resid_euclidean_mean": float(table[:, P_EUC].sum() / n_pair) if n_pair > 0 else None,
        "resid_euclidean_by_position": euc_by_pos,
    }
