"""A HookedTransformer cut at the SAE's hook: to the hook, the SAE round trip, and the
continuations from the hook with their per-token CE and KL."""

from __future__ import annotations

import math
import re
import sys
from typing import Any

import torch

from .options import EngineError, EngineOptions

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def hook_layer(hook_name: str, n_layers: int) -> int:
    """The ``stop_at_layer`` that yields the activation at ``hook_name``."""
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


class ModelRunner:
    """A HookedTransformer cut at the hook layer."""

    def __init__(self, model: Any, layer: int, chunk_elems: int, fuse: bool) -> None:
        self.model = model
        self.layer = layer
        self.chunk_elems = chunk_elems
        self.fuse = fuse
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.softcap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
        self._zero_ce: dict[int, torch.Tensor | None] = {}
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
    def to_hook(self, tokens: torch.Tensor) -> torch.Tensor:
        # An explicit all-ones mask: packed contexts have no padding, and TransformerLens
        # would otherwise mask "pad" ids (often = EOS) when the tokenizer pads left.
        mask = torch.ones_like(tokens)
        return self.model(tokens, stop_at_layer=self.layer, attention_mask=mask)

    @torch.no_grad()
    def _final_resid(self, resid: torch.Tensor) -> torch.Tensor:
        n_layers = self.model.cfg.n_layers
        if self.layer < n_layers:
            resid = self.model(resid, start_at_layer=self.layer, stop_at_layer=n_layers)
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

    def _buffers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Three float32 [rows, d_vocab_out] work buffers, kept between batches."""
        vocab = self.model.cfg.d_vocab_out
        if self._work is None or self._work.shape[1] < rows:
            self._work = torch.empty(3, rows, vocab, dtype=torch.float32, device=self.device)
        return self._work[0, :rows], self._work[1, :rows], self._work[2, :rows]

    @torch.no_grad()
    def zero_ablation_ce(self, T: int) -> torch.Tensor | None:
        """The zero-ablated continuation's CE for every target id, [d_vocab_out], or None.

        Zeroing the residual at the hook removes everything the tokens contributed, so
        every position enters the later layers with the same vector; attention then
        averages identical values (positional schemes only move the weights), and each
        position leaves with the same final residual, in every context. It is computed
        once per model, from one [1, T] run, instead of once per batch. The claim is
        checked on that run: if the positions differ beyond float rounding (an
        architecture that adds position-dependent values after the hook), None is
        returned and the continuation runs per batch instead.
        """
        if T in self._zero_ce:
            return self._zero_ce[T]
        d_model = self.model.cfg.d_model
        final = self._final_resid(torch.zeros(1, T, d_model, dtype=self.dtype, device=self.device))[0].float()
        ref = final[0]
        tol = 1e-4 if self.dtype in (torch.float32, torch.float64) else 2e-2
        scale = float(ref.abs().max()) if bool(torch.isfinite(ref).all()) else float("nan")
        spread = float((final - ref).abs().max())
        table: torch.Tensor | None = None
        if math.isfinite(scale) and spread <= tol * max(scale, 1e-6):
            logits = self._logits(ref.to(self.dtype).unsqueeze(0))[0]
            table = torch.logsumexp(logits, dim=-1) - logits
        self._zero_ce[T] = table
        return table

    @torch.no_grad()
    def continuations(
        self, tokens: torch.Tensor, x_clean: torch.Tensor, x_spliced: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ce_clean, ce_spliced, ce_zero) as [B, T-1] and KL(clean‖spliced) as [B, T]."""
        B, T = tokens.shape
        targets = torch.roll(tokens, shifts=-1, dims=1).reshape(B * T).to(self.device)
        zero_ce = self.zero_ablation_ce(T) if self.fuse else None
        inputs = [x_clean, x_spliced.to(self.dtype)]
        if zero_ce is None:
            inputs.append(torch.zeros_like(x_clean))
        if self.fuse:
            finals = self._final_resid(torch.cat(inputs, dim=0)).chunk(len(inputs), dim=0)
        else:
            finals = tuple(self._final_resid(x) for x in inputs)
        d = finals[0].shape[-1]
        flat = [f.reshape(B * T, d) for f in finals]
        ce = torch.empty(3, B * T, dtype=torch.float32, device=self.device)
        kl = torch.empty(B * T, dtype=torch.float32, device=self.device)
        if zero_ce is not None:
            ce[2] = zero_ce[targets]
        vocab = self.model.cfg.d_vocab_out
        rows = max(1, self.chunk_elems // max(1, vocab))
        buffers = self._buffers(min(rows, B * T))
        for start in range(0, B * T, rows):
            sl = slice(start, start + rows)
            n = flat[0][sl].shape[0]
            tgt = targets[sl].unsqueeze(1)
            logits, lp_clean, lp_spliced = (buf[:n] for buf in buffers)
            torch.log_softmax(self._logits(flat[0][sl], out=logits), -1, out=lp_clean)
            torch.log_softmax(self._logits(flat[1][sl], out=logits), -1, out=lp_spliced)
            ce[0, sl] = -lp_clean.gather(1, tgt).squeeze(1)
            ce[1, sl] = -lp_spliced.gather(1, tgt).squeeze(1)
            if zero_ce is None:
                ce[2, sl] = -self._logits(flat[2][sl]).log_softmax(-1).gather(1, tgt).squeeze(1)
            # KL(clean‖spliced) = Σ_v p_clean (log p_clean − log p_spliced), all in place
            log_ratio = lp_spliced.neg_().add_(lp_clean)
            kl[sl] = log_ratio.mul_(lp_clean.exp_()).sum(-1)
        ce = ce.reshape(3, B, T)[:, :, :-1]
        return ce[0], ce[1], ce[2], kl.reshape(B, T)


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@torch.no_grad()
def sae_roundtrip(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, reconstruction) as float32 on x's device. encode and decode stay paired:
    some normalisations (constant_norm_rescale) carry state from one to the other."""
    p = next(sae.parameters())
    feats = sae.encode(x.to(device=p.device, dtype=p.dtype))
    if feats.is_sparse:
        feats = feats.to_dense()
    x_hat = sae.decode(feats)
    return feats.to(device=x.device, dtype=torch.float32), x_hat.to(device=x.device, dtype=torch.float32)


def included_mask(toks: torch.Tensor, special: torch.Tensor, options: EngineOptions) -> torch.Tensor:
    if not options.exclude_special_tokens or special.numel() == 0:
        return torch.ones_like(toks, dtype=torch.bool)
    return ~torch.isin(toks, special.to(toks.device))


def auto_outlier_norm(runner: ModelRunner, tokens: torch.Tensor, special: torch.Tensor, options: EngineOptions) -> float:
    """τ = 2 x the mean base activation norm over included tokens (a to-hook pre-pass)."""
    total = 0.0
    count = 0.0
    for start in range(0, tokens.shape[0], options.batch_size):
        toks = tokens[start : start + options.batch_size].to(runner.device)
        included = included_mask(toks, special, options)
        norms = runner.to_hook(toks).double().norm(dim=-1)
        ok = included & torch.isfinite(norms)
        total += float(norms[ok].sum())
        count += float(ok.sum())
    if count == 0:
        raise EngineError("no included tokens to estimate the automatic outlier norm from")
    return 2.0 * total / count


def progress_bar(total: int, options: EngineOptions, desc: str) -> Any:
    show = options.progress
    stream = options.progress_file or sys.stderr
    if show is None:
        show = bool(getattr(stream, "isatty", lambda: False)())
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc, file=stream, dynamic_ncols=True, leave=True)

