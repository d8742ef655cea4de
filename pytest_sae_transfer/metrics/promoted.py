"""A feature's top promoted tokens: the largest entries of ``W_dec[i] · W_U``.

Why: next to the text a feature fires on, the tokens its decoder direction pushes
up say what it *does*; comparing them on the base and the finetune's unembedding
shows whether that output meaning survived (logit similarity is the same idea
reduced to one number). ``W_U`` should have the final normalisation's weight folded
in (:func:`~pytest_sae_transfer.metrics.weights.folded_unembed`), as the metric contract's
logit similarity has.

Only the listed features are computed, a chunk of features at a time, so at most
``[chunk, d_vocab]`` logit weights exist at once. Order: value descending, equal
values by the lower token id; NaN ranks first (torch's convention), so a broken
decoder row shows up instead of vanishing.
"""

from __future__ import annotations

from typing import Iterable

import torch

#: Default number of promoted tokens kept per feature and model.
DEFAULT_N_PROMOTED = 10


def _top_rows(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, token ids) [rows, n] of each row's n largest entries, ties by the lower id."""
    rows_nan = torch.isnan(logits).any(dim=1)
    if bool(rows_nan.any()) or n >= logits.shape[1]:
        # Rare (or tiny vocabularies): a full stable sort settles every case at once.
        vals, idx = torch.sort(logits, dim=1, descending=True, stable=True)
        return vals[:, :n], idx[:, :n]
    kth = logits.topk(n, dim=1).values[:, -1:]
    rows, cols = (logits >= kth).nonzero(as_tuple=True)  # row-major: ascending ids in a row
    vals = logits[rows, cols]
    order = torch.sort(vals, descending=True, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]
    rows, cols, vals = rows[order], cols[order], vals[order]
    rank = torch.arange(rows.numel(), device=rows.device) - torch.searchsorted(rows, rows)
    keep = rank < n
    out_vals = torch.empty(logits.shape[0], n, dtype=logits.dtype, device=logits.device)
    out_ids = torch.empty(logits.shape[0], n, dtype=torch.int64, device=logits.device)
    out_vals[rows[keep], rank[keep]] = vals[keep]
    out_ids[rows[keep], rank[keep]] = cols[keep]
    return out_vals, out_ids


@torch.no_grad()
def promoted_tokens(
    W_dec: torch.Tensor,
    W_U: torch.Tensor,
    feature_ids: Iterable[int],
    n: int = DEFAULT_N_PROMOTED,
    chunk_elems: int = 1 << 24,
    scale: torch.Tensor | None = None,
) -> dict[int, list[tuple[int, float]]]:
    """``{feature id: [(token id, W_dec[id] · W_U[:, token]), ...]}``, n tokens per feature, best first.

    ``W_dec`` is [d_sae, d_model] and ``W_U`` [d_model, d_vocab] (on any devices);
    the products are computed in float32 on ``W_U``'s device. Ids outside
    ``[0, d_sae)`` raise ``IndexError``; duplicates are computed once. ``scale`` [d_model]
    is a final-norm weight not folded into ``W_U`` yet: the decoder rows are scaled instead
    (d · diag(s) W_U = (d ∘ s) · W_U). A W_U that is not float32 is converted one vocabulary
    block at a time, never whole.
    """
    ids = sorted({int(i) for i in feature_ids})
    d_sae = W_dec.shape[0]
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise IndexError(f"feature ids {bad} are outside [0, {d_sae})")
    if n < 1:
        raise ValueError(f"n must be a positive number of tokens; got {n}")
    if W_dec.shape[1] != W_U.shape[0]:
        raise ValueError(f"W_dec is {tuple(W_dec.shape)} but W_U is {tuple(W_U.shape)}: their d_model differ")
    device = W_U.device
    d_model, vocab = W_U.shape
    n = min(n, vocab)
    chunk = max(1, chunk_elems // max(1, vocab))
    out: dict[int, list[tuple[int, float]]] = {}
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        index = torch.tensor(part, dtype=torch.int64, device=W_dec.device)
        rows = W_dec.index_select(0, index).to(device=device, dtype=torch.float32)
        if scale is not None:
            rows = rows * scale.to(device=device, dtype=W_U.dtype).to(torch.float32)
        if W_U.dtype == torch.float32:
            logits = rows @ W_U
        else:
            logits = torch.empty(len(part), vocab, dtype=torch.float32, device=device)
            step = max(1, chunk_elems // max(1, d_model))
            for v in range(0, vocab, step):
                torch.matmul(rows, W_U[:, v : v + step].to(torch.float32), out=logits[:, v : v + step])
        vals, toks = _top_rows(logits, n)
        for fid, v_row, t_row in zip(part, vals.cpu().tolist(), toks.cpu().tolist()):
            out[fid] = list(zip(t_row, v_row))
    return out
