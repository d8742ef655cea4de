"""Each feature's top-k activating token positions, streamed over the whole run.

Why: a broken feature is only understood by reading what it fired on, on the base
and on the finetune. Keeping the k strongest positions per feature costs
O(d_sae x k) memory, flat in the number of tokens, and needs no second pass: the
text is decoded afterwards from the token tensor the run already holds.

Order. Entries are ranked by activation value, descending, and equal values by
the *earlier* global token index (``context * T + position``). That is a strict
total order, so the result is unique: it does not depend on the batch size, the
batch order or the device. ``torch.topk`` is not stable for ties, so it is not
used; instead each candidate gets one int64 sort key (feature, then the value's
float32 bit pattern, which for positive floats orders like the value) and a
*stable* sort keeps the token order among equal keys.

Cost per batch: one comparison of the batch against each feature's current k-th
value (only entries that beat it can enter), ``nonzero`` of the survivors, and a
sort of those plus the touched features' current entries. Once the table has
filled, few entries beat the k-th value, so the sort is small.

Only positive activations on ``included`` tokens count. NaN never compares
greater than anything, so it never enters; the engine counts such tokens in
``nonfinite_fraction`` (pass ``included & finite``). Values are ranked as float32
(a float64 or half-precision input is converted exactly or rounded once).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .entries import FeatureEntries

#: Default number of top activations kept per feature.
DEFAULT_TOP_K = 10

_VALUE_BITS = 31  # a non-negative float32's bit pattern fits in 31 bits
_VALUE_MASK = (1 << _VALUE_BITS) - 1


@dataclasses.dataclass(frozen=True)
class TopKTable:
    """The top-k table of one model: row i holds feature i's entries, best first.

    ``values`` float32 [d_sae, k]; ``contexts`` and ``positions`` int64 [d_sae, k].
    Unused slots (a feature that fired on fewer than k included tokens) hold value
    0 and context/position -1; they are always at the end of the row.
    """

    values: np.ndarray
    contexts: np.ndarray
    positions: np.ndarray

    @property
    def d_sae(self) -> int:
        return int(self.values.shape[0])

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    def counts(self) -> np.ndarray:
        """int64 [d_sae]: how many slots of each row are filled."""
        return (self.contexts >= 0).sum(axis=1).astype(np.int64)

    def entries(self, feature: int) -> list[tuple[float, int, int]]:
        """Feature ``feature``'s (value, context, position) entries, best first."""
        if not 0 <= feature < self.d_sae:
            raise IndexError(f"feature {feature} is outside [0, {self.d_sae})")
        n = int((self.contexts[feature] >= 0).sum())
        return [
            (float(self.values[feature, j]), int(self.contexts[feature, j]), int(self.positions[feature, j]))
            for j in range(n)
        ]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The three arrays by name, for the sidecar."""
        return {"values": self.values, "contexts": self.contexts, "positions": self.positions}

    @classmethod
    def from_arrays(cls, arrays: Any) -> TopKTable:
        values = np.asarray(arrays["values"], dtype=np.float32)
        contexts = np.asarray(arrays["contexts"], dtype=np.int64)
        positions = np.asarray(arrays["positions"], dtype=np.int64)
        if not (values.ndim == 2 and values.shape == contexts.shape == positions.shape):
            raise ValueError(
                f"top-k arrays must share one [d_sae, k] shape; got {values.shape}, {contexts.shape}, {positions.shape}"
            )
        return cls(values=values, contexts=contexts, positions=positions)


@dataclasses.dataclass
class Candidates:
    """One batch's entries that can enter a :class:`TopKAccumulator`'s table: feature ids,
    values and global token indices (context x T + position), plus the batch's extent."""

    cols: torch.Tensor
    values: torch.Tensor
    gidx: torch.Tensor
    context_size: int
    end: int  # one past the batch's last global token index


class TopKAccumulator:
    """Streams [B, T, d_sae] feature batches and keeps each feature's k strongest tokens."""

    def __init__(self, d_sae: int, k: int = DEFAULT_TOP_K, chunk_elems: int | None = None) -> None:
        if d_sae < 1:
            raise ValueError(f"d_sae must be positive; got {d_sae}")
        if k < 1:
            raise ValueError(f"k must be a positive number of entries; got {k}")
        if d_sae >= 1 << (62 - _VALUE_BITS):
            raise ValueError(f"d_sae {d_sae} is too large for the int64 sort key")
        self.d_sae = d_sae
        self.k = k
        self.context_size: int | None = None
        # Value 0 marks an empty slot: only values > 0 are ever stored.
        self._values = torch.zeros(d_sae, k, dtype=torch.float32)
        self._gidx = torch.full((d_sae, k), -1, dtype=torch.int64)
        self._next_gidx = 0  # one past the largest global index seen so far
        #: Entries compared per chunk (see :meth:`_candidates`); None: chosen by device.
        self.chunk_elems_setting = chunk_elems
        self._buf: torch.Tensor | None = None

    @property
    def chunk_elems(self) -> int:
        if self.chunk_elems_setting is not None:
            return max(1, int(self.chunk_elems_setting))
        # 8 MB of mask on a CPU: small next to a batch of features, and few enough chunks that
        # a multi-threaded torch does not spend its time in the thread barriers of tiny ops
        # (2^21 was 1.6x slower than 2^23 at 2 threads on a busy machine, equal at 1 thread).
        # A GPU is better served by few large launches.
        return 1 << 26 if self._values.device.type == "cuda" else 1 << 23

    @torch.no_grad()
    def update(self, feats: torch.Tensor, included: torch.Tensor, context_offset: int) -> None:
        """Add one batch: ``feats`` [B, T, d_sae] (any float dtype, any device), ``included``
        bool [B, T], and the index of the batch's first context in the run's token tensor."""
        self.merge(self.candidates(feats, included, context_offset))

    @torch.no_grad()
    def candidates(self, feats: torch.Tensor, included: torch.Tensor, context_offset: int) -> Candidates:
        """The entries of one batch that can enter the table, without changing it (the engine
        keeps nothing of a batch until all of it has been computed, then merges)."""
        if feats.ndim != 3 or feats.shape[2] != self.d_sae:
            raise ValueError(f"feats must be [B, T, {self.d_sae}]; got {tuple(feats.shape)}")
        B, T, D = feats.shape
        if tuple(included.shape) != (B, T):
            raise ValueError(f"included must be [B, T] = [{B}, {T}]; got {tuple(included.shape)}")
        if context_offset < 0:
            raise ValueError(f"context_offset must be >= 0; got {context_offset}")
        if self.context_size is not None and T != self.context_size:
            raise ValueError(f"context size changed from {self.context_size} to {T} between batches")
        device = feats.device
        if self._values.device != device:
            self._values = self._values.to(device)
            self._gidx = self._gidx.to(device)
        first = context_offset * T
        in_order = first >= self._next_gidx
        flat = feats.reshape(B * T, D)
        # Only an entry above a full row's k-th value can enter it (ties go to the earlier
        # token, which is already in the row when batches arrive in order). A row that is
        # not full has k-th value 0, so this also keeps positive values only.
        kth = self._values[:, -1].to(flat.dtype)
        rows, cols = self._candidates(flat, kth, strict=in_order) if B else (flat.new_zeros(0, dtype=torch.int64),) * 2
        inc = included.reshape(B * T).to(device=device, dtype=torch.bool)
        keep = inc[rows]
        rows, cols = rows[keep], cols[keep]
        return Candidates(cols=cols.to(torch.int64), values=flat[rows, cols].to(torch.float32),
                          gidx=rows.to(torch.int64) + first, context_size=T, end=(context_offset + B) * T)

    @torch.no_grad()
    def candidates_from_entries(self, entries: FeatureEntries, context_offset: int, context_size: int) -> Candidates:
        """:meth:`candidates` from a batch's nonzero entries on its included tokens (the same
        candidates, in the same order, without a pass over the dense features)."""
        if entries.d_sae != self.d_sae:
            raise ValueError(f"entries have {entries.d_sae} features; this table has {self.d_sae}")
        T = context_size
        if self.context_size is not None and T != self.context_size:
            raise ValueError(f"context size changed from {self.context_size} to {T} between batches")
        device = entries.values.device
        if self._values.device != device:
            self._values = self._values.to(device)
            self._gidx = self._gidx.to(device)
        first = context_offset * T
        kth = self._values[:, -1][entries.cols]
        values = entries.values
        # As in _candidates: beat a full row's k-th value; a row not yet full has k-th value 0.
        beat = values > kth if first >= self._next_gidx else (values >= kth) & (values > 0)
        return Candidates(cols=entries.cols[beat].long(), values=values[beat], gidx=entries.rows[beat].long() + first,
                          context_size=T, end=first + entries.n_tokens)

    @torch.no_grad()
    def merge(self, c: Candidates) -> None:
        """Merge one batch's candidates into the table."""
        if self.context_size is None:
            self.context_size = c.context_size
        in_order = c.gidx.numel() == 0 or int(c.gidx.min()) >= self._next_gidx
        self._next_gidx = max(self._next_gidx, c.end)
        if c.cols.numel() == 0:
            return
        device = self._values.device
        cols, new_vals, new_gidx = c.cols.to(device), c.values.to(device), c.gidx.to(device)
        D = self.d_sae

        # The current entries of the features this batch touches take part in the merge.
        touched = torch.zeros(D, dtype=torch.bool, device=device)
        touched[cols] = True
        t_ids = touched.nonzero(as_tuple=True)[0]
        old_vals = self._values[t_ids]
        old_gidx = self._gidx[t_ids]
        filled = old_gidx >= 0
        old_feat = t_ids.unsqueeze(1).expand_as(old_gidx)[filled]

        feat = torch.cat([old_feat, cols])
        vals = torch.cat([old_vals[filled], new_vals])
        gidx = torch.cat([old_gidx[filled], new_gidx])
        if not in_order:
            order = torch.sort(gidx, stable=True).indices
            feat, vals, gidx = feat[order], vals[order], gidx[order]

        bits = vals.contiguous().view(torch.int32).to(torch.int64)
        key = (feat << _VALUE_BITS) | (_VALUE_MASK - bits)
        order = torch.sort(key, stable=True).indices
        feat, vals, gidx = feat[order], vals[order], gidx[order]
        start = torch.searchsorted(feat, feat)
        rank = torch.arange(feat.numel(), device=device) - start
        keep = rank < self.k

        self._values[t_ids] = 0.0
        self._gidx[t_ids] = -1
        self._values[feat[keep], rank[keep]] = vals[keep]
        self._gidx[feat[keep], rank[keep]] = gidx[keep]

    def _candidates(self, flat: torch.Tensor, kth: torch.Tensor, strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the entries of ``flat`` [N, D] that beat ``kth`` [D], in row-major order.

        Works through row chunks of about ``chunk_elems`` entries with one reused bool
        buffer, so the comparison's result is still in cache when it is scanned and no
        mask of the whole batch is ever allocated. The scan reads the buffer as int64
        words first (8 entries at a time): candidates are rare once the table has
        filled, so most words are zero and only the few others are looked at bytewise.
        """
        N, D = flat.shape
        rows_per = max(1, self.chunk_elems // D)
        n_max = min(N, rows_per) * D
        n_words = -(-n_max // 8)
        if self._buf is None or self._buf.numel() < 8 * n_words or self._buf.device != flat.device:
            self._buf = torch.zeros(8 * n_words, dtype=torch.bool, device=flat.device)
        found = []
        for r0 in range(0, N, rows_per):
            part = flat[r0 : r0 + rows_per]
            n = part.numel()
            n8 = -(-n // 8) * 8
            mask = self._buf[:n]
            if strict:
                torch.gt(part, kth, out=mask.view(part.shape))
            else:
                torch.ge(part, kth, out=mask.view(part.shape))
                mask.view(part.shape).logical_and_(part > 0)
            self._buf[n:n8] = False
            words = self._buf[:n8].view(torch.int64)
            w = (words != 0).nonzero().squeeze(1)
            if w.numel() == 0:
                continue
            sub = self._buf[:n8].view(-1, 8)[w].nonzero()
            found.append(w[sub[:, 0]] * 8 + sub[:, 1] + r0 * D)
        if not found:
            empty = torch.zeros(0, dtype=torch.int64, device=flat.device)
            return empty, empty
        idx = torch.cat(found)
        return idx // D, idx % D

    def result(self) -> TopKTable:
        """The table so far, as numpy arrays on the CPU."""
        values = self._values.cpu().numpy().copy()
        gidx = self._gidx.cpu().numpy().copy()
        T = self.context_size or 1
        empty = gidx < 0
        contexts = np.where(empty, -1, gidx // T)
        positions = np.where(empty, -1, gidx % T)
        values[empty] = 0.0
        return TopKTable(values=values, contexts=contexts.astype(np.int64), positions=positions.astype(np.int64))
