"""Small numeric helpers shared by the accumulators."""

from __future__ import annotations

import torch

#: log10(density + EPS) is a feature's log-density (docs/metrics.md); the same EPS is used
#: for the dead-feature activation error.
LOG_EPS = 1e-10


def pearson_from_sums(
    n: torch.Tensor | float,
    sum_a: torch.Tensor,
    sum_b: torch.Tensor,
    sum_aa: torch.Tensor,
    sum_bb: torch.Tensor,
    sum_ab: torch.Tensor,
) -> torch.Tensor:
    """Pearson correlation from streamed sums; NaN where either side has zero variance."""
    n = torch.as_tensor(n, dtype=torch.float64)
    cov = n * sum_ab - sum_a * sum_b
    var_a = n * sum_aa - sum_a * sum_a
    var_b = n * sum_bb - sum_b * sum_b
    # Relative tolerance: a variance that is a rounding residue of n*Σa² − (Σa)² is zero.
    tol_a = 1e-12 * (n * sum_aa).abs()
    tol_b = 1e-12 * (n * sum_bb).abs()
    defined = (var_a > tol_a) & (var_b > tol_b)
    denom = torch.sqrt(var_a.clamp_min(0) * var_b.clamp_min(0))
    corr = torch.where(defined, cov / torch.where(defined, denom, torch.ones_like(denom)), torch.nan)
    return corr.clamp(-1.0, 1.0)


def rowwise_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between matching rows of two [rows, n] matrices (float64 out)."""
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    num = (a * b).sum(dim=1)
    den = torch.sqrt((a * a).sum(dim=1) * (b * b).sum(dim=1))
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.nan)


class RowTable:
    """Per-context rows (float64, CPU), appended a batch at a time into one buffer that
    doubles when full.

    Keeping one small tensor per batch in a list instead leaves thousands of small,
    long-lived allocations interleaved with each batch's large transient ones; glibc's
    heap then can neither reuse nor release the holes between them, and the process
    RSS grew by about one batch of SAE features per batch (a ~1 GB rise from 16k to
    256k tokens on the toy zoo), although nothing was retained.
    """

    def __init__(self, n_cols: int, capacity: int = 64) -> None:
        self.n_cols = n_cols
        self._buf = torch.zeros(capacity, n_cols, dtype=torch.float64)
        self.n_rows = 0

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(device="cpu", dtype=torch.float64)
        end = self.n_rows + rows.shape[0]
        if end > self._buf.shape[0]:
            grown = torch.zeros(max(end, 2 * self._buf.shape[0]), self.n_cols, dtype=torch.float64)
            grown[: self.n_rows] = self._buf[: self.n_rows]
            self._buf = grown
        self._buf[self.n_rows : end] = rows
        self.n_rows = end

    def table(self) -> torch.Tensor:
        """[rows, n_cols], a copy."""
        return self._buf[: self.n_rows].clone()
