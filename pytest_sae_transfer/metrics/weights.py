"""Paired metrics that come from the weights alone: logit similarity, the unembedding
norm ratio and the per-block weight deviation."""

from __future__ import annotations

from typing import Any

import torch

from .stats import rowwise_pearson


def folded_unembed(model: Any) -> torch.Tensor:
    """W_U [d_model, d_vocab] with the final normalisation's weight folded in.

    With ``fold_ln=True`` TransformerLens has already folded it (ln_final has no
    ``w``); otherwise fold it here, which is what ``fold_ln`` would have done.
    """
    W_U = model.W_U.detach()
    ln_final = getattr(model, "ln_final", None)
    w = getattr(ln_final, "w", None) if ln_final is not None else None
    if isinstance(w, torch.Tensor):
        W_U = w.detach().to(W_U.dtype).unsqueeze(1) * W_U
    return W_U


@torch.no_grad()
def logit_similarity(
    W_dec: torch.Tensor,
    W_U_base: torch.Tensor,
    W_U_ft: torch.Tensor,
    n_vocab: int,
    chunk_elems: int = 1 << 25,
) -> torch.Tensor:
    """Per-feature Pearson correlation of W_dec[i]·W_U over the shared vocabulary.

    Chunked over features so that only [chunk, n_vocab] logit weights exist at once.
    Returns float64 [d_sae] on CPU.
    """
    d_sae = W_dec.shape[0]
    device = W_U_base.device
    compute_dtype = torch.float32
    Wb = W_U_base[:, :n_vocab].to(compute_dtype)
    Wf = W_U_ft[:, :n_vocab].to(device=device, dtype=compute_dtype)
    chunk = max(1, min(d_sae, chunk_elems // max(1, n_vocab)))
    out = torch.empty(d_sae, dtype=torch.float64)
    for start in range(0, d_sae, chunk):
        dec = W_dec[start : start + chunk].to(device=device, dtype=compute_dtype)
        out[start : start + chunk] = rowwise_pearson(dec @ Wb, dec @ Wf).cpu()
    return out


@torch.no_grad()
def frobenius_ratio(W_ft: torch.Tensor, W_base: torch.Tensor) -> float:
    return float(W_ft.double().norm() / W_base.double().norm().to(W_ft.device))


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


def weight_metrics(base: Any, finetune: Any, W_decs: dict[str, torch.Tensor], W_U_base: torch.Tensor,
                   W_U_ft: torch.Tensor | None = None) -> dict[str, dict[str, Any]]:
    """Weight-only paired metrics, per SAE key (logit similarity depends on the SAE's decoder;
    the rest is computed once). ``base`` is the base model or its blocks' parameters."""
    notes: list[str] = []
    V_base = W_U_base.shape[1]
    V_ft = finetune.cfg.d_vocab_out
    n_vocab = min(V_base, V_ft)
    if V_ft != V_base:
        notes.append(
            f"vocabulary sizes differ (base {V_base}, finetune {V_ft}); weight-based metrics use the shared first {n_vocab} tokens"
        )
    if W_U_ft is None:
        W_U_ft = folded_unembed(finetune)
    base_blocks = base if isinstance(base, list) else [dict(b.named_parameters()) for b in base.blocks]
    shared = {
        "unembed_frobenius_ratio": frobenius_ratio(W_U_ft[:, :n_vocab], W_U_base[:, :n_vocab].to(W_U_ft.device)),
        "weight_deviation": weight_deviation(base_blocks, finetune),
        "n_shared_vocab": n_vocab,
    }
    return {
        key: {"logit_similarity": logit_similarity(W_dec, W_U_base, W_U_ft, n_vocab), **shared, "notes": list(notes)}
        for key, W_dec in W_decs.items()
    }
