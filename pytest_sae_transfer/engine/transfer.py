"""``run_transfer_many``: one streaming pass over the tokens for the base model and every
finetune, for every SAE of the run at once; ``run_transfer`` is the one-SAE case.

For each batch and each model the engine runs the model once through the layers,
capturing every SAE's hook on the way; each SAE adds its round trip and its spliced
continuation from its own layer, and the clean continuation is shared (see
:mod:`.runner` and :mod:`.sweep`). The accumulators (:mod:`..metrics`) keep
O(n_saes x d_sae) state. In sequential mode the base runs first and spills its side
of every batch to disk, then each finetune runs alone against the spill (:mod:`.spill`).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from ..loading.tokens import special_token_ids
from ..metrics.model import ModelAccumulator
from ..metrics.paired import PairedAccumulator
from ..metrics.topk import TopKAccumulator
from ..report import TransferReport
from . import assemble
from .assemble import Assembler
from .options import BaseState, EngineError, EngineOptions, EngineOutput, EngineRun
from .runner import ModelRunner, hook_layer
from .spill import BaseSpill, blocks_to_cpu
from .steps import auto_outlier_norms, progress_bar
from .sweep import Accumulators, SAESlot, Sweep


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
    """Evaluate one SAE on the base and each finetune over ``tokens`` [contexts, positions].

    ``finetunes`` maps names to HookedTransformers, or to zero-argument callables
    that load one (so that in sequential mode only one finetune is resident).
    ``base_state``, when given (from the cache), skips the base model's continuations:
    the base still runs to the hook layer, because the paired metrics need its
    features token by token.
    """
    run = run_transfer_many(base, finetunes, {"sae": sae}, tokens, options, base_name=base_name, config=config,
                            base_states={"sae": base_state} if base_state is not None else None, on_batch=on_batch)
    return run.outputs["sae"]


def evaluate_transfer(
    base: Any,
    finetunes: Mapping[str, Any] | Sequence[tuple[str, Any]],
    sae: Any,
    tokens: torch.Tensor,
    options: EngineOptions = EngineOptions(),
    **kwargs: Any,
) -> TransferReport:
    """The library entry point: every metric for the base and each finetune, for one SAE."""
    return run_transfer(base, finetunes, sae, tokens, options, **kwargs).report


def run_transfer_many(
    base: Any,
    finetunes: Mapping[str, Any] | Sequence[tuple[str, Any]],
    saes: Mapping[str, Any],
    tokens: torch.Tensor,
    options: EngineOptions = EngineOptions(),
    *,
    base_name: str = "base",
    config: Mapping[str, Any] | None = None,
    base_states: Mapping[str, BaseState] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> EngineRun:
    """Every SAE of ``saes`` (key -> SAE) on the base and each finetune, in one pass over the tokens.

    ``base_states`` holds cached base results by SAE key; those SAEs skip the base's
    continuations. The result of each SAE equals a run with that SAE alone, to float rounding.
    """
    ft_items = list(finetunes.items()) if isinstance(finetunes, Mapping) else list(finetunes)
    if not options.sequential:
        ft_items = [(name, _materialise(m)) for name, m in ft_items]
    cached = dict(base_states or {})
    layers = _validate(base, [(n, m) for n, m in ft_items if not callable(m) or hasattr(m, "cfg")], saes, tokens, options)
    special_ids = options.special_token_ids if options.special_token_ids is not None else special_token_ids(getattr(base, "tokenizer", None))
    special = torch.tensor(sorted(set(special_ids)), dtype=tokens.dtype)
    names = [name for name, _ in ft_items]
    base_runner = ModelRunner(base, options.logits_chunk_elems, options.fuse_continuations)
    taus = _outlier_norms(cached, base_runner, tokens, special, options, layers)
    slots = [SAESlot(key, sae, layers[key], taus[key]) for key, sae in saes.items()]
    acc = Accumulators(
        base={s.key: ModelAccumulator(s.sae.cfg.d_in, s.sae.cfg.d_sae) for s in slots if s.key not in cached},
        finetunes={(n, s.key): ModelAccumulator(s.sae.cfg.d_in, s.sae.cfg.d_sae) for n in names for s in slots},
        pairs={(n, s.key): PairedAccumulator(s.sae.cfg.d_sae, tokens.shape[1]) for n in names for s in slots},
        topk_base={s.key: TopKAccumulator(s.sae.cfg.d_sae, options.top_k) for s in slots if s.key not in cached},
        topk={(n, s.key): TopKAccumulator(s.sae.cfg.d_sae, options.top_k) for n in names for s in slots},
    )
    n_models = 1 + len(names)
    bar = progress_bar(tokens.numel() * n_models, options, f"sae-transfer ({n_models} models, {len(slots)} SAE{'s' if len(slots) != 1 else ''})")
    sweep = Sweep(slots, tokens, special, options, base_runner, acc, bar, on_batch)
    assembler = Assembler(slots, base, base_name, acc, cached, options, tokens, special.tolist())
    started = time.perf_counter()
    try:
        _passes(sweep, assembler, base, ft_items, options, tokens)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    run_config = {**(config or {}), **assemble.engine_config(tokens, options, sweep, base_runner, special, elapsed, n_models)}
    return EngineRun(outputs={slot.key: assembler.output(slot, run_config) for slot in slots}, oom_splits=sweep.oom_splits)


def _passes(sweep: Sweep, assembler: Assembler, base: Any, ft_items: list[tuple[str, Any]], options: EngineOptions,
            tokens: torch.Tensor) -> None:
    """Run the sweep(s), finishing each finetune right after its sweep (while it is loaded)."""

    def runner(model: Any) -> ModelRunner:
        return ModelRunner(model, options.logits_chunk_elems, options.fuse_continuations)

    if not options.sequential:
        runners = [(name, runner(m)) for name, m in ft_items]
        sweep.run(True, runners, None)
        assembler.finish_base()
        for name, r in runners:
            assembler.finish_finetune(name, r.model)
        return
    with tempfile.TemporaryDirectory(prefix="sae-transfer-spill-", dir=options.spill_dir) as spill_dir:
        spills = {s.key: BaseSpill(f"{spill_dir}/sae-{i}") for i, s in enumerate(sweep.slots)}
        sweep.run(True, [], spills)
        assembler.finish_base()
        assembler.base_blocks = blocks_to_cpu(base)
        for name, m in ft_items:
            model = _materialise(m)
            _validate_model(name, model, base, int(tokens.max()))
            sweep.run(False, [(name, runner(model))], spills)
            assembler.finish_finetune(name, model)
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _outlier_norms(
    cached: Mapping[str, BaseState], base_runner: ModelRunner, tokens: torch.Tensor, special: torch.Tensor,
    options: EngineOptions, layers: Mapping[str, int],
) -> dict[str, float | None]:
    """τ of the outlier mask per SAE: the cached base's, 2 x the mean base norm at its layer ("auto"),
    the number given, or None."""
    taus: dict[str, float | None] = {}
    if options.outlier_norm == "auto":
        todo = sorted({layers[k] for k in layers if k not in cached})
        auto = auto_outlier_norms(base_runner, tokens, special, options, todo) if todo else {}
    for key, layer in layers.items():
        if key in cached:
            taus[key] = cached[key].outlier_norm
        elif options.outlier_norm == "auto":
            taus[key] = auto[layer]
        else:
            taus[key] = float(options.outlier_norm) if options.outlier_norm is not None else None
    return taus


def _validate(base: Any, finetunes: Sequence[tuple[str, Any]], saes: Mapping[str, Any], tokens: torch.Tensor,
              options: EngineOptions) -> dict[str, int]:
    """Check the inputs; returns each SAE's layer."""
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise EngineError(f"tokens must be a [contexts, positions] tensor with >= 1 context and >= 2 positions; got shape {tuple(tokens.shape)}")
    if options.batch_size < 1:
        raise EngineError(f"batch_size must be a positive number of contexts; got {options.batch_size}")
    if options.n_bootstrap < 0:
        raise EngineError(f"n_bootstrap must be >= 0; got {options.n_bootstrap}")
    if not saes:
        raise EngineError("no SAE to evaluate")
    layers = {}
    for key, sae in saes.items():
        hook_name = sae.cfg.metadata.hook_name
        layers[key] = hook_layer(hook_name, base.cfg.n_layers)
        if sae.cfg.d_in != base.cfg.d_model:
            raise EngineError(
                f"the SAE reads {sae.cfg.d_in}-dimensional activations but the base model's width at {hook_name} is {base.cfg.d_model} "
                f"(SAE {key!r}); "
                "use an SAE trained on this model (its d_in must equal the model's d_model), or pass the base model the SAE was trained on (--base-model)"
            )
        bad = sorted(i for i, _ in options.watched_features if not 0 <= i < sae.cfg.d_sae)
        if bad:
            raise EngineError(f"watched feature ids {bad} are outside SAE {key!r}'s {sae.cfg.d_sae} features")
    if tokens.shape[1] > base.cfg.n_ctx:
        raise EngineError(f"context size {tokens.shape[1]} exceeds the base model's n_ctx {base.cfg.n_ctx}")
    max_id = int(tokens.max())
    for name, model in [("base", base), *finetunes]:
        _validate_model(name, model, base, max_id)
    if isinstance(options.outlier_norm, str) and options.outlier_norm != "auto":
        raise EngineError(f"outlier_norm must be a positive number, 'auto' or None; got {options.outlier_norm!r}")
    if isinstance(options.outlier_norm, (int, float)) and not options.outlier_norm > 0:
        raise EngineError(f"outlier_norm must be a positive number; got {options.outlier_norm!r}")
    return layers


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
