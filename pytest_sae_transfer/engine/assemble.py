"""After the pass: the accumulators become result objects, with their bootstrap intervals,
the paired metrics, the per-feature arrays and the run's engine settings."""

from __future__ import annotations

from typing import Any, Mapping

from ..metrics.bootstrap import Resampler, model_intervals, paired_intervals, paired_model_intervals
from ..metrics.model import ModelAccumulator
from ..metrics.pairs import clean_metrics, paired_metrics
from ..report import FeatureArrays, FinetuneResult, ModelResult, TransferReport
from .options import ENGINE_VERSION, BaseState, EngineOptions, EngineOutput
from .sweep import Accumulators, SAESlot


def resampler(n_contexts: int, n_bootstrap: int, seed: int) -> Resampler | None:
    return Resampler(n_contexts, n_bootstrap, seed) if n_bootstrap > 0 else None


def engine_config(tokens: Any, options: EngineOptions, sweep: Any, base_runner: Any, special: Any, elapsed: float,
                  n_models: int) -> dict[str, Any]:
    """What the engine did, shared by every SAE of the run (each SAE adds its hook and τ)."""
    n_ctx, T = tokens.shape
    return {
        "n_contexts": n_ctx,
        "context_size": T,
        "n_tokens": n_ctx * T,
        "batch_size": options.batch_size,
        "final_batch_size": sweep.batch_size,
        "sequential": options.sequential,
        "exclude_special_tokens": options.exclude_special_tokens,
        "special_token_ids": list(map(int, special.tolist())),
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


def sae_output(
    slot: SAESlot,
    base_name: str,
    names: list[str],
    cached: BaseState | None,
    acc: Accumulators,
    weight_metrics: Mapping[str, Mapping[str, Mapping[str, Any]]],
    options: EngineOptions,
    run_config: Mapping[str, Any],
    n_contexts: int,
) -> EngineOutput:
    """One SAE's results: the base's (computed now or cached) and every finetune's."""
    weights = resampler(n_contexts, options.n_bootstrap, options.seed)
    state = cached if cached is not None else base_state(base_name, acc.base[slot.key], weights, slot.outlier_norm)
    results, features = finetune_results(slot.key, names, state, acc, weight_metrics, weights)
    config = {"hook_name": slot.sae.cfg.metadata.hook_name, **run_config, "outlier_norm": state.outlier_norm}
    report = TransferReport(config=config, base=state.result, finetunes=results, features=features)
    return EngineOutput(report=report, base_state=state, oom_splits=int(run_config.get("oom_batch_splits") or 0))


def base_state(name: str, acc: ModelAccumulator, weights: Resampler | None, outlier_norm: float | None) -> BaseState:
    """The base's result and what every pair needs from it (cacheable)."""
    return BaseState(
        result=_model_result(ModelResult, name, acc, weights),
        fire_count=acc.fire_count.clone(),
        n_eval=acc.n_eval,
        histograms=acc.histograms(),
        outlier_norm=outlier_norm,
        context_tables=acc.context_tables(),
    )


def finetune_results(
    key: str,
    names: list[str],
    state: BaseState,
    acc: Accumulators,
    weight_metrics: Mapping[str, Mapping[str, Mapping[str, Any]]],
    weights: Resampler | None,
) -> tuple[list[FinetuneResult], FeatureArrays]:
    """Each finetune's result for the SAE ``key``, and the features of the base and every finetune."""
    features = FeatureArrays()
    for hist_key, hist in state.histograms.items():
        features.histograms[f"base/{hist_key}"] = hist
    results = []
    for name in names:
        ft_acc, pair = acc.finetunes[(name, key)], acc.pairs[(name, key)]
        result = _model_result(FinetuneResult, name, ft_acc, weights)
        paired, vectors, notes = paired_metrics(state.fire_count, state.n_eval, ft_acc, pair, weight_metrics[name][key])
        result.paired = paired
        result.notes.extend(notes)
        result.paired_ci95 = paired_intervals(pair.context_table(), weights) if weights is not None else {}
        if weights is not None and state.context_tables is not None:
            result.delta_ci95, result.ratio_ci95 = paired_model_intervals(state.context_tables, ft_acc.context_tables(), weights)
        results.append(result)
        features.vectors[name] = vectors
        for hist_key, hist in {**ft_acc.histograms(), **pair.histograms()}.items():
            features.histograms[f"{name}/{hist_key}"] = hist
    for entry in (state.result, *results):
        note = nonfinite_loss_note(entry.metrics)
        if note and note not in entry.notes:
            entry.notes.append(note)
    return results, features


def _model_result(cls: Any, name: str, acc: ModelAccumulator, weights: Resampler | None) -> Any:
    stats, sum_x = acc.context_tables()
    return cls(
        model=name,
        metrics=clean_metrics(acc.summary()),
        ci95=model_intervals(stats, sum_x, weights) if weights is not None else {},
    )


def nonfinite_loss_note(metrics: Mapping[str, Any]) -> str | None:
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

