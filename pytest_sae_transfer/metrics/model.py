"""Per-model streaming statistics: L0, CE (clean, spliced, zero-ablated), KL,
explained variance, pooled R², MSE, cosine, densities and the non-finite count.

Scalars are kept twice: as running totals, and as a few float64 numbers per
context, so that the bootstrap can resample whole contexts at the end without a
second pass. The only per-context vector is Σx (length d_in), needed for the
per-dimension mean of ``explained_variance``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .entries import FeatureEntries, feature_entries
from .stats import RowTable

# Columns of the per-context statistics table.
N_EVAL, L0_SUM, CE_N, CE_CLEAN, CE_SPLICED, CE_ZERO, KL_N, KL_SUM = range(8)
REC_N, SSE, SXX, S_ELEM, COS_SUM, N_INCLUDED, N_NONFINITE, N_OUTLIER = range(8, 16)
N_NONFINITE_LOSS = 16
N_COLUMNS = 17

#: Fixed bins for the streamed log10 feature-activation histogram.
ACT_LOG10_EDGES = torch.linspace(-5.0, 4.0, 181, dtype=torch.float64)


@dataclasses.dataclass
class ModelBatch:
    """One batch of one model, everything on the same device.

    ``x``/``x_hat`` are [B, T, d_in] and ``feats`` is [B, T, d_sae], all float32.
    ``ce_*`` are [B, T-1] per-position losses (position p predicts token p+1);
    ``kl`` is [B, T]. ``included`` and ``outlier`` are bool [B, T]. ``ce_*`` and
    ``kl`` may be None when only the activation statistics are wanted.
    """

    x: torch.Tensor
    x_hat: torch.Tensor
    feats: torch.Tensor
    included: torch.Tensor
    outlier: torch.Tensor
    ce_clean: torch.Tensor | None = None
    ce_spliced: torch.Tensor | None = None
    ce_zero: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    x_spliced: torch.Tensor | None = None  # the engine's spliced input, until its continuation has run
    finite: torch.Tensor | None = None  # finite_mask(), once computed (three readers per batch)
    #: True: the statistics read the features as their nonzero entries (``entries()``),
    #: not densely; the engine sets it for SAEs whose features are sparse.
    sparse: bool = False
    _entries: FeatureEntries | None = None

    def finite_mask(self) -> torch.Tensor:
        """bool [B, T]: the token's activation, features and reconstruction are all finite
        (``nonfinite_fraction`` counts the included tokens where this is False)."""
        if self.finite is None:
            self.finite = rows_finite(self.x) & rows_finite(self.x_hat) & rows_finite(self.feats)
        return self.finite

    def entries(self) -> FeatureEntries:
        """The nonzero features on the evaluated tokens (included and finite), computed once."""
        if self._entries is None:
            self._entries = feature_entries(self.feats, self.included & self.finite_mask())
        return self._entries

    def release(self) -> None:
        """Drop the dense features and the reconstruction once every statistic has read them."""
        self.feats = self.x_hat = _SPENT
        self._entries = None

    def loss_finite_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ce_ok [B, T-1], kl_ok [B, T]): where the three CE values, and the KL, are finite.

        A NaN activation at one position reaches the logits of every other position of
        its context through attention (0 x NaN in pattern @ v), so a loss can be NaN
        where the activation itself is finite: such positions leave only the loss means,
        and are counted in ``n_nonfinite_loss``."""
        assert self.ce_clean is not None and self.ce_spliced is not None and self.ce_zero is not None and self.kl is not None
        ce_ok = torch.isfinite(self.ce_clean) & torch.isfinite(self.ce_spliced) & torch.isfinite(self.ce_zero)
        return ce_ok, torch.isfinite(self.kl)


_SPENT = torch.empty(0)


def rows_finite(t: torch.Tensor) -> torch.Tensor:
    """bool [...]: every value along the last dimension is finite.

    A sum is finite only if every term is (a NaN or an infinity survives any sum), so one
    reduction decides almost every row; rows whose sum is not finite (a non-finite value,
    or finite values whose sum overflows) are looked at element by element."""
    ok = torch.isfinite(t.sum(-1))
    if not bool(ok.all()):
        bad = ~ok
        ok[bad] = torch.isfinite(t[bad]).all(-1)
    return ok


@dataclasses.dataclass
class BatchStats:
    """One batch's contribution to a :class:`ModelAccumulator`, measured without touching it:
    a batch that fails half-way (out of memory) is retried, never counted twice."""

    stats: torch.Tensor  # float64 [B, N_COLUMNS]
    sum_x: torch.Tensor  # float64 [B, d_in]
    fire: torch.Tensor  # float64 [d_sae] on the CPU: firings per feature
    act_hist: torch.Tensor  # float64 [bins]
    zero_acts: float
    evaluated: torch.Tensor  # bool [B, T]


class ModelAccumulator:
    """Streams :class:`ModelBatch` objects for one model and yields its metrics (docs/metrics.md)."""

    def __init__(self, d_in: int, d_sae: int, with_losses: bool = True) -> None:
        self.d_in = d_in
        self.d_sae = d_sae
        self.with_losses = with_losses
        self._context_stats = RowTable(N_COLUMNS)
        self._context_sum_x = RowTable(d_in)
        self.fire_count = torch.zeros(d_sae, dtype=torch.float64)
        self.act_hist = torch.zeros(len(ACT_LOG10_EDGES) - 1, dtype=torch.float64)
        self.zero_act_count = 0.0

    @property
    def n_contexts(self) -> int:
        return self._context_stats.n_rows

    @torch.no_grad()
    def update(self, batch: ModelBatch, finite: torch.Tensor | None = None) -> torch.Tensor:
        """Add one batch (with its losses, when this accumulator takes them); returns the bool
        [B, T] mask of tokens that were evaluated."""
        st = self.measure(batch, finite)
        if self.with_losses:
            if batch.ce_clean is None or batch.kl is None:
                raise ValueError("this accumulator needs CE and KL values")
            self.measure_losses(st, batch)
        self.commit(st)
        return st.evaluated

    @torch.no_grad()
    def measure(self, batch: ModelBatch, finite: torch.Tensor | None = None) -> BatchStats:
        """One batch's activation statistics, without touching the accumulator."""
        if finite is None:
            finite = batch.finite_mask()
        included = batch.included
        evaluated = included & finite
        recon = evaluated & ~batch.outlier
        B, T = included.shape
        f64 = torch.float64
        stats = torch.zeros(B, N_COLUMNS, dtype=f64, device=included.device)

        stats[:, N_INCLUDED] = included.sum(1, dtype=f64)
        stats[:, N_NONFINITE] = (included & ~finite).sum(1, dtype=f64)
        stats[:, N_OUTLIER] = (included & batch.outlier).sum(1, dtype=f64)
        stats[:, N_EVAL] = evaluated.sum(1, dtype=f64)

        if batch.sparse:
            # The nonzero entries of the evaluated tokens, shared with the top-k and paired sums
            # (a finite mask given here, rather than the batch's own, gets entries of its own).
            e = batch.entries() if finite is batch.finite else feature_entries(batch.feats, evaluated)
            stats[:, L0_SUM] = torch.bincount(torch.div(e.rows, T, rounding_mode="floor"), minlength=B).to(f64)
            fire = torch.bincount(e.cols, minlength=self.d_sae).to(device="cpu", dtype=f64)
            values = e.values
        else:
            # Zero out everything that is not evaluated before any reduction, so that a
            # NaN in an excluded token cannot leak into the sums (it is counted instead).
            feats = torch.where(evaluated.unsqueeze(-1), batch.feats, 0.0)
            active = feats != 0
            # integer counts (exact, and cheaper than summing the mask as float64)
            stats[:, L0_SUM] = active.sum((1, 2)).to(f64)
            fire = active.sum((0, 1)).to(device="cpu", dtype=f64)
            values = feats[active]
        nonzero = values.abs().clamp_min(1e-30).log10().to(f64)
        lo, hi = float(ACT_LOG10_EDGES[0]), float(ACT_LOG10_EDGES[-1])
        n_bins = len(ACT_LOG10_EDGES) - 1
        act_hist = torch.histc(nonzero.clamp(lo, hi - 1e-9), bins=n_bins, min=lo, max=hi).cpu()
        zero_acts = float(evaluated.sum()) * self.d_sae - float(values.numel())

        rc = recon.unsqueeze(-1)
        x = torch.where(rc, batch.x, 0.0).to(f64)
        x_hat = torch.where(rc, batch.x_hat, 0.0).to(f64)
        err = x - x_hat
        stats[:, REC_N] = recon.sum(1, dtype=f64)
        stats[:, SSE] = (err * err).sum((1, 2))
        stats[:, SXX] = (x * x).sum((1, 2))
        stats[:, S_ELEM] = x.sum((1, 2))
        norms = x.norm(dim=-1) * x_hat.norm(dim=-1)
        cos = (x * x_hat).sum(-1) / norms.clamp_min(1e-30)
        stats[:, COS_SUM] = torch.where(recon, cos, 0.0).sum(1)
        return BatchStats(stats=stats, sum_x=x.sum(1), fire=fire, act_hist=act_hist, zero_acts=zero_acts, evaluated=evaluated)

    @staticmethod
    @torch.no_grad()
    def measure_losses(st: BatchStats, losses: ModelBatch) -> None:
        """Fill ``st``'s loss columns from ``losses``' per-position CE and KL."""
        f64 = torch.float64
        stats, evaluated = st.stats, st.evaluated
        ce_ok, kl_ok = losses.loss_finite_masks()
        ce_pos = evaluated[:, :-1] & ce_ok
        kl_pos = evaluated & kl_ok
        loss_bad = evaluated & ~kl_ok
        loss_bad[:, :-1] |= evaluated[:, :-1] & ~ce_ok
        stats[:, N_NONFINITE_LOSS] = loss_bad.sum(1, dtype=f64)
        stats[:, CE_N] = ce_pos.sum(1, dtype=f64)
        for col, ce in ((CE_CLEAN, losses.ce_clean), (CE_SPLICED, losses.ce_spliced), (CE_ZERO, losses.ce_zero)):
            stats[:, col] = torch.where(ce_pos, ce, 0.0).sum(1, dtype=f64)
        stats[:, KL_N] = kl_pos.sum(1, dtype=f64)
        stats[:, KL_SUM] = torch.where(kl_pos, losses.kl, 0.0).sum(1, dtype=f64)

    def commit(self, st: BatchStats) -> None:
        """Add a measured batch to the totals."""
        self.fire_count += st.fire
        self.act_hist += st.act_hist
        self.zero_act_count += st.zero_acts
        self._context_stats.append(st.stats)
        self._context_sum_x.append(st.sum_x)

    # -- results ---------------------------------------------------------------

    def context_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([C, N_COLUMNS], [C, d_in]) per-context sums, float64 on CPU."""
        return self._context_stats.table(), self._context_sum_x.table()

    @property
    def n_eval(self) -> float:
        stats, _ = self.context_tables()
        return float(stats[:, N_EVAL].sum())

    def densities(self) -> torch.Tensor:
        n = self.n_eval
        return self.fire_count / n if n > 0 else torch.full_like(self.fire_count, float("nan"))

    def summary(self) -> dict[str, Any]:
        """The per-model metrics as plain Python numbers."""
        stats, sum_x = self.context_tables()
        values = scalar_metrics(stats.sum(0), sum_x.sum(0), self.d_in)
        out: dict[str, Any] = {"n_tokens": int(stats[:, N_INCLUDED].sum())}
        for key, value in values.items():
            if not self.with_losses and (key.startswith("ce_") or key.startswith("kl_")):
                continue
            out[key] = float(value)
        dens = self.densities()
        out["dead_fraction"] = float((self.fire_count == 0).double().mean())
        out["dense_fraction"] = float((dens > 0.1).double().mean())
        out["n_nonfinite"] = int(stats[:, N_NONFINITE].sum())
        out["n_outliers"] = int(stats[:, N_OUTLIER].sum())
        if self.with_losses:
            # included tokens with a finite activation whose CE or KL was not finite:
            # left out of the loss means only
            out["n_nonfinite_loss"] = int(stats[:, N_NONFINITE_LOSS].sum())
            # The same as a fraction, so a profile can gate on it (default max 0).
            n_included = float(stats[:, N_INCLUDED].sum())
            out["nonfinite_loss_fraction"] = out["n_nonfinite_loss"] / n_included if n_included else float("nan")
        return out

    def histograms(self) -> dict[str, dict[str, Any]]:
        return {
            "feature_log10_act": {"edges": ACT_LOG10_EDGES.numpy(), "counts": self.act_hist.numpy()},
            "feature_zero_count": {"edges": torch.zeros(0).numpy(), "counts": torch.tensor([self.zero_act_count]).numpy()},
        }


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, NaN where den is 0 (an empty count, or zero-ablation equal to clean)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.nan)


#: The keys :func:`scalar_metrics` returns.
SCALAR_METRIC_KEYS = (
    "l0", "ce_loss_clean", "ce_loss_spliced", "ce_loss_delta", "ce_loss_zero_ablation", "ce_loss_recovered",
    "kl_div_spliced", "explained_variance", "r2_pooled", "mse", "cossim", "outlier_fraction", "nonfinite_fraction",
)


def scalar_metrics(s: torch.Tensor, sum_x: torch.Tensor, d_in: int) -> dict[str, torch.Tensor]:
    """The scalar metrics from summed statistics.

    ``s`` is [..., N_COLUMNS] and ``sum_x`` [..., d_in]; a leading dimension holds
    bootstrap replicates, so point estimates and intervals share one formula.
    """
    out: dict[str, torch.Tensor] = {}
    out["l0"] = _div(s[..., L0_SUM], s[..., N_EVAL])
    clean = _div(s[..., CE_CLEAN], s[..., CE_N])
    spliced = _div(s[..., CE_SPLICED], s[..., CE_N])
    zero = _div(s[..., CE_ZERO], s[..., CE_N])
    out["ce_loss_clean"] = clean
    out["ce_loss_spliced"] = spliced
    out["ce_loss_delta"] = spliced - clean
    out["ce_loss_zero_ablation"] = zero
    out["ce_loss_recovered"] = _div(zero - spliced, zero - clean)
    out["kl_div_spliced"] = _div(s[..., KL_SUM], s[..., KL_N])

    n = s[..., REC_N]
    mse = _div(s[..., SSE], n)
    mean_x = sum_x / torch.where(n > 0, n, torch.ones_like(n)).unsqueeze(-1)
    total_var = _div(s[..., SXX], n) - (mean_x * mean_x).sum(-1)
    # sae_lens 6.54: a constant activation explains everything iff it is reconstructed exactly.
    degenerate = total_var < 1e-10
    ev = 1.0 - mse / torch.where(degenerate, torch.ones_like(total_var), total_var)
    ev = torch.where(degenerate, torch.where(mse < 1e-10, 1.0, 0.0).to(ev.dtype), ev)
    out["explained_variance"] = torch.where(n > 0, ev, torch.nan)
    n_elem = n * d_in
    ss_tot = s[..., SXX] - _div(s[..., S_ELEM] ** 2, n_elem)
    out["r2_pooled"] = 1.0 - _div(s[..., SSE], ss_tot)
    out["mse"] = mse
    out["cossim"] = _div(s[..., COS_SUM], n)
    out["outlier_fraction"] = _div(s[..., N_OUTLIER], s[..., N_INCLUDED])
    out["nonfinite_fraction"] = _div(s[..., N_NONFINITE], s[..., N_INCLUDED])
    return out
