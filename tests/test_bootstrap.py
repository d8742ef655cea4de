"""The bootstrap's resamples, drawn in blocks, and its intervals against numpy."""

from __future__ import annotations

import numpy as np
import torch

from pytest_sae_transfer.metrics.bootstrap import BLOCK, Resampler, paired_intervals
from pytest_sae_transfer.metrics.paired import P_COS, P_EUC, P_N


def test_blocks_are_whole_resamples_reproducible_and_bounded() -> None:
    n_ctx, n_boot = 37, 2 * BLOCK + 44
    resampler = Resampler(n_contexts=n_ctx, n_boot=n_boot, seed=5)
    blocks = list(resampler.blocks())
    assert [b.shape for b in blocks] == [(BLOCK, n_ctx), (BLOCK, n_ctx), (44, n_ctx)]  # memory O(BLOCK x C)
    weights = torch.cat(blocks)
    assert weights.dtype == torch.float64
    assert bool((weights >= 0).all()) and torch.equal(weights, weights.round())
    assert bool((weights.sum(1) == n_ctx).all())  # each replicate draws C contexts with replacement
    assert torch.equal(weights, torch.cat(list(resampler.blocks())))  # drawn anew, identically
    assert not torch.equal(weights, torch.cat(list(Resampler(n_ctx, n_boot, seed=6).blocks())))
    # every context is drawn about n_boot times in all
    assert abs(float(weights.sum(0).mean()) - n_boot) < 1e-9


def test_paired_interval_is_numpys_percentile_of_the_resampled_means() -> None:
    rng = np.random.default_rng(0)
    n_ctx = 50
    table = np.zeros((n_ctx, 3))
    table[:, P_N] = rng.integers(1, 128, n_ctx)
    table[:, P_COS] = table[:, P_N] * rng.uniform(0.5, 1.0, n_ctx)
    table[:, P_EUC] = table[:, P_N] * rng.uniform(1.0, 9.0, n_ctx)
    resampler = Resampler(n_ctx, 1000, seed=3)
    weights = torch.cat(list(resampler.blocks())).numpy()
    sums = weights @ table
    got = paired_intervals(torch.from_numpy(table), resampler)
    for key, col in (("resid_cosine_mean", P_COS), ("resid_euclidean_mean", P_EUC)):
        expected = np.percentile(sums[:, col] / sums[:, P_N], [2.5, 97.5])
        np.testing.assert_allclose(got[key], expected, rtol=1e-12)
        point = table[:, col].sum() / table[:, P_N].sum()
        assert got[key][0] < point < got[key][1]
