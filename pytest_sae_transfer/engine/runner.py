"""A HookedTransformer run in pieces: once through the layers, with the residual stream
captured at every SAE's hook on the way, then continued from those hooks for the clean
and spliced inputs, with per-token CE and KL computed in row chunks.

The clean continuation and its log-probabilities are computed once per batch and
shared by every SAE; each SAE adds only its spliced continuation from its own layer.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import torch

from .options import EngineError

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def hook_layer(hook_name: str, n_layers: int) -> int:
    """The layer index whose input is the activation at ``hook_name`` (``stop_at_layer``)."""
    match = _HOOK_RE.match(hook_name)
    if match is None:
        raise EngineError(
            f"hook {hook_name!r} is not supported: the engine continues from residual-stream hooks, "
            "'blocks.<L>.hook_resid_pre' or 'blocks.<L>.hook_resid_post'"
        )
    layer = int(match.group(1)) + (1 if match.group(2) == "post" else 0)
    if int(match.group(1)) >= n_layers:
        raise EngineError(
            f"hook {hook_name!r} is beyond the model's depth: it has {n_layers} layers (blocks.0 .. blocks.{n_layers - 1}); "
            "use an SAE trained on a hook of this model, or pass the base model the SAE was trained on (--base-model)"
        )
    return layer


@dataclasses.dataclass
class SpliceLosses:
    """One SAE's per-position losses: CE as [B, T-1] (position p predicts token p+1), KL as [B, T]."""

    ce_spliced: torch.Tensor
    ce_zero: torch.Tensor
    kl: torch.Tensor


class ModelRunner:
    """One model, run in pieces; keeps its logits work buffers and zero-ablation tables between batches."""

    def __init__(self, model: Any, chunk_elems: int = 1 << 24, fuse: bool = True) -> None:
        self.model = model
        self.chunk_elems = chunk_elems
        self.fuse = fuse
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.softcap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
        self._zero_ce: dict[tuple[int, int], torch.Tensor | None] = {}
        self._work: torch.Tensor | None = None
        # TransformerLens's own Unembed with no hooks on it: the logits can be computed
        # with the same arithmetic (residual @ W_U + b_U) directly, into a buffer
        from transformer_lens.components import Unembed

        unembed = model.unembed
        self._plain_unembed = (
            type(unembed).forward is Unembed.forward
            and not any(h._forward_hooks or h._forward_pre_hooks for h in (unembed.hook_in, unembed.hook_out))
        )

    @torch.no_grad()
    def capture(self, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """The residual stream entering each of ``layers``, from one pass through the deepest."""
        out: dict[int, torch.Tensor] = {}
        resid: torch.Tensor | None = None
        at = 0
        for layer in sorted(set(layers)):
            if resid is None:
                # An explicit all-ones mask: packed contexts have no padding, and TransformerLens
                # would otherwise mask "pad" ids (often = EOS) when the tokenizer pads left.
                resid = self.model(tokens, stop_at_layer=layer, attention_mask=torch.ones_like(tokens))
            elif layer > at:
                resid = self.model(resid, start_at_layer=at, stop_at_layer=layer)
            out[layer] = resid
            at = layer
        return out

    @torch.no_grad()
    def final_resid(self, resid: torch.Tensor, layer: int) -> torch.Tensor:
        """Continue ``resid`` (entering ``layer``) to the end, through the final norm."""
        n_layers = self.model.cfg.n_layers
        if layer < n_layers:
            resid = self.model(resid, start_at_layer=layer, stop_at_layer=n_layers)
        if self.model.cfg.normalization_type is not None:
            resid = self.model.ln_final(resid)
        return resid

    def _logits(self, final: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits of final-residual rows [rows, d_model], soft-capped as the model does.

        With ``out`` (a float32 [rows, d_vocab_out] buffer) they are written there: on a
        CPU, a fresh [rows, vocab] tensor per chunk costs more in page faults than the
        arithmetic done on it.
        """
        unembed = self.model.unembed
        if not self._plain_unembed:
            logits = unembed(final).float() if out is None else out.copy_(unembed(final))
        elif self.dtype == torch.float32 and out is not None:
            logits = torch.addmm(unembed.b_U, final, unembed.W_U, out=out)
        else:
            # TransformerLens's Unembed copies W_U.T.contiguous() on every call: for a
            # 256k vocabulary that is a GB of traffic per chunk, more than the matmul.
            logits = torch.addmm(unembed.b_U, final, unembed.W_U)
            logits = logits.float() if out is None else out.copy_(logits)
        if self.softcap > 0:
            logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def _buffers(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Four float32 [rows, d_vocab_out] work buffers (logits, clean log-probs, clean probs,
        spliced log-probs), kept between batches."""
        vocab = self.model.cfg.d_vocab_out
        if self._work is None or self._work.shape[1] < rows:
            self._work = torch.empty(4, rows, vocab, dtype=torch.float32, device=self.device)
        return tuple(self._work[i, :rows] for i in range(4))

    @torch.no_grad()
    def zero_ablation_ce(self, T: int, layer: int) -> torch.Tensor | None:
        """The continuation from a zeroed ``layer``: its CE for every target id, [d_vocab_out], or None.

        Zeroing the residual at the hook removes everything the tokens contributed, so
        every position enters the later layers with the same vector; attention then
        averages identical values (positional schemes only move the weights), and each
        position leaves with the same final residual, in every context. It is computed
        once per (model, layer), from one [1, T] run, instead of once per batch. The
        claim is checked on that run: if the positions differ beyond float rounding (an
        architecture that adds position-dependent values after the hook), None is
        returned and the continuation runs per batch instead.
        """
        if (T, layer) in self._zero_ce:
            return self._zero_ce[(T, layer)]
        d_model = self.model.cfg.d_model
        final = self.final_resid(torch.zeros(1, T, d_model, dtype=self.dtype, device=self.device), layer)[0].float()
        ref = final[0]
        tol = 1e-4 if self.dtype in (torch.float32, torch.float64) else 2e-2
        scale = float(ref.abs().max()) if bool(torch.isfinite(ref).all()) else float("nan")
        spread = float((final - ref).abs().max())
        table: torch.Tensor | None = None
        if math.isfinite(scale) and spread <= tol * max(scale, 1e-6):
            logits = self._logits(ref.to(self.dtype).unsqueeze(0))[0]
            table = torch.logsumexp(logits, dim=-1) - logits
        self._zero_ce[(T, layer)] = table
        return table

    def _finals(self, starts: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Final residuals of inputs entering the given layers; fused: one batched call per layer."""
        if not self.fuse:
            return [self.final_resid(x, layer) for layer, x in starts]
        out: list[torch.Tensor | None] = [None] * len(starts)
        for layer in sorted({layer for layer, _ in starts}):
            idx = [i for i, (at, _) in enumerate(starts) if at == layer]
            finals = self.final_resid(torch.cat([starts[i][1] for i in idx], dim=0), layer).chunk(len(idx), dim=0)
            for i, final in zip(idx, finals):
                out[i] = final
        return [f for f in out if f is not None]

    @torch.no_grad()
    def losses(
        self, tokens: torch.Tensor, clean: tuple[int, torch.Tensor], spliced: Sequence[tuple[int, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[SpliceLosses]]:
        """The clean CE [B, T-1], and each spliced input's CE, zero-ablation CE and KL(clean‖spliced).

        ``clean`` and every entry of ``spliced`` are (layer, residual entering that layer).
        """
        B, T = tokens.shape
        targets = torch.roll(tokens, shifts=-1, dims=1).reshape(B * T).to(self.device)
        tables = [self.zero_ablation_ce(T, layer) if self.fuse else None for layer, _ in spliced]
        starts = [clean] + [(layer, x.to(self.dtype)) for layer, x in spliced]
        zero_at = [i for i, table in enumerate(tables) if table is None]
        starts += [(spliced[i][0], torch.zeros_like(clean[1])) for i in zero_at]
        finals = [f.reshape(B * T, f.shape[-1]) for f in self._finals(starts)]
        n = len(spliced)
        ce = torch.empty(1 + 2 * n, B * T, dtype=torch.float32, device=self.device)  # clean, spliced..., zero...
        kl = torch.empty(n, B * T, dtype=torch.float32, device=self.device)
        for i, table in enumerate(tables):
            if table is not None:
                ce[1 + n + i] = table[targets]
        vocab = self.model.cfg.d_vocab_out
        rows = max(1, self.chunk_elems // max(1, vocab))
        buffers = self._buffers(min(rows, B * T))
        for start in range(0, B * T, rows):
            sl = slice(start, start + rows)
            m = finals[0][sl].shape[0]
            tgt = targets[sl].unsqueeze(1)
            logits, lp_clean, p_clean, lp_spliced = (buf[:m] for buf in buffers)
            torch.log_softmax(self._logits(finals[0][sl], out=logits), -1, out=lp_clean)
            ce[0, sl] = -lp_clean.gather(1, tgt).squeeze(1)
            torch.exp(lp_clean, out=p_clean)
            for i in range(n):
                torch.log_softmax(self._logits(finals[1 + i][sl], out=logits), -1, out=lp_spliced)
                ce[1 + i, sl] = -lp_spliced.gather(1, tgt).squeeze(1)
                # KL(clean‖spliced) = −Σ_v p_clean (log p_spliced − log p_clean), in place: bit for
                # bit the sum of p_clean (log p_clean − log p_spliced), one pass fewer
                kl[i, sl] = lp_spliced.sub_(lp_clean).mul_(p_clean).sum(-1).neg_()
            for j, i in enumerate(zero_at):
                ce[1 + n + i, sl] = -self._logits(finals[1 + n + j][sl]).log_softmax(-1).gather(1, tgt).squeeze(1)
        ce = ce.reshape(1 + 2 * n, B, T)[:, :, :-1]
        kl = kl.reshape(n, B, T)
        return ce[0], [SpliceLosses(ce[1 + i], ce[1 + n + i], kl[i]) for i in range(n)]

    def continuations(
        self, tokens: torch.Tensor, layer: int, x_clean: torch.Tensor, x_spliced: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One spliced input: (ce_clean, ce_spliced, ce_zero) as [B, T-1] and the KL as [B, T]."""
        ce_clean, (one,) = self.losses(tokens, (layer, x_clean), [(layer, x_spliced)])
        return ce_clean, one.ce_spliced, one.ce_zero, one.kl
