"""``run_transfer``: one streaming pass over the tokens for the base model and every finetune.

For each batch and each model the engine runs the model once to the SAE's hook
layer, encodes and decodes with the SAE, and continues from the hook layer for
the clean and spliced inputs together (see :mod:`.runner`); the accumulators
(:mod:`..metrics`) take each batch and keep O(d_sae) state. In sequential mode
the base runs first and spills its side of every batch to disk, then each
finetune runs alone against the spill (:mod:`.spill`).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from ..loading.tokens import special_token_ids
from ..metrics.model import ModelAccumulator
from ..metrics.paired import PairedAccumulator
from ..metrics.weights import folded_unembed, weight_metrics
from ..report import TransferReport
from . import assemble
from .options import ENGINE_VERSION, BaseState, EngineError, EngineOptions, EngineOutput
from .runner import ModelRunner, auto_outlier_norm, hook_layer, progress_bar
from .spill import BaseSpill, blocks_to_cpu
from .sweep import Accumulators, Sweep


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
    n_ctx, T = tokens.shape
    special_ids = options.special_token_ids if options.special_token_ids is not None else special_token_ids(getattr(base, "tokenizer", None))
    special = torch.tensor(sorted(set(special_ids)), dtype=tokens.dtype)
    names = [name for name, _ in ft_items]

    def runner(model: Any) -> ModelRunner:
        return ModelRunner(model, layer, options.logits_chunk_elems, options.fuse_continuations)

    base_runner = runner(base)
    tau = _outlier_norm(base_state, base_runner, tokens, special, options)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    acc = Accumulators(
        base=ModelAccumulator(d_in, d_sae) if base_state is None else None,
        finetunes={name: ModelAccumulator(d_in, d_sae) for name in names},
        pairs={name: PairedAccumulator(d_sae, T) for name in names},
    )
    W_U_base = folded_unembed(base).detach()
    W_dec = sae.W_dec.detach()
    weights_by_ft: dict[str, dict[str, Any]] = {}
    n_models = 1 + len(names)
    bar = progress_bar(n_ctx * T * n_models, options, f"sae-transfer ({n_models} models)")
    sweep = Sweep(sae, tokens, special, options, tau, base_runner, acc, bar, on_batch)
    started = time.perf_counter()
    try:
        if not sequential:
            runners = [(name, runner(m)) for name, m in ft_items]
            sweep.run(True, runners, None)
            for name, r in runners:
                weights_by_ft[name] = weight_metrics(base, r.model, W_dec=W_dec, W_U_base=W_U_base)
        else:
            with tempfile.TemporaryDirectory(prefix="sae-transfer-spill-", dir=options.spill_dir) as spill_dir:
                spill = BaseSpill(spill_dir)
                sweep.run(True, [], spill)
                base_blocks = blocks_to_cpu(base)
                for name, m in ft_items:
                    model = _materialise(m)
                    _validate_model(name, model, base, int(tokens.max()))
                    sweep.run(False, [(name, runner(model))], spill)
                    weights_by_ft[name] = weight_metrics(base_blocks, model, W_dec=W_dec, W_U_base=W_U_base)
                    del model
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started

    weights = assemble.resampler(n_ctx, options.n_bootstrap, options.seed)
    if base_state is None:
        assert acc.base is not None
        base_state = assemble.base_state(base_name, acc.base, weights, tau)
    results, features = assemble.finetune_results(names, base_state, acc, weights_by_ft, weights)
    run_config = dict(config or {})
    run_config.update(
        {
            "hook_name": sae.cfg.metadata.hook_name,
            "n_contexts": n_ctx,
            "context_size": T,
            "n_tokens": n_ctx * T,
            "batch_size": options.batch_size,
            "final_batch_size": sweep.batch_size,
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
            "oom_batch_splits": sweep.oom_splits,
            "elapsed_seconds": round(elapsed, 3),
            "tokens_per_second": round(n_ctx * T * n_models / elapsed, 1) if elapsed > 0 else None,
        }
    )
    report = TransferReport(config=run_config, base=base_state.result, finetunes=results, features=features)
    return EngineOutput(report=report, base_state=base_state, oom_splits=sweep.oom_splits)


def _outlier_norm(
    base_state: BaseState | None, base_runner: ModelRunner, tokens: torch.Tensor, special: torch.Tensor, options: EngineOptions
) -> float | None:
    """τ of the outlier mask: the cached base's, 2 x the mean base norm ("auto"), the number given, or None."""
    if base_state is not None:
        return base_state.outlier_norm
    if options.outlier_norm == "auto":
        return auto_outlier_norm(base_runner, tokens, special, options)
    return float(options.outlier_norm) if options.outlier_norm is not None else None


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


def _materialise(model_or_loader: Any) -> Any:
    """A model, or the model a zero-argument loader returns."""
    if hasattr(model_or_loader, "cfg") or not callable(model_or_loader):
        return model_or_loader
    return model_or_loader()

