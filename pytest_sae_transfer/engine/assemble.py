"""After the passes: the accumulators become result objects, with their bootstrap intervals,
the paired metrics, the per-feature arrays, the feature-level section and the run's
engine settings.

Each finetune is finished right after its sweep, while its model is still loaded (in
sequential mode it is unloaded next): its weight metrics and its worst features'
promoted tokens need its unembedding.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..metrics.bootstrap import Resampler, model_intervals, paired_intervals, paired_model_intervals
from ..metrics.feature_rank import rank_features
from ..metrics.model import ModelAccumulator
from ..metrics.pairs import clean_metrics, paired_metrics
from ..metrics.promoted import promoted_tokens
from ..metrics.weights import Unembedding, unembedding, weight_metrics
from ..report import FeatureArrays, FinetuneResult, ModelResult, TransferReport
from ..report.feature_section import build_features_section, listed_ids
from .options import ENGINE_VERSION, BaseState, EngineOptions, EngineOutput
from .sweep import Accumulators, SAESlot


def resampler(n_contexts: int, n_bootstrap: int, seed: int) -> Resampler | None:
    return Resampler(n_contexts, n_bootstrap, seed) if n_bootstrap > 0 else None


class Assembler:
    """Collects each SAE's results: the base's once its pass is over, each finetune's right after its sweep."""

    def __init__(self, slots: list[SAESlot], base: Any, base_name: str, acc: Accumulators, cached: Mapping[str, BaseState],
                 options: EngineOptions, tokens: torch.Tensor, special_ids: list[int]) -> None:
        self.slots = slots
        self.base = base
        self.base_name = base_name
        self.acc = acc
        self.options = options
        self.tokens = tokens
        self.special_ids = special_ids
        self.weights = resampler(tokens.shape[0], options.n_bootstrap, options.seed)
        self.states: dict[str, BaseState] = dict(cached)
        self.results: dict[str, list[FinetuneResult]] = {s.key: [] for s in slots}
        self.features: dict[str, FeatureArrays] = {s.key: FeatureArrays() for s in slots}
        # The base's W_U itself (a view of its parameter, no copy) and its final-norm weight:
        # the weight metrics and promoted tokens fold it in chunk by chunk. In sequential mode
        # the base stays loaded through the finetunes' sweeps too (the engine holds it), so the
        # view stays valid; a caller that unloaded it would need a copy here.
        self.U_base = unembedding(base)
        self.base_blocks: Any = base

    def finish_base(self) -> None:
        """The base's results of the SAEs whose base was not cached (its pass is over)."""
        for slot in self.slots:
            if slot.key not in self.states:
                top = self.acc.topk_base.get(slot.key)
                self.states[slot.key] = base_state(self.base_name, self.acc.base[slot.key], self.weights, slot.outlier_norm,
                                                   top.result() if top is not None else None)
            state = self.states[slot.key]
            for hist_key, hist in state.histograms.items():
                self.features[slot.key].histograms[f"base/{hist_key}"] = hist
            if state.topk is not None:
                self.features[slot.key].topk["base"] = state.topk.to_arrays()

    def finish_finetune(self, name: str, model: Any) -> None:
        """Every SAE's result for finetune ``name``, whose model is still loaded."""
        U_ft = unembedding(model)
        weights = weight_metrics(self.base_blocks, model, {s.key: s.sae.W_dec.detach() for s in self.slots}, self.U_base, U_ft)
        for slot in self.slots:
            state = self.states[slot.key]
            ft_acc, pair = self.acc.finetunes[(name, slot.key)], self.acc.pairs[(name, slot.key)]
            result = _model_result(FinetuneResult, name, ft_acc, self.weights)
            paired, vectors, notes = paired_metrics(state.fire_count, state.n_eval, ft_acc, pair, weights[slot.key])
            result.paired = paired
            result.notes.extend(notes)
            if self.weights is not None:
                result.paired_ci95 = paired_intervals(pair.context_table(), self.weights)
                if state.context_tables is not None:
                    result.delta_ci95, result.ratio_ci95 = paired_model_intervals(state.context_tables, ft_acc.context_tables(), self.weights)
            top = self.acc.topk.get((name, slot.key))
            top_ft = top.result() if top is not None else None
            result.features = self._features_section(slot, vectors, state, top_ft, U_ft)
            features = self.features[slot.key]
            features.vectors[name] = vectors
            if top_ft is not None:
                features.topk[name] = top_ft.to_arrays()
            for hist_key, hist in {**ft_acc.histograms(), **pair.histograms()}.items():
                features.histograms[f"{name}/{hist_key}"] = hist
            self.results[slot.key].append(result)

    def _features_section(self, slot: SAESlot, vectors: Mapping[str, Any], state: BaseState, top_ft: Any, U_ft: Unembedding) -> dict[str, Any]:
        """Which features broke, with their text and what they promote on each model."""
        watched = list(self.options.watched_features)  # in range: checked before the pass
        rankings = rank_features(vectors, n=self.options.n_worst)
        ids = listed_ids(rankings, watched)
        W_dec = slot.sae.W_dec.detach()
        promoted = {name: promoted_tokens(W_dec, u.W, ids, scale=u.scale) for name, u in (("base", self.U_base), ("finetune", U_ft))}
        return build_features_section(vectors, rankings, {"base": state.topk, "finetune": top_ft}, self.tokens,
                                      getattr(self.base, "tokenizer", None), promoted, watched=watched, special_ids=self.special_ids)

    def output(self, slot: SAESlot, run_config: Mapping[str, Any]) -> EngineOutput:
        state = self.states[slot.key]
        for entry in (state.result, *self.results[slot.key]):
            note = nonfinite_loss_note(entry.metrics)
            if note and note not in entry.notes:
                entry.notes.append(note)
        config = {"hook_name": slot.sae.cfg.metadata.hook_name, **run_config, "outlier_norm": state.outlier_norm}
        report = TransferReport(config=config, base=state.result, finetunes=self.results[slot.key], features=self.features[slot.key])
        return EngineOutput(report=report, base_state=state, oom_splits=int(run_config.get("oom_batch_splits") or 0))


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


def base_state(name: str, acc: ModelAccumulator, weights: Resampler | None, outlier_norm: float | None, topk: Any = None) -> BaseState:
    """The base's result and what every pair needs from it (cacheable)."""
    return BaseState(
        result=_model_result(ModelResult, name, acc, weights),
        fire_count=acc.fire_count.clone(),
        n_eval=acc.n_eval,
        histograms=acc.histograms(),
        outlier_norm=outlier_norm,
        context_tables=acc.context_tables(),
        topk=topk,
    )


def _model_result(cls: Any, name: str, acc: ModelAccumulator, weights: Resampler | None) -> Any:
    stats, sum_x = acc.context_tables()
    return cls(
        model=name,
        metrics=clean_metrics(acc.summary()),
        ci95=model_intervals(stats, sum_x, weights) if weights is not None else {},
    )


def nonfinite_loss_note(metrics: Mapping[str, Any]) -> str | None:
    """Positions whose CE/KL was NaN or Inf though their activation was finite are left out of the
    loss means (``nonfinite_fraction`` counts activations only); say so, never silently."""
    n = int(metrics.get("n_nonfinite_loss") or 0)
    if n <= 0:
        return None
    total = int(metrics.get("n_tokens") or 0)
    return (
        f"{n} of {total} included tokens have a finite activation but a NaN/Inf loss (overflow after the hook, "
        "or NaN spread by attention); they are left out of ce_loss_* and kl_div_spliced (n_nonfinite_loss)"
    )
