"""Paired metrics that come from the weights alone: logit similarity, the unembedding
norm ratio and the per-block weight deviation."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Unembedding:
    """A model's unembedding as it holds it, W [d_model, d_vocab] (no copy), and the final
    normalisation's weight ``scale`` [d_model] still to be folded in (None: nothing to fold).

    The folded matrix diag(scale) W is never formed whole: the weight metrics scale each
    vocabulary chunk's rows as they read it, and the promoted tokens scale the decoder rows
    instead (d · diag(s) W = (d ∘ s) · W)."""

    W: torch.Tensor
    scale: torch.Tensor | None = None

    def folded(self) -> torch.Tensor:
        """diag(scale) W as one tensor (a [d_model, d_vocab] copy when there is a scale)."""
        return self.W if self.scale is None else self.scale.to(self.W.dtype).unsqueeze(1) * self.W


def unembedding(model: Any) -> Unembedding:
    """The model's W_U and, when TransformerLens has not folded it (``fold_ln=False``), the
    final normalisation's weight: what ``fold_ln`` would have multiplied into W_U's rows."""
    ln_final = getattr(model, "ln_final", None)
    w = getattr(ln_final, "w", None) if ln_final is not None else None
    return Unembedding(model.W_U.detach(), w.detach() if isinstance(w, torch.Tensor) else None)


def folded_unembed(model: Any) -> torch.Tensor:
    """W_U [d_model, d_vocab] with the final normalisation's weight folded in (a copy when
    there is one to fold; the engine uses :func:`unembedding` and folds chunk by chunk)."""
    return unembedding(model).folded()


def _as_unembedding(W: torch.Tensor | Unembedding) -> Unembedding:
    return W if isinstance(W, Unembedding) else Unembedding(W, None)


def _block(W: torch.Tensor, scale: torch.Tensor | None, cols: slice) -> torch.Tensor:
    """float64 copy of W[:, cols], its rows multiplied by ``scale`` (the fold, on the fly)."""
    c = W[:, cols].to(torch.float64, copy=True)
    if scale is not None:
        c.mul_(scale.to(device=c.device, dtype=W.dtype).to(torch.float64).unsqueeze(1))
    return c


@torch.no_grad()
def logit_similarity(
    W_dec: torch.Tensor,
    W_U_base: torch.Tensor | Unembedding,
    W_U_ft: torch.Tensor | Unembedding,
    n_vocab: int,
    chunk_elems: int = 1 << 25,
) -> torch.Tensor:
    """Per-feature Pearson correlation of W_dec[i]·W_U over the shared vocabulary.

    The correlation of u = d·Wb and v = d·Wf over the vocabulary needs only Σu, Σv,
    Σu², Σv², Σuv, and these factor through d_model-sized matrices. With the
    unembeddings centred over the vocabulary (Wc = W − mean over tokens, which
    leaves every Pearson correlation unchanged and makes Σu = Σv = 0 exactly), the
    variances are the quadratic forms d Gb dᵀ and d Gf dᵀ of the Gram matrices
    G = Wc Wcᵀ [d_model, d_model], and the covariance is d Gbf dᵀ, where only the
    symmetric part of Wb Wfᵀ matters: (Gb + Gf − GΔ)/2 with GΔ the Gram matrix of
    Δ = Wbc − Wfc. So the cost is three d_model² x n_vocab Gram products (one when
    the two unembeddings are equal) instead of 2 x d_sae x d_model x n_vocab logit
    weights, and nothing of size d_sae x n_vocab is formed.

    Everything is float64: the centring (a first pass for the means, so no
    n·Σu² − (Σu)² cancellation), the Gram matrices (accumulated over vocabulary
    chunks of about ``chunk_elems`` float64 elements in all) and the quadratic forms (in
    feature chunks). The base Gram matrix is reused while the same, unmodified
    ``W_U_base`` tensor comes back (one per finetune of a run).

    Either unembedding may be an :class:`Unembedding` whose final-norm weight is not
    folded in yet: each vocabulary chunk is scaled as it is read, so no folded
    [d_model, d_vocab] copy exists, only the float64 chunks.

    Returns float64 [d_sae] on CPU; NaN where either model's logit weights do not
    vary over the vocabulary (a variance that is zero, or only float64 rounding
    residue of the centring or of the Gram products; see ``_undefined``).
    """
    ub, uf = _as_unembedding(W_U_base), _as_unembedding(W_U_ft)
    device = ub.W.device
    d_sae = W_dec.shape[0]
    Wb = ub.W[:, :n_vocab]
    Wf = uf.W[:, :n_vocab].to(device)
    sb, sf = ub.scale, (uf.scale.to(device) if uf.scale is not None else None)
    same = Wb.dtype == Wf.dtype and torch.equal(Wb, Wf) and _same_scale(sb, sf)
    base = _base_gram(ub, n_vocab, chunk_elems)
    if same:
        G_f, mean_f, G_d = base.gram, base.mean, torch.zeros_like(base.gram)
    else:
        G_f, mean_f, G_d = _grams_ft(Wb, sb, Wf, sf, base.mean, chunk_elems)
    G_b, mean_b = base.gram, base.mean
    tr_b, tr_f = float(torch.trace(G_b)), float(torch.trace(G_f))
    stacked = torch.cat([G_b, G_f, G_d], dim=1)  # [d_model, 3 d_model]
    d_model = G_b.shape[0]
    out = torch.empty(d_sae, dtype=torch.float64)
    rows = max(1, min(d_sae, chunk_elems // max(1, 3 * d_model)))
    for start in range(0, d_sae, rows):
        D = W_dec[start : start + rows].to(device=device, dtype=torch.float64)
        DG = (D @ stacked).view(D.shape[0], 3, d_model)
        q = (DG * D.unsqueeze(1)).sum(-1)  # [rows, 3]: d Gb dᵀ, d Gf dᵀ, d GΔ dᵀ
        var_b, var_f, var_d = q.unbind(1)
        cov = (var_b + var_f - var_d) * 0.5
        dd = (D * D).sum(1)
        bad = _undefined(var_b, D @ mean_b, dd, tr_b, n_vocab) | _undefined(var_f, D @ mean_f, dd, tr_f, n_vocab)
        den = torch.sqrt(var_b.clamp_min(0) * var_f.clamp_min(0))
        r = (cov / torch.where(bad, torch.ones_like(den), den)).clamp_(-1.0, 1.0)
        out[start : start + rows] = torch.where(bad, torch.nan, r).cpu()
    return out


#: A variance below this fraction of the uncentred Σu² is left from the centring alone
#: (its float64 residue is ~1e-30 of it): the logit weights are constant over the vocabulary.
_REL_CENTRED = 1e-20
#: A variance below this fraction of ‖d‖² tr(G) is Gram/quadratic-form rounding
#: (≈ d_model x 1e-16 of it): the decoder row is (numerically) in the unembedding's
#: null space, so the logit weights do not vary.
_REL_GRAM = 1e-11


def _undefined(var: torch.Tensor, d_mean: torch.Tensor, dd: torch.Tensor, trace: float, n_vocab: int) -> torch.Tensor:
    uncentred = var + n_vocab * d_mean * d_mean  # Σ_v u_v² = d (Gc + n m mᵀ) dᵀ
    return (var <= 0) | (var <= _REL_CENTRED * uncentred) | (var <= _REL_GRAM * dd * trace)


class _Gram:
    __slots__ = ("key", "ref", "gram", "mean")

    def __init__(self, key: tuple, ref: Any, gram: torch.Tensor, mean: torch.Tensor) -> None:
        self.key, self.ref, self.gram, self.mean = key, ref, gram, mean


_BASE_CACHE: list[_Gram] = []  # at most one entry: the latest base unembedding


def _same_scale(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and torch.equal(a, b)


def _base_gram(ub: Unembedding, n_vocab: int, chunk_elems: int) -> _Gram:
    import weakref

    W_U_base, s = ub.W, ub.scale
    scale_key = None if s is None else (s.data_ptr(), s._version, tuple(s.shape), s.dtype, str(s.device))
    key = (W_U_base.data_ptr(), W_U_base._version, tuple(W_U_base.shape), W_U_base.stride(), W_U_base.dtype, str(W_U_base.device),
           scale_key, n_vocab, chunk_elems)
    if _BASE_CACHE:
        hit = _BASE_CACHE[0]
        if hit.key == key and hit.ref() is W_U_base:
            return hit
    Wb = W_U_base[:, :n_vocab]
    mean = _vocab_mean(Wb, s, chunk_elems)
    gram = torch.zeros(Wb.shape[0], Wb.shape[0], dtype=torch.float64, device=Wb.device)
    for cols in _vocab_chunks(Wb, chunk_elems):
        _add_gram(gram, _block(Wb, s, cols).sub_(mean.unsqueeze(1)))
    def forget(ref: Any) -> None:  # the tensor is gone: drop its Gram matrix
        if _BASE_CACHE and _BASE_CACHE[0].ref is ref:
            _BASE_CACHE.clear()

    entry = _Gram(key, weakref.ref(W_U_base, forget), gram, mean)
    _BASE_CACHE[:] = [entry]
    return entry


def _grams_ft(
    Wb: torch.Tensor, sb: torch.Tensor | None, Wf: torch.Tensor, sf: torch.Tensor | None, mean_b: torch.Tensor, chunk_elems: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Gf, mean_f, GΔ): the finetune's centred Gram matrix and that of the centred difference
    (``sb``/``sf``: final-norm weights folded into each chunk, or None)."""
    mean_f = _vocab_mean(Wf, sf, chunk_elems)
    d = Wf.shape[0]
    G_f = torch.zeros(d, d, dtype=torch.float64, device=Wf.device)
    G_d = torch.zeros_like(G_f)
    for cols in _vocab_chunks(Wf, chunk_elems):
        cf = _block(Wf, sf, cols).sub_(mean_f.unsqueeze(1))
        _add_gram(G_f, cf)
        cb = _block(Wb, sb, cols).sub_(mean_b.unsqueeze(1))
        _add_gram(G_d, cb.sub_(cf))
    return G_f, mean_f, G_d


def _vocab_chunks(W: torch.Tensor, chunk_elems: int) -> list[slice]:
    """Vocabulary column blocks such that the float64 blocks alive at once (up to four
    [d_model, step] ones in ``_grams_ft``) hold about ``chunk_elems`` elements."""
    d, n = W.shape
    step = max(1, min(n, chunk_elems // max(1, 4 * d)))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _vocab_mean(W: torch.Tensor, scale: torch.Tensor | None, chunk_elems: int) -> torch.Tensor:
    total = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    for cols in _vocab_chunks(W, chunk_elems):
        total += _block(W, scale, cols).sum(1)
    return total / W.shape[1]


def _add_gram(G: torch.Tensor, C: torch.Tensor) -> None:
    """G += C Cᵀ (C float64 [d, k]). On the CPU through numpy, whose matmul runs
    ``A @ A.T`` as a BLAS syrk (half the work of a general product)."""
    if C.device.type == "cpu":
        a = C.contiguous().numpy()
        G += torch.from_numpy(np.matmul(a, a.T))
    else:
        G.addmm_(C, C.T)


@torch.no_grad()
def frobenius_ratio(W_ft: torch.Tensor | Unembedding, W_base: torch.Tensor | Unembedding, n_vocab: int | None = None,
                    chunk_elems: int = 1 << 24) -> float:
    """‖W_ft‖_F / ‖W_base‖_F over the first ``n_vocab`` columns (default: all), in float64,
    accumulated over column chunks of about ``chunk_elems`` elements (no whole float64 copy)."""
    return _frobenius(_as_unembedding(W_ft), n_vocab, chunk_elems) / _frobenius(_as_unembedding(W_base), n_vocab, chunk_elems)


def _frobenius(u: Unembedding, n_vocab: int | None, chunk_elems: int) -> float:
    W = u.W if n_vocab is None else u.W[:, :n_vocab]
    d, n = W.shape
    step = max(1, min(n, chunk_elems // max(1, d))) if n else 1
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for s in range(0, n, step):
        c = _block(W, u.scale, slice(s, s + step))
        total += (c * c).sum()
    return float(total.sqrt())


@torch.no_grad()
def weight_deviation(base_blocks: list[dict[str, torch.Tensor]], finetune: Any) -> list[float | None]:
    """‖θ_ft − θ_base‖_F / ‖θ_base‖_F over all parameters of each transformer block.

    ``base_blocks`` holds each base block's named parameters (on any device)."""
    out: list[float | None] = []
    for params_b, block_f in zip(base_blocks, finetune.blocks):
        params_f = dict(block_f.named_parameters())
        num = 0.0
        den = 0.0
        for name, p_b in params_b.items():
            p_f = params_f.get(name)
            if p_f is None or p_f.shape != p_b.shape:
                continue
            pb = p_b.detach().double()
            num += float((p_f.detach().to(pb.device).double() - pb).pow(2).sum())
            den += float(pb.pow(2).sum())
        out.append((num**0.5) / (den**0.5) if den > 0 else None)
    return out


def weight_metrics(base: Any, finetune: Any, W_decs: dict[str, torch.Tensor], W_U_base: torch.Tensor | Unembedding,
                   W_U_ft: torch.Tensor | Unembedding | None = None) -> dict[str, dict[str, Any]]:
    """Weight-only paired metrics, per SAE key (logit similarity depends on the SAE's decoder;
    the rest is computed once). ``base`` is the base model or its blocks' parameters. The
    unembeddings are folded tensors, or :class:`Unembedding` s folded chunk by chunk."""
    notes: list[str] = []
    V_base = _as_unembedding(W_U_base).W.shape[1]
    V_ft = finetune.cfg.d_vocab_out
    n_vocab = min(V_base, V_ft)
    if V_ft != V_base:
        notes.append(
            f"vocabulary sizes differ (base {V_base}, finetune {V_ft}); weight-based metrics use the shared first {n_vocab} tokens"
        )
    if W_U_ft is None:
        W_U_ft = unembedding(finetune)
    base_blocks = base if isinstance(base, list) else [dict(b.named_parameters()) for b in base.blocks]
    shared = {
        "unembed_frobenius_ratio": frobenius_ratio(W_U_ft, W_U_base, n_vocab),
        "weight_deviation": weight_deviation(base_blocks, finetune),
        "n_shared_vocab": n_vocab,
    }
    return {
        key: {"logit_similarity": logit_similarity(W_dec, W_U_base, W_U_ft, n_vocab), **shared, "notes": list(notes)}
        for key, W_dec in W_decs.items()
    }
