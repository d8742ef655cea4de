"""One streaming pass over the tokens for the base model and every finetune.

For each batch and each model the engine runs the model once to the SAE's hook
layer, encodes and decodes with the SAE, and continues from the hook layer for
the clean and spliced inputs together (one fused call when
``fuse_continuations``). The zero-ablated continuation is the same at every
position of every context, so it runs once per model (see
``_Runner.zero_ablation_ce``; per batch when that does not hold, or when not
``fuse_continuations``). CE and KL are computed from the final residual in row
chunks, so full-vocabulary float32 logits never exist for a whole batch.

Pure torch: usable without pytest::

    report = evaluate_transfer(base, {"ft": finetune}, sae, tokens)
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .metrics.bootstrap import Resampler, model_intervals, paired_intervals
from .metrics.model import ModelAccumulator, ModelBatch
from .metrics.paired import P_COS, P_EUC, P_N, PairedAccumulator
from .metrics.stats import LOG_EPS, pearson_from_sums, rowwise_pearson
from .metrics.weights import folded_unembed, frobenius_ratio, logit_similarity, weight_deviation
from .report import FeatureArrays, FinetuneResult, ModelResult, TransferReport

ENGINE_VERSION = "1"

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class EngineError(ValueError):
    """Inputs the engine cannot evaluate; the message says what would be right."""


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    batch_size: int = 8  # contexts per batch
    exclude_special_tokens: bool = True
    special_token_ids: tuple[int, ...] | None = None  # default: the base tokenizer's BOS/EOS/PAD
    outlier_norm: float | str | None = None  # None: off; a number τ; or "auto" (2 x mean base norm)
    n_bootstrap: int = 1000
    seed: int = 0
    logits_chunk_elems: int = 1 << 24  # rows x vocab per log-softmax chunk
    fuse_continuations: bool = True  # False: each continuation alone, zero ablation per batch (a reference path)
    progress: bool | None = None  # None: only when stderr is a terminal
    progress_file: Any = None
    # Sequential: the base runs alone first and spills what the paired metrics need
    # (hook activations, sparse features) to disk; then each finetune runs alone.
    # For pairs that do not fit on the device together.
    sequential: bool = False
    spill_dir: str | None = None


@dataclasses.dataclass
class BaseState:
    """What the paired metrics need from the base model; cacheable and shared by finetunes."""

    result: ModelResult
    fire_count: torch.Tensor  # float64 [d_sae]
    n_eval: float
    histograms: dict[str, dict[str, Any]]
    outlier_norm: float | None


@dataclasses.dataclass
class EngineOutput:
    report: TransferReport
    base_state: BaseState
    oom_splits: int = 0


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


class _Runner:
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


class _OutOfMemory(Exception):
    pass


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def default_special_ids(model: Any) -> tuple[int, ...]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return ()
    ids = {getattr(tok, attr, None) for attr in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return tuple(sorted(i for i in ids if i is not None))


def _progress_bar(total: int, options: EngineOptions, desc: str) -> Any:
    show = options.progress
    stream = options.progress_file or sys.stderr
    if show is None:
        show = bool(getattr(stream, "isatty", lambda: False)())
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc, file=stream, dynamic_ncols=True, leave=True)


def _validate(base: Any, finetunes: Sequence[tuple[str, Any]], sae: Any, tokens: torch.Tensor, options: EngineOptions) -> int:
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise EngineError(f"tokens must be a [contexts, positions] tensor with >= 1 context and >= 2 positions; got shape {tuple(tokens.shape)}")
    if options.batch_size < 1:
        raise EngineError(f"batch_size must be a positive number of contexts; got {options.batch_size}")
    if options.n_bootstrap < 0:
        raise EngineError(f"n_bootstrap must be >= 0; got {options.n_bootstrap}")
    hook_name = sae.cfg.metadata.hook_name
    layer = hook_layer(hook_name, base.cfg.n_layers)
    if sae.cfg.d_in != base.cfg.d_model:
        raise EngineError(
            f"the SAE reads {sae.cfg.d_in}-dimensional activations but the base model's width at {hook_name} is {base.cfg.d_model}; "
            "use an SAE trained on this model (its d_in must equal the model's d_model), or pass the base model the SAE was trained on (--base-model)"
        )
    if tokens.shape[1] > base.cfg.n_ctx:
        raise EngineError(f"context size {tokens.shape[1]} exceeds the base model's n_ctx {base.cfg.n_ctx}")
    max_id = int(tokens.max())
    for name, model in [("base", base), *finetunes]:
        _validate_model(name, model, base, max_id)
    if isinstance(options.outlier_norm, str) and options.outlier_norm != "auto":
        raise EngineError(f"outlier_norm must be a positive number, 'auto' or None; got {options.outlier_norm!r}")
    if isinstance(options.outlier_norm, (int, float)) and not options.outlier_norm > 0:
        raise EngineError(f"outlier_norm must be a positive number; got {options.outlier_norm!r}")
    return layer


def _validate_model(name: str, model: Any, base: Any, max_id: int) -> None:
    if model.cfg.d_model != base.cfg.d_model or model.cfg.n_layers != base.cfg.n_layers:
        raise EngineError(
            f"finetune {name!r} has d_model={model.cfg.d_model}, n_layers={model.cfg.n_layers}; "
            f"the base has d_model={base.cfg.d_model}, n_layers={base.cfg.n_layers}. A finetune must share the base architecture."
        )
    if max_id >= model.cfg.d_vocab:
        raise EngineError(f"token id {max_id} is outside the vocabulary of {name!r} (d_vocab={model.cfg.d_vocab})")


@torch.no_grad()
def _sae_roundtrip(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, reconstruction) as float32 on x's device. encode and decode stay paired:
    some normalisations (constant_norm_rescale) carry state from one to the other."""
    p = next(sae.parameters())
    feats = sae.encode(x.to(device=p.device, dtype=p.dtype))
    if feats.is_sparse:
        feats = feats.to_dense()
    x_hat = sae.decode(feats)
    return feats.to(device=x.device, dtype=torch.float32), x_hat.to(device=x.device, dtype=torch.float32)


def _auto_outlier_norm(runner: _Runner, tokens: torch.Tensor, special: torch.Tensor, options: EngineOptions) -> float:
    """τ = 2 x the mean base activation norm over included tokens (a to-hook pre-pass)."""
    total = 0.0
    count = 0.0
    for start in range(0, tokens.shape[0], options.batch_size):
        toks = tokens[start : start + options.batch_size].to(runner.device)
        included = _included(toks, special, options)
        norms = runner.to_hook(toks).double().norm(dim=-1)
        ok = included & torch.isfinite(norms)
        total += float(norms[ok].sum())
        count += float(ok.sum())
    if count == 0:
        raise EngineError("no included tokens to estimate the automatic outlier norm from")
    return 2.0 * total / count


def _included(toks: torch.Tensor, special: torch.Tensor, options: EngineOptions) -> torch.Tensor:
    if not options.exclude_special_tokens or special.numel() == 0:
        return torch.ones_like(toks, dtype=torch.bool)
    return ~torch.isin(toks, special.to(toks.device))


def run_transfer(
    base: Any,
    finetunes: Mapping[str, Any] | Sequence[tuple[str, Any]],
    sae: Any,
    tokens: torch.Tensor,
    options: EngineOptions = EngineOptions(),
    *,
    base_name: str = "base",
    config: Mapping[str, Any] | None = None,
    base_state: BaseState | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> EngineOutput:
    """Evaluate the SAE on the base and each finetune over ``tokens`` [contexts, positions].

    ``finetunes`` maps names to HookedTransformers, or to zero-argument callables
    that load one (so that in sequential mode only one finetune is resident).
    ``base_state``, when given (from the cache), skips the base model's continuations:
    the base still runs to the hook layer, because the paired metrics need its
    features token by token.
    """
    ft_items = list(finetunes.items()) if isinstance(finetunes, Mapping) else list(finetunes)
    sequential = options.sequential
    if not sequential:
        ft_items = [(name, _materialise(m)) for name, m in ft_items]
    layer = _validate(base, [(n, m) for n, m in ft_items if not callable(m) or hasattr(m, "cfg")], sae, tokens, options)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    n_ctx, T = tokens.shape
    special_ids = options.special_token_ids if options.special_token_ids is not None else default_special_ids(base)
    special = torch.tensor(sorted(set(special_ids)), dtype=tokens.dtype)

    loaders = [(name, model) for name, model in ft_items]
    make = lambda m: _Runner(m, layer, options.logits_chunk_elems, options.fuse_continuations)  # noqa: E731
    base_runner = make(base)

    tau: float | None
    if base_state is not None:
        tau = base_state.outlier_norm
    elif options.outlier_norm == "auto":
        tau = _auto_outlier_norm(base_runner, tokens, special, options)
    else:
        tau = float(options.outlier_norm) if options.outlier_norm is not None else None

    base_acc = ModelAccumulator(d_in, d_sae) if base_state is None else None
    ft_accs = {name: ModelAccumulator(d_in, d_sae) for name, _ in loaders}
    pair_accs = {name: PairedAccumulator(d_sae, T) for name, _ in loaders}
    # What the paired metrics need from the base, kept per weight-metric and finetune.
    W_U_base = folded_unembed(base).detach()
    weight_metrics: dict[str, dict[str, Any]] = {}

    n_models = 1 + len(loaders)
    bar = _progress_bar(n_ctx * T * n_models, options, f"sae-transfer ({n_models} models)")
    started = time.perf_counter()
    batch_size = options.batch_size
    oom_splits = 0

    def model_batch(runner: _Runner, toks: torch.Tensor, included: torch.Tensor, with_losses: bool) -> ModelBatch:
        x = runner.to_hook(toks)
        feats, x_hat = _sae_roundtrip(sae, x)
        x32 = x.float()
        if tau is not None:
            outlier = x32.norm(dim=-1) > tau
        else:
            outlier = torch.zeros_like(included)
        batch = ModelBatch(x=x32, x_hat=x_hat, feats=feats, included=included, outlier=outlier)
        if with_losses:
            splice = (included & ~outlier).unsqueeze(-1)
            x_spliced = torch.where(splice, x_hat.to(x.dtype), x)
            batch.ce_clean, batch.ce_spliced, batch.ce_zero, batch.kl = runner.continuations(toks, x, x_spliced)
        return batch

    def run_pass(base_live: bool, ft_runners: list[tuple[str, _Runner]], spill: _BaseSpill | None) -> None:
        """One sweep over the tokens. With ``base_live`` the base runs here; otherwise its
        activations and features come back from ``spill``, written by an earlier sweep."""
        nonlocal batch_size, oom_splits
        cursor = 0
        while cursor < n_ctx:
            toks_cpu = tokens[cursor : cursor + batch_size]
            try:
                toks = toks_cpu.to(base_runner.device)
                included = _included(toks, special, options)
                if base_live:
                    b = model_batch(base_runner, toks, included, base_acc is not None)
                    base_view = _BaseView(b.x, b.feats, included, _activations_finite(b))
                else:
                    assert spill is not None
                    base_view = spill.read(cursor, toks_cpu.shape[0], base_runner.device)
                fts = [(name, model_batch(runner, toks.to(runner.device), included.to(runner.device), True)) for name, runner in ft_runners]
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not _is_oom(exc):
                    raise
                if batch_size == 1:
                    raise EngineError(
                        f"out of memory even at batch size 1 (started at {options.batch_size}, halved {oom_splits} time(s)): "
                        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}. Free device memory, or try --sae-sequential, "
                        "a smaller --sae-context-size, --sae-dtype bfloat16 or float16, or --sae-device cpu"
                    ) from None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                # Nothing of this batch was counted yet: retry it, and the rest, at half the size.
                batch_size = max(1, batch_size // 2)
                oom_splits += 1
                continue
            if base_live:
                if base_acc is not None:
                    base_acc.update(b)
                if spill is not None:
                    spill.write(cursor, base_view)
            for name, fb in fts:
                ft_accs[name].update(fb)
                dev = base_view.x.device
                mask = base_view.included & base_view.finite & _activations_finite(fb).to(dev)
                pair_accs[name].update(base_view.x, fb.x.to(dev), base_view.feats, fb.feats.to(dev), mask)
            cursor += toks_cpu.shape[0]
            if bar is not None:
                bar.update(toks_cpu.numel() * ((1 if base_live else 0) + len(ft_runners)))
            if on_batch is not None:
                on_batch(cursor, n_ctx)

    def finish_weights(name: str, model: Any) -> None:
        weight_metrics[name] = _weight_metrics(base, model, W_dec=sae.W_dec.detach(), W_U_base=W_U_base)

    try:
        if not sequential:
            runners = [(name, make(_materialise(m))) for name, m in loaders]
            run_pass(True, runners, None)
            for name, runner in runners:
                finish_weights(name, runner.model)
        else:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="sae-transfer-spill-", dir=options.spill_dir) as spill_dir:
                spill = _BaseSpill(spill_dir)
                run_pass(True, [], spill)
                base_blocks = _blocks_to_cpu(base)
                for name, m in loaders:
                    model = _materialise(m)
                    _validate_model(name, model, base, int(tokens.max()))
                    run_pass(False, [(name, make(model))], spill)
                    weight_metrics[name] = _weight_metrics(base_blocks, model, W_dec=sae.W_dec.detach(), W_U_base=W_U_base)
                    del model
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started

    weights = Resampler(n_ctx, options.n_bootstrap, options.seed) if options.n_bootstrap > 0 else None

    if base_state is None:
        assert base_acc is not None
        stats, sum_x = base_acc.context_tables()
        base_result = ModelResult(
            model=base_name,
            metrics=_clean(base_acc.summary()),
            ci95=model_intervals(stats, sum_x, weights) if weights is not None else {},
        )
        base_state = BaseState(
            result=base_result,
            fire_count=base_acc.fire_count.clone(),
            n_eval=base_acc.n_eval,
            histograms=base_acc.histograms(),
            outlier_norm=tau,
        )

    features = FeatureArrays()
    for key, hist in base_state.histograms.items():
        features.histograms[f"base/{key}"] = hist
    finetune_results = []
    for name, _ in loaders:
        acc = ft_accs[name]
        stats, sum_x = acc.context_tables()
        result = FinetuneResult(
            model=name,
            metrics=_clean(acc.summary()),
            ci95=model_intervals(stats, sum_x, weights) if weights is not None else {},
        )
        paired, vectors, notes = _paired_metrics(base_state, acc, pair_accs[name], weight_metrics[name])
        result.paired = paired
        result.notes.extend(notes)
        result.paired_ci95 = paired_intervals(pair_accs[name].context_table(), weights) if weights is not None else {}
        finetune_results.append(result)
        features.vectors[name] = vectors
        for key, hist in acc.histograms().items():
            features.histograms[f"{name}/{key}"] = hist
        for key, hist in pair_accs[name].histograms().items():
            features.histograms[f"{name}/{key}"] = hist

    run_config = dict(config or {})
    run_config.update(
        {
            "hook_name": sae.cfg.metadata.hook_name,
            "n_contexts": n_ctx,
            "context_size": T,
            "n_tokens": n_ctx * T,
            "batch_size": options.batch_size,
            "final_batch_size": batch_size,
            "sequential": sequential,
            "exclude_special_tokens": options.exclude_special_tokens,
            "special_token_ids": list(map(int, special.tolist())),
            "outlier_norm": tau,
            "outlier_norm_setting": options.outlier_norm,
            "n_bootstrap": options.n_bootstrap,
            "seed": options.seed,
            "device": str(base_runner.device),
            "dtype": str(base_runner.dtype).replace("torch.", ""),
            "engine_version": ENGINE_VERSION,
            "oom_batch_splits": oom_splits,
            "elapsed_seconds": round(elapsed, 3),
            "tokens_per_second": round(n_ctx * T * n_models / elapsed, 1) if elapsed > 0 else None,
        }
    )
    for entry in (base_state.result, *finetune_results):
        note = _nonfinite_loss_note(entry.metrics)
        if note and note not in entry.notes:
            entry.notes.append(note)
    report = TransferReport(config=run_config, base=base_state.result, finetunes=finetune_results, features=features)
    return EngineOutput(report=report, base_state=base_state, oom_splits=oom_splits)


def _nonfinite_loss_note(metrics: Mapping[str, Any]) -> str | None:
    """Positions whose CE/KL was NaN or Inf though their activation was finite are left out of the
    loss means (SPEC's ``nonfinite_fraction`` counts activations only); say so, never silently."""
    n = int(metrics.get("n_nonfinite_loss") or 0)
    if n <= 0:
        return None
    total = int(metrics.get("n_tokens") or 0)
    return (
        f"{n} of {total} included tokens have a finite activation but a NaN/Inf loss (overflow after the hook, "
        "or NaN spread by attention); they are left out of ce_loss_* and kl_div_spliced (n_nonfinite_loss)"
    )


@dataclasses.dataclass
class _BaseView:
    """The base model's side of one batch, as the paired metrics need it."""

    x: torch.Tensor  # float32 [B, T, d_in]
    feats: torch.Tensor  # float32 [B, T, d_sae]
    included: torch.Tensor  # bool [B, T]
    finite: torch.Tensor  # bool [B, T]


def _activations_finite(b: ModelBatch) -> torch.Tensor:
    return torch.isfinite(b.x).all(-1) & torch.isfinite(b.x_hat).all(-1) & torch.isfinite(b.feats).all(-1)


class _BaseSpill:
    """The base's activations and (sparse) features, written per batch to a scratch directory.

    Size on disk: about tokens x (4 d_in + 8 L0) bytes; memory stays one batch.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.chunks: list[tuple[int, int, str]] = []
        self._cached: tuple[int, int, dict[str, torch.Tensor]] | None = None

    def write(self, start: int, view: _BaseView) -> None:
        from safetensors.torch import save_file

        B, T, d_sae = view.feats.shape
        flat = view.feats.reshape(B * T, d_sae)
        rows, cols = flat.nonzero(as_tuple=True)
        path = f"{self.directory}/base-{start:09d}.safetensors"
        save_file(
            {
                "x": view.x.contiguous().cpu(),
                "rows": rows.to(torch.int32).cpu(),
                "cols": cols.to(torch.int32).cpu(),
                "vals": flat[rows, cols].float().cpu(),
                "included": view.included.cpu().to(torch.uint8),
                "finite": view.finite.cpu().to(torch.uint8),
                "shape": torch.tensor([B, T, d_sae]),
            },
            path,
        )
        self.chunks.append((start, B, path))

    def _load(self, start: int, n: int, path: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if self._cached is None or self._cached[0] != start:
            self._cached = (start, n, load_file(path))
        return self._cached[2]

    def read(self, start: int, n: int, device: Any) -> _BaseView:
        parts = []
        for c_start, c_n, path in self.chunks:
            lo, hi = max(start, c_start), min(start + n, c_start + c_n)
            if lo >= hi:
                continue
            data = self._load(c_start, c_n, path)
            B, T, d_sae = data["shape"].tolist()
            feats = torch.zeros(B * T, d_sae, dtype=torch.float32)
            feats[data["rows"].long(), data["cols"].long()] = data["vals"]
            sl = slice(lo - c_start, hi - c_start)
            parts.append((data["x"][sl], feats.reshape(B, T, d_sae)[sl], data["included"][sl].bool(), data["finite"][sl].bool()))
        x, feats, included, finite = (torch.cat([p[i] for p in parts]).to(device) for i in range(4))
        return _BaseView(x, feats, included, finite)


def _materialise(model_or_loader: Any) -> Any:
    """A model, or the model a zero-argument loader returns."""
    if hasattr(model_or_loader, "cfg") or not callable(model_or_loader):
        return model_or_loader
    return model_or_loader()


def _blocks_to_cpu(model: Any) -> list[dict[str, torch.Tensor]]:
    """The base's block parameters on the CPU, for weight deviation in sequential mode."""
    return [{n: p.detach().to("cpu", copy=True) for n, p in block.named_parameters()} for block in model.blocks]


def _weight_metrics(base: Any, finetune: Any, W_dec: torch.Tensor, W_U_base: torch.Tensor) -> dict[str, Any]:
    """Weight-only paired metrics; ``base`` is the base model or its blocks' parameters."""
    notes: list[str] = []
    V_base = W_U_base.shape[1]
    V_ft = finetune.cfg.d_vocab_out
    n_vocab = min(V_base, V_ft)
    if V_ft != V_base:
        notes.append(
            f"vocabulary sizes differ (base {V_base}, finetune {V_ft}); weight-based metrics use the shared first {n_vocab} tokens"
        )
    W_U_ft = folded_unembed(finetune)
    base_blocks = base if isinstance(base, list) else [dict(b.named_parameters()) for b in base.blocks]
    return {
        "logit_similarity": logit_similarity(W_dec, W_U_base, W_U_ft, n_vocab),
        "unembed_frobenius_ratio": frobenius_ratio(W_U_ft[:, :n_vocab], W_U_base[:, :n_vocab].to(W_U_ft.device)),
        "weight_deviation": weight_deviation(base_blocks, finetune),
        "n_shared_vocab": n_vocab,
        "notes": notes,
    }


def evaluate_transfer(
    base: Any,
    finetunes: Mapping[str, Any] | Sequence[tuple[str, Any]],
    sae: Any,
    tokens: torch.Tensor,
    options: EngineOptions = EngineOptions(),
    **kwargs: Any,
) -> TransferReport:
    """The library entry point: every SPEC.md metric for the base and each finetune."""
    return run_transfer(base, finetunes, sae, tokens, options, **kwargs).report


def _clean(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def _summary(values: torch.Tensor) -> tuple[float | None, float | None, float | None]:
    arr = values.numpy()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return None, None, None
    return float(arr.mean()), float(np.median(arr)), float((arr > 0.8).mean())


def _paired_metrics(
    base_state: BaseState,
    ft_acc: ModelAccumulator,
    pair: PairedAccumulator,
    weights_part: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    notes: list[str] = list(weights_part["notes"])
    d_sae = pair.d_sae
    dens_b = base_state.fire_count / base_state.n_eval if base_state.n_eval > 0 else torch.full((d_sae,), math.nan, dtype=torch.float64)
    dens_f = ft_acc.densities()
    log_b = torch.log10(dens_b + LOG_EPS)
    log_f = torch.log10(dens_f + LOG_EPS)
    dead_b = base_state.fire_count == 0
    dead_f = ft_acc.fire_count == 0
    regular = (log_b >= -5) & (log_b <= -1) & (log_f >= -5) & (log_f <= -1)

    table = pair.context_table()
    n_pair = float(table[:, P_N].sum())
    cos_by_pos, euc_by_pos = pair.by_position()

    act_sim_all = pearson_from_sums(pair.n, pair.sum_a, pair.sum_b, pair.sum_aa, pair.sum_bb, pair.sum_ab)
    act_sim = torch.where(regular, act_sim_all, torch.nan)
    undefined = int((regular & torch.isnan(act_sim_all)).sum())
    act_mean, act_median, act_frac = _summary(act_sim[regular])

    logit_sim = torch.where(regular, weights_part["logit_similarity"], torch.nan)
    logit_mean, logit_median, _ = _summary(logit_sim[regular])

    mean_log_err = pair.sum_log_err / pair.n if pair.n > 0 else torch.full((d_sae,), math.nan, dtype=torch.float64)
    base_only = dead_b & ~dead_f
    ft_only = ~dead_b & dead_f
    dead_err = torch.where(base_only | ft_only, mean_log_err, torch.nan)

    def mean_over(mask: torch.Tensor) -> float | None:
        return float(mean_log_err[mask].mean()) if bool(mask.any()) and pair.n > 0 else None

    density_r = rowwise_pearson(log_b.unsqueeze(0), log_f.unsqueeze(0))[0]
    paired: dict[str, Any] = {
        "n_tokens": int(n_pair),
        "resid_cosine_mean": float(table[:, P_COS].sum() / n_pair) if n_pair > 0 else None,
        "resid_cosine_by_position": cos_by_pos,
        "resid_euclidean_mean": float(table[:, P_EUC].sum() / n_pair) if n_pair > 0 else None,
        "resid_euclidean_by_position": euc_by_pos,
        "density_log10_pearson": float(density_r) if math.isfinite(float(density_r)) else None,
        "n_dead_base_only": int(base_only.sum()),
        "n_dead_finetune_only": int(ft_only.sum()),
        "n_dead_both": int((dead_b & dead_f).sum()),
        "dead_shift_fraction": float((base_only.sum() + ft_only.sum()) / d_sae),
        "n_regular_features": int(regular.sum()),
        "activation_similarity_mean": act_mean,
        "activation_similarity_median": act_median,
        "activation_similarity_frac_above_0_8": act_frac,
        "n_activation_similarity_undefined": undefined,
        "logit_similarity_mean": logit_mean,
        "logit_similarity_median": logit_median,
        "dead_activation_error_base_only_mean": mean_over(base_only),
        "dead_activation_error_finetune_only_mean": mean_over(ft_only),
        "unembed_frobenius_ratio": weights_part["unembed_frobenius_ratio"],
        "weight_deviation": weights_part["weight_deviation"],
        "n_shared_vocab": int(weights_part["n_shared_vocab"]),
    }
    vectors = {
        "density_base": dens_b.numpy(),
        "density_finetune": dens_f.numpy(),
        "activation_similarity": act_sim.numpy(),
        "logit_similarity": logit_sim.numpy(),
        "dead_activation_error": dead_err.numpy(),
    }
    return paired, vectors, notes
