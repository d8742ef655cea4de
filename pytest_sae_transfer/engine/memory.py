"""Device memory of a run, predicted as a sum of named terms, and the plan the engine takes
from it on CUDA: the largest batch size (the requested one, halved) that fits, and whether
the finetunes must run one at a time after the base.

The per-batch terms follow what :mod:`.sweep`, :mod:`.runner` and :mod:`..metrics` allocate,
with N = batch x context rows, S the widest SAE, V the vocabulary, all models resident at
once holding their hook captures (``ModelRunner.capture``):

* ``weights``, ``saes``: the parameters (base, resident finetunes; every SAE).
* ``activations``: each resident model's residual stream at each captured layer [N, d], and
  per (model, SAE) the float32 activation, reconstruction and spliced input [N, d].
* ``features``: [N, S] float32 units alive at the worst moment of an SAE's step: the base's
  features (kept while every finetune is compared with them), the finetune's encoder
  output and pre-activation, and the masked copy ``ModelAccumulator.measure`` makes, with
  its bool masks; 3.5 units (plus one per SAE dtype conversion to float32). That is the
  dense path, which every SAE takes on its first batch; a sparse SAE's later batches read
  its features as entries (``metrics.entries``) instead of the masked copy and its masks:
  12 bytes an entry, so 0.75 of a unit per model at the 1/4 density bound and a few
  hundredths for a real SAE (an L0 of tens out of thousands of features).
* ``forward``: the working set of one block of the widest forward pass, the fused
  continuation of the clean and every spliced input ((1 + n_saes) N rows): the gated MLP's
  three [rows, d_mlp] tensors, about ten [rows, d] ones, and two attention score tensors
  [B, heads, T, T] per input.
* ``logits``: each resident runner's four float32 [r, V] work buffers (r = the rows of one
  log-softmax chunk, ``logits_chunk_elems // V``), kept between batches, and, when the model
  is not float32, the logits of one chunk in its dtype.
* ``accumulators``: the top-k tables on the device, O(n_saes x d_sae); the other
  accumulators live on the CPU.
* ``weight_metrics`` (after the pass, when the captures are gone): the Gram matrices and
  the float64 vocabulary and feature chunks of ``logit_similarity``.

The peak is weights + SAEs + accumulators + logits + the larger of the per-batch terms and
the weight-metric transient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelShape:
    d_model: int
    d_vocab: int
    d_mlp: int
    n_heads: int
    param_bytes: int
    dtype_bytes: int

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        cfg = model.cfg
        p = next(model.parameters())
        return cls(cfg.d_model, cfg.d_vocab_out, cfg.d_mlp or 4 * cfg.d_model, cfg.n_heads,
                   sum(q.numel() * q.element_size() for q in model.parameters()), p.element_size())


@dataclasses.dataclass(frozen=True)
class SAEShape:
    d_in: int
    d_sae: int
    dtype_bytes: int = 4

    @property
    def param_bytes(self) -> int:
        return (2 * self.d_in * self.d_sae + self.d_sae + self.d_in) * self.dtype_bytes

    @classmethod
    def of(cls, sae: Any) -> SAEShape:
        return cls(sae.cfg.d_in, sae.cfg.d_sae, next(sae.parameters()).element_size())


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak device bytes of one run, by term (see the module docstring)."""

    terms: dict[str, int]

    @property
    def resident(self) -> int:
        t = self.terms
        return t["weights"] + t["saes"] + t["accumulators"] + t["logits"]

    @property
    def per_batch(self) -> int:
        t = self.terms
        return t["activations"] + t["features"] + t["forward"]

    @property
    def total(self) -> int:
        return self.resident + max(self.per_batch, self.terms["weight_metrics"])


def estimate(base: ModelShape, saes: Sequence[SAEShape], batch_size: int, context_size: int, *, n_finetunes: int = 1,
             n_captured: int = 1, top_k: int = 10, logits_chunk_elems: int = 1 << 24,
             weights_chunk_elems: int = 1 << 25) -> MemoryEstimate:
    """Peak device bytes with ``n_finetunes`` finetunes (of the base's shape) resident beside the base
    (1 in sequential mode), ``n_captured`` distinct hook layers, every SAE of ``saes``."""
    n_models = 1 + n_finetunes
    N, T, d, e = batch_size * context_size, context_size, base.d_model, base.dtype_bytes
    k = len(saes)
    S = max((s.d_sae for s in saes), default=0)
    convert = 1.0 if any(s.dtype_bytes != 4 for s in saes) else 0.0
    rows = min(N, max(1, logits_chunk_elems // max(1, base.d_vocab)))
    groups = 1 + k  # the clean continuation and one spliced input per SAE, fused
    terms = {
        "weights": n_models * base.param_bytes,
        "saes": sum(s.param_bytes for s in saes),
        "activations": n_models * N * d * (n_captured * e + k * (12 + (4 if e != 4 else 0))),
        "features": int((3.5 + convert) * N * S * 4),
        "forward": groups * (N * (3 * base.d_mlp + 10 * d) * e + 2 * batch_size * base.n_heads * T * T * max(e, 4)),
        "logits": n_models * 4 * rows * base.d_vocab * 4 + (rows * base.d_vocab * e if e != 4 else 0),
        "accumulators": 2 * n_models * sum(s.d_sae for s in saes) * top_k * 12,
        "weight_metrics": _weight_metrics(d, base.d_vocab, S, weights_chunk_elems, logits_chunk_elems),
    }
    return MemoryEstimate(terms)


def _weight_metrics(d: int, V: int, S: int, chunk: int, logits_chunk: int) -> int:
    """``logit_similarity``: six float64 [d, d] (three Gram matrices, their [d, 3d] stack) and the
    larger of two float64 vocabulary blocks [d, step] plus a Gram product, and a feature chunk
    (the decoder rows, their [rows, 3, d] products and the elementwise product that reduces
    them); then the promoted tokens: the logits of a chunk of listed features [<= 64, V] twice."""
    step = min(V, max(1, chunk // max(1, 4 * d)))
    rows = min(max(S, 1), max(1, chunk // max(1, 3 * d)))
    promoted = 2 * min(64, max(1, logits_chunk // max(1, V))) * V * 4
    return max(6 * d * d * 8 + max(2 * d * step * 8 + d * d * 8, rows * 7 * d * 8), promoted)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What the engine runs with: the batch size, sequential mode or not, and the prediction."""

    batch_size: int
    sequential: bool
    predicted_bytes: int
    free_bytes: int
    requested_batch_size: int
    terms: dict[str, int]
    fits: bool  # False: even batch size 1 is predicted not to fit (the out-of-memory halving stays the backstop)

    def describe(self) -> str:
        gb = 1e9
        mode = "sequential (finetunes one at a time after the base)" if self.sequential else "all models resident"
        lowered = f" (lowered from {self.requested_batch_size})" if self.batch_size < self.requested_batch_size else ""
        fit = "" if self.fits else "; predicted not to fit even at batch size 1"
        return (f"memory plan: batch size {self.batch_size}{lowered}, {mode}; predicted peak {self.predicted_bytes / gb:.1f} GB "
                f"of {self.free_bytes / gb:.1f} GB available{fit}")

    def config(self) -> dict[str, Any]:
        return {"predicted_bytes": self.predicted_bytes, "batch_size": self.batch_size, "sequential": self.sequential,
                "free_bytes": self.free_bytes}


def _batches(requested: int) -> list[int]:
    out = [max(1, requested)]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def plan(free_bytes: int, base: ModelShape, saes: Sequence[SAEShape], batch_size: int, context_size: int, *, n_finetunes: int,
         n_captured: int = 1, margin: float = 0.85, force_sequential: bool = False, **kwargs: Any) -> MemoryPlan:
    """The largest batch size among ``batch_size``, its halves, ..., 1 whose predicted peak is at most
    ``margin x free_bytes`` (``free_bytes``: what the run may use, including what it already holds).

    All finetunes stay resident beside the base when that fits at the requested batch size;
    otherwise sequential mode when it fits a larger batch (or fits where resident does not);
    ``force_sequential`` decides the mode up front."""
    budget = margin * free_bytes

    def best(n_res: int) -> tuple[int, MemoryEstimate, bool]:
        for b in _batches(batch_size):
            est = estimate(base, saes, b, context_size, n_finetunes=n_res, n_captured=n_captured, **kwargs)
            if est.total <= budget:
                return b, est, True
        return 1, est, False

    par = best(n_finetunes) if not force_sequential and n_finetunes > 1 else None
    seq = best(min(1, n_finetunes))
    if par is not None and par[2] and (par[0] == max(1, batch_size) or par[0] >= seq[0] or not seq[2]):
        b, est, fits, sequential = *par, False
    else:
        b, est, fits = seq
        sequential = force_sequential or (n_finetunes > 1 and par is not None)
    return MemoryPlan(b, sequential, est.total, int(free_bytes), batch_size, dict(est.terms), fits)
