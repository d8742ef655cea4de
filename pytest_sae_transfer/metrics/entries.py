"""A batch's feature activations as a list of its nonzero entries.

Why: an SAE's features are sparse (an L0 of tens out of thousands), and every per-feature
statistic of a batch (firing counts, L0, the activation histogram, the top-k candidates,
the paired Pearson sums and the dead-feature error) only needs the nonzero entries. One
``nonzero`` per (model, SAE, batch), shared by all of them, replaces a dozen passes over
the dense [tokens, d_sae] tensor (masked copies, comparisons, float64 conversions).

The dense path stays for SAEs that are not sparse: a list of entries costs 12 bytes per
entry against 4 per dense element, so above ``SPARSE_MAX_DENSITY`` the engine keeps to the
dense tensor (see :class:`DensityGate`). Both paths give the same numbers: the same
per-entry values, summed in float64 in another order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

#: Above this fraction of nonzero entries the dense path is used. Time: on a CPU the entries
#: were faster up to about 0.3 (1024 features, random positions). Memory: an entry costs 12
#: bytes against 4 for a dense element, so at 1/4 the two models' lists together are 1.5
#: dense [tokens, d_sae] tensors, against the masked dense copy (1) the entries replace.
SPARSE_MAX_DENSITY = 0.25


@dataclasses.dataclass(frozen=True)
class FeatureEntries:
    """The nonzero activations of a [B, T, d_sae] batch on the tokens it keeps, in row-major
    order (token by token, features ascending within a token).

    ``rows`` are flat token indices (``b * T + t``) and ``cols`` feature ids, both int32 (an
    entry costs 12 bytes); ``values`` float32. ``keep``
    (bool [B * T]) is the token mask the entries were taken on: tokens outside it contribute
    no entry, whatever they hold (a NaN there is counted by the caller, never summed).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    keep: torch.Tensor
    d_sae: int

    @property
    def n_tokens(self) -> int:
        return int(self.keep.numel())

    def flat(self) -> torch.Tensor:
        """int64 indices into the batch's flattened [B * T * d_sae] features."""
        return self.rows.long() * self.d_sae + self.cols

    def restricted(self, mask: torch.Tensor) -> FeatureEntries:
        """The entries on the tokens where ``mask`` (bool, [B, T] or B * T, within ``keep``) is True."""
        mask = mask.reshape(-1).to(self.keep.device)
        if torch.equal(mask, self.keep):
            return self
        sel = mask[self.rows].nonzero().squeeze(1)
        return FeatureEntries(*(t.index_select(0, sel) for t in (self.rows, self.cols, self.values)), mask, self.d_sae)

    def to(self, device: torch.device) -> FeatureEntries:
        if self.values.device == device:
            return self
        return FeatureEntries(*(t.to(device) for t in (self.rows, self.cols, self.values, self.keep)), self.d_sae)


def feature_entries(feats: torch.Tensor, keep: torch.Tensor) -> FeatureEntries:
    """The entries of ``feats`` [B, T, d_sae] that are nonzero on tokens where ``keep`` [B, T] is True."""
    B, T, D = feats.shape
    values = feats.reshape(-1)
    flat = _flat_nonzero(values)
    rows = torch.div(flat, D, rounding_mode="floor")
    keep = keep.reshape(-1).to(feats.device)
    if not bool(keep.all()):
        sel = keep[rows].nonzero().squeeze(1)
        flat, rows = flat.index_select(0, sel), rows.index_select(0, sel)
    i32 = torch.int32
    return FeatureEntries(rows.to(i32), (flat - rows * D).to(i32), values.index_select(0, flat).to(torch.float32), keep, D)


def _flat_nonzero(values: torch.Tensor) -> torch.Tensor:
    """int64 indices of the nonzero elements of a 1-d tensor (NaN counts as nonzero), ascending."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64, torch.float16):
        # On a CPU, numpy's comparison and nonzero take about half the time of torch's (1 ms
        # against 2.3 for a million float32 values at 5% density, one thread).
        return torch.from_numpy(np.flatnonzero(values.detach().numpy() != 0))
    return values.nonzero().squeeze(1)


class DensityGate:
    """Chooses, per SAE, whether its features are read as entries or densely.

    The first batch is read densely (nothing is known yet, and a dense SAE's entry list
    could be several times the batch); afterwards the entries are used as long as every
    batch seen so far, on every model, had at most ``SPARSE_MAX_DENSITY`` nonzero entries.
    Once dense, an SAE stays dense for the run.
    """

    def __init__(self, max_density: float | None = None) -> None:
        self.max_density = SPARSE_MAX_DENSITY if max_density is None else max_density
        self._densest: dict[str, float] = {}

    def sparse(self, key: str) -> bool:
        densest = self._densest.get(key)
        return densest is not None and densest <= self.max_density

    def observe(self, key: str, n_nonzero: float, n_elements: float) -> None:
        """Record one model's batch of SAE ``key``: its nonzero entries among ``n_elements``
        (evaluated tokens x d_sae)."""
        density = n_nonzero / n_elements if n_elements > 0 else 0.0
        self._densest[key] = max(density, self._densest.get(key, 0.0))
