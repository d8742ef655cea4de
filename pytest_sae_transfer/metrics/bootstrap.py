"""Bootstrap confidence intervals over contexts, from per-context sufficient statistics.

Resampling whole contexts with replacement is a matrix of multiplicities
W [n_boot, C]; each replicate's sums are then W @ table, and the metric formulas
are applied to a block of replicates at once. W is never held whole: it is drawn
in blocks of BLOCK replicates, so memory is O(BLOCK x C) however many
replicates are asked for. The generator is seeded and the blocks are drawn in
order, so the same contexts and seed give the same interval, and every model
and pair of one run sees the same resamples.

A finetune-minus-base difference gets its own, *paired* interval
(:func:`paired_model_intervals`): one multiplicity matrix weights the base's and the
finetune's per-context tables alike, so each replicate compares the two models on the
same resampled contexts. Context-to-context variation that both models share (a hard
document is hard for both) cancels in the difference, which an interval built from the
two separate intervals cannot do.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from .keys import MODEL_METRIC_KEYS
from .model import SCALAR_METRIC_KEYS, scalar_metrics
from .paired import P_COS, P_EUC, P_N

#: Per-model metrics with a bootstrap interval: every ratio of per-context sums except the
#: count fractions (outliers, non-finite tokens), which are reported as counts.
MODEL_CI_KEYS = tuple(k for k in MODEL_METRIC_KEYS if k in SCALAR_METRIC_KEYS and not k.endswith("_fraction"))
PAIRED_CI_KEYS = ("resid_cosine_mean", "resid_euclidean_mean")


#: Replicates per block of the multiplicity matrix.
BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Resampler:
    """The seeded with-replacement resamples of ``n_contexts`` contexts, drawn anew
    (and identically) for every use, ``BLOCK`` replicates at a time."""

    n_contexts: int
    n_boot: int
    seed: int

    def blocks(self) -> Iterator[torch.Tensor]:
        """[<= BLOCK, n_contexts] float64 multiplicities, n_boot rows in all."""
        gen = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.n_boot, BLOCK):
            rows = min(BLOCK, self.n_boot - start)
            idx = torch.randint(0, self.n_contexts, (rows, self.n_contexts), generator=gen)
            weights = torch.zeros(rows, self.n_contexts, dtype=torch.float64)
            weights.scatter_add_(1, idx, torch.ones(rows, self.n_contexts, dtype=torch.float64))
            yield weights


def _interval(samples: torch.Tensor) -> list[float] | None:
    samples = samples[torch.isfinite(samples)]
    if samples.numel() < 2:
        return None
    lo, hi = torch.quantile(samples, torch.tensor([0.025, 0.975], dtype=samples.dtype)).tolist()
    return [lo, hi]


def model_intervals(
    stats: torch.Tensor, sum_x: torch.Tensor, resampler: Resampler, with_losses: bool = True
) -> dict[str, list[float]]:
    keys = [k for k in MODEL_CI_KEYS if with_losses or not (k.startswith("ce_") or k.startswith("kl_"))]
    samples: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for weights in resampler.blocks():
        reps = scalar_metrics(weights @ stats, weights @ sum_x, sum_x.shape[1])
        for key in keys:
            samples[key].append(reps[key])
    return _intervals(samples)


def paired_model_intervals(
    base_tables: tuple[torch.Tensor, torch.Tensor],
    finetune_tables: tuple[torch.Tensor, torch.Tensor],
    resampler: Resampler,
    with_losses: bool = True,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """95% intervals of finetune − base and finetune / base for every key of ``MODEL_CI_KEYS``.

    ``base_tables`` and ``finetune_tables`` are each model's ``(stats, sum_x)`` from
    :meth:`~.model.ModelAccumulator.context_tables`: the same contexts in the same order.
    Every replicate applies one row of multiplicities to both models. A replicate whose
    ratio is undefined (base 0, finetune not 0) is left out of the ratio's interval;
    0 / 0 counts as 1 (no change), as the threshold checks read it.

    Returns ``(delta, ratio)``, each a map from metric key to ``[lo, hi]``; a key is absent
    when fewer than two replicates gave a finite value.
    """
    (b_stats, b_sum_x), (f_stats, f_sum_x) = base_tables, finetune_tables
    if b_stats.shape != f_stats.shape or b_sum_x.shape != f_sum_x.shape:
        raise ValueError(
            "a paired interval needs the same contexts for base and finetune; got tables of shapes "
            f"{tuple(b_stats.shape)}/{tuple(b_sum_x.shape)} and {tuple(f_stats.shape)}/{tuple(f_sum_x.shape)}"
        )
    if b_stats.shape[0] != resampler.n_contexts:
        raise ValueError(f"the resampler draws {resampler.n_contexts} contexts, the tables hold {b_stats.shape[0]}")
    keys = [k for k in MODEL_CI_KEYS if with_losses or not (k.startswith("ce_") or k.startswith("kl_"))]
    d_in = b_sum_x.shape[1]
    deltas: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    ratios: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for weights in resampler.blocks():
        base = scalar_metrics(weights @ b_stats, weights @ b_sum_x, d_in)
        ft = scalar_metrics(weights @ f_stats, weights @ f_sum_x, d_in)
        for key in keys:
            deltas[key].append(ft[key] - base[key])
            ratios[key].append(ratio_of(ft[key], base[key]))
    return _intervals(deltas), _intervals(ratios)


def ratio_of(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den elementwise; 1 where both are 0 (equal values), ±inf or NaN where only den is 0."""
    both_zero = (num == 0) & (den == 0)
    return torch.where(both_zero, torch.ones_like(num), num / den)


def paired_intervals(table: torch.Tensor, resampler: Resampler) -> dict[str, list[float]]:
    columns = dict(zip(PAIRED_CI_KEYS, (P_COS, P_EUC)))
    samples: dict[str, list[torch.Tensor]] = {key: [] for key in PAIRED_CI_KEYS}
    for weights in resampler.blocks():
        sums = weights @ table
        n = sums[:, P_N].clamp_min(1e-300)
        for key, col in columns.items():
            samples[key].append(sums[:, col] / n)
    return _intervals(samples)


def _intervals(samples: dict[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for key, parts in samples.items():
        interval = _interval(torch.cat(parts)) if parts else None
        if interval is not None:
            out[key] = interval
    return out
