"""Base-vs-finetune statistics on the same tokens, streamed.

Per feature it keeps the five Pearson sums (Σa, Σb, Σa², Σb², Σab) and the sum of
|log10(a+ε) − log10(b+ε)| for *every* feature, so the "regular" and "dead in one
model" sets can be chosen after the pass from the final densities, with no
second pass and no [tokens x d_sae] tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .entries import FeatureEntries
from .stats import LOG_EPS, RowTable

#: Fixed histogram bins for per-token residual similarity.
COSINE_EDGES = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64)
EUCLID_LOG10_EDGES = torch.linspace(-4.0, 5.0, 181, dtype=torch.float64)

# Per-context columns, for the bootstrap of the residual means.
P_N, P_COS, P_EUC = range(3)


@dataclasses.dataclass
class PairBatchStats:
    """One batch's contribution to a :class:`PairedAccumulator`, measured without touching it."""

    n: float
    sums: torch.Tensor  # float64 [6, d_sae]: Σa, Σb, Σa², Σb², Σab, Σ|log err|, on the CPU
    pos: torch.Tensor  # float64 [3, T]: count, cosine sum, distance sum per position
    context: torch.Tensor  # float64 [B, 3]
    cos_hist: torch.Tensor
    euc_hist: torch.Tensor


class PairedAccumulator:
    def __init__(self, d_sae: int, context_size: int, chunk_elems: int = 1 << 22) -> None:
        f64 = torch.float64
        self.d_sae = d_sae
        #: The feature sums read the masked tokens in row blocks of about this many elements,
        #: so the per-batch transient is a few such blocks, not several [tokens, d_sae] copies.
        self.chunk_elems = chunk_elems
        self.context_size = context_size
        self.n = 0.0
        self.sum_a = torch.zeros(d_sae, dtype=f64)
        self.sum_b = torch.zeros(d_sae, dtype=f64)
        self.sum_aa = torch.zeros(d_sae, dtype=f64)
        self.sum_bb = torch.zeros(d_sae, dtype=f64)
        self.sum_ab = torch.zeros(d_sae, dtype=f64)
        self.sum_log_err = torch.zeros(d_sae, dtype=f64)
        self.pos_n = torch.zeros(context_size, dtype=f64)
        self.pos_cos = torch.zeros(context_size, dtype=f64)
        self.pos_euc = torch.zeros(context_size, dtype=f64)
        self.cos_hist = torch.zeros(len(COSINE_EDGES) - 1, dtype=f64)
        self.euc_hist = torch.zeros(len(EUCLID_LOG10_EDGES) - 1, dtype=f64)
        self._context_stats = RowTable(3)

    @torch.no_grad()
    def update(self, x_base: torch.Tensor, x_ft: torch.Tensor, f_base: torch.Tensor, f_ft: torch.Tensor, mask: torch.Tensor) -> None:
        """x_*: [B, T, d_in]; f_*: [B, T, d_sae]; mask: bool [B, T] of tokens to use."""
        self.commit(self.measure(x_base, x_ft, f_base, f_ft, mask))

    @torch.no_grad()
    def measure(self, x_base: torch.Tensor, x_ft: torch.Tensor, f_base: torch.Tensor, f_ft: torch.Tensor, mask: torch.Tensor,
                entries: tuple[FeatureEntries, FeatureEntries] | None = None) -> PairBatchStats:
        """One batch's sums, without touching the accumulator. ``entries``, when given, are
        both models' nonzero features on (at least) the tokens of ``mask``: the feature sums
        are then taken from them instead of the dense tensors (the same sums)."""
        f64 = torch.float64
        xb = x_base.to(f64)
        xf = x_ft.to(f64)
        cos = (xb * xf).sum(-1) / (xb.norm(dim=-1) * xf.norm(dim=-1)).clamp_min(1e-30)
        euc = (xb - xf).norm(dim=-1)
        m = mask.to(f64)
        cos = torch.where(mask, cos, 0.0)
        euc = torch.where(mask, euc, 0.0)
        sel_cos = cos[mask]
        sel_euc = euc[mask].clamp_min(1e-30).log10()

        if entries is None:
            sums, n = self._feature_sums(f_base, f_ft, mask)
        else:
            sums, n = _entry_feature_sums(f_base, f_ft, mask, *entries)
        return PairBatchStats(
            n=float(n),
            sums=sums.cpu(),
            pos=torch.stack([m.sum(0), cos.sum(0), euc.sum(0)]).cpu(),
            context=torch.stack([m.sum(1), cos.sum(1), euc.sum(1)], dim=1),
            cos_hist=_hist(sel_cos, COSINE_EDGES).cpu(),
            euc_hist=_hist(sel_euc, EUCLID_LOG10_EDGES).cpu(),
        )

    def _feature_sums(self, f_base: torch.Tensor, f_ft: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """float64 [6, d_sae] (Σa, Σb, Σa², Σb², Σab, Σ|log err|) over the masked tokens, and their count.

        The masked rows are read a block at a time (``chunk_elems``): products in float32 as
        the features are, sums in float64, so that no [tokens, d_sae] copy (nor its float64
        image) is ever formed whole."""
        f64 = torch.float64
        D = f_base.shape[-1]
        fa, fb = f_base.reshape(-1, D), f_ft.reshape(-1, D)
        idx = mask.reshape(-1).nonzero().squeeze(1)
        sums = torch.zeros(6, D, dtype=f64, device=fa.device)
        step = max(1, self.chunk_elems // max(1, D))
        for start in range(0, idx.numel(), step):
            i = idx[start : start + step]
            a, b = fa.index_select(0, i), fb.index_select(0, i)
            sums[0] += a.sum(0, dtype=f64)
            sums[1] += b.sum(0, dtype=f64)
            sums[2] += (a * a).sum(0, dtype=f64)
            sums[3] += (b * b).sum(0, dtype=f64)
            sums[4] += (a * b).sum(0, dtype=f64)
            # The dead-feature error: |log10(max(a,0)+ε) − log10(max(b,0)+ε)|, summed per
            # feature. Where neither activation is positive the term is exactly 0, so only the
            # (sparse) entries where one is positive are evaluated.
            rows, cols = ((a > 0) | (b > 0)).nonzero(as_tuple=True)
            log_a = _log_act(a[rows, cols])
            log_b = _log_act(b[rows, cols])
            sums[5].index_add_(0, cols, log_a.sub_(log_b).abs_())
        return sums, int(idx.numel())

    def commit(self, st: PairBatchStats) -> None:
        """Add a measured batch to the totals."""
        T = st.pos.shape[1]
        self.pos_n[:T] += st.pos[0]
        self.pos_cos[:T] += st.pos[1]
        self.pos_euc[:T] += st.pos[2]
        self._context_stats.append(st.context)
        self.cos_hist += st.cos_hist
        self.euc_hist += st.euc_hist
        self.n += st.n
        for total, part in zip((self.sum_a, self.sum_b, self.sum_aa, self.sum_bb, self.sum_ab, self.sum_log_err), st.sums):
            total += part

    def context_table(self) -> torch.Tensor:
        return self._context_stats.table()

    def by_position(self) -> tuple[list[float | None], list[float | None]]:
        cos = [float(c / n) if n > 0 else None for c, n in zip(self.pos_cos, self.pos_n)]
        euc = [float(e / n) if n > 0 else None for e, n in zip(self.pos_euc, self.pos_n)]
        return cos, euc

    def histograms(self) -> dict[str, dict[str, Any]]:
        return {
            "resid_cosine": {"edges": COSINE_EDGES.numpy(), "counts": self.cos_hist.numpy()},
            "resid_euclidean_log10": {"edges": EUCLID_LOG10_EDGES.numpy(), "counts": self.euc_hist.numpy()},
        }


def _log_act(v: torch.Tensor) -> torch.Tensor:
    """log10(max(v, 0) + ε) in float64: the dead-feature error's side of one activation."""
    return v.clamp_min(0).to(torch.float64).add_(LOG_EPS).log10_()


def _entry_feature_sums(f_base: torch.Tensor, f_ft: torch.Tensor, mask: torch.Tensor, e_base: FeatureEntries,
                        e_ft: FeatureEntries) -> tuple[torch.Tensor, int]:
    """:meth:`PairedAccumulator._feature_sums` from the two models' nonzero entries.

    A zero contributes nothing to Σa, Σa², Σab, and where both activations are zero (or
    negative) the dead-feature error term is 0, so every term comes from an entry: each
    base entry (with the finetune's value at that place, zero or not), and each finetune
    entry where the base is zero. The per-term values are the dense path's."""
    f64 = torch.float64
    D = f_base.shape[-1]
    fa, fb = f_base.reshape(-1), f_ft.reshape(-1)
    a, b = e_base.restricted(mask), e_ft.restricted(mask)
    b_at_a = fb.index_select(0, a.flat())
    a_at_b = fa.index_select(0, b.flat())
    sums = torch.zeros(6, D, dtype=f64, device=fa.device)
    sums[0].index_add_(0, a.cols, a.values.to(f64))
    sums[1].index_add_(0, b.cols, b.values.to(f64))
    sums[2].index_add_(0, a.cols, (a.values * a.values).to(f64))
    sums[3].index_add_(0, b.cols, (b.values * b.values).to(f64))
    sums[4].index_add_(0, a.cols, (a.values * b_at_a).to(f64))
    sums[5].index_add_(0, a.cols, _log_act(a.values).sub_(_log_act(b_at_a)).abs_())
    # the finetune's entries where the base is zero (the others were counted with the base's)
    only_ft = _log_act(a_at_b).sub_(_log_act(b.values)).abs_().masked_fill_(a_at_b != 0, 0.0)
    sums[5].index_add_(0, b.cols, only_ft)
    return sums, int(mask.sum())


def _hist(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    lo, hi = float(edges[0]), float(edges[-1])
    v = values.to(torch.float64).clamp(lo, hi - 1e-9)
    return torch.histc(v, bins=len(edges) - 1, min=lo, max=hi)
