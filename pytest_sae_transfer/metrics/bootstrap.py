"""Bootstrap confidence intervals over contexts, from per-context sufficient statistics.

Resampling whole contexts with replacement is a matrix of multiplicities
W [n_boot, C]; each replicate's sums are then W @ table, and the metric formulas
are applied to all replicates at once. The generator is seeded, so the same
contexts and seed give the same interval.
"""

from __future__ import annotations

import torch

from .model import scalar_metrics
from .paired import P_COS, P_EUC, P_N

MODEL_CI_KEYS = (
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
)
PAIRED_CI_KEYS = ("resid_cosine_mean", "resid_euclidean_mean")


def resample_weights(n_contexts: int, n_boot: int, seed: int) -> torch.Tensor:
    """[n_boot, n_contexts] float64 multiplicities of a with-replacement resample."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_contexts, (n_boot, n_contexts), generator=gen)
    weights = torch.zeros(n_boot, n_contexts, dtype=torch.float64)
    weights.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return weights


def _interval(samples: torch.Tensor) -> list[float] | None:
    samples = samples[torch.isfinite(samples)]
    if samples.numel() < 2:
        return None
    lo, hi = torch.quantile(samples, torch.tensor([0.025, 0.975], dtype=samples.dtype)).tolist()
    return [lo, hi]


def model_intervals(
    stats: torch.Tensor, sum_x: torch.Tensor, weights: torch.Tensor, with_losses: bool = True
) -> dict[str, list[float]]:
    reps = scalar_metrics(weights @ stats, weights @ sum_x, sum_x.shape[1])
    out: dict[str, list[float]] = {}
    for key in MODEL_CI_KEYS:
        if not with_losses and (key.startswith("ce_") or key.startswith("kl_")):
            continue
        interval = _interval(reps[key])
        if interval is not None:
            out[key] = interval
    return out


def paired_intervals(table: torch.Tensor, weights: torch.Tensor) -> dict[str, list[float]]:
    sums = weights @ table
    n = sums[:, P_N].clamp_min(1e-300)
    out: dict[str, list[float]] = {}
    for key, col in (("resid_cosine_mean", P_COS), ("resid_euclidean_mean", P_EUC)):
        interval = _interval(sums[:, col] / n)
        if interval is not None:
            out[key] = interval
    return out
