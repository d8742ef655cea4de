"""The batch loop: every model's batch through the SAE and into the accumulators, with a
CUDA out-of-memory error halving the batch size and retrying the same contexts."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ..metrics.model import ModelAccumulator, ModelBatch
from ..metrics.paired import PairedAccumulator
from .options import EngineError, EngineOptions
from .runner import ModelRunner, included_mask, is_oom, sae_roundtrip
from .spill import BaseSpill, BaseView, activations_finite


@dataclasses.dataclass
class Accumulators:
    """Everything the pass accumulates: the base's own metrics (None when its result came
    from the cache), each finetune's, and each base/finetune pair's."""

    base: ModelAccumulator | None
    finetunes: dict[str, ModelAccumulator]
    pairs: dict[str, PairedAccumulator]


class Sweep:
    """Passes over ``tokens`` in batches. The batch size is sticky: once halved after an
    out-of-memory error it stays halved for the rest of the run (``batch_size``,
    ``oom_splits``), so later passes do not hit the same error again."""

    def __init__(
        self,
        sae: Any,
        tokens: torch.Tensor,
        special: torch.Tensor,
        options: EngineOptions,
        outlier_norm: float | None,
        base_runner: ModelRunner,
        accumulators: Accumulators,
        bar: Any = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.sae = sae
        self.tokens = tokens
        self.special = special
        self.options = options
        self.tau = outlier_norm
        self.base_runner = base_runner
        self.acc = accumulators
        self.bar = bar
        self.on_batch = on_batch
        self.batch_size = options.batch_size
        self.oom_splits = 0

    def model_batch(self, runner: ModelRunner, toks: torch.Tensor, included: torch.Tensor, with_losses: bool) -> ModelBatch:
        """One model's batch: the hook activation, the SAE round trip and (``with_losses``) the continuations."""
        x = runner.to_hook(toks)
        feats, x_hat = sae_roundtrip(self.sae, x)
        x32 = x.float()
        outlier = x32.norm(dim=-1) > self.tau if self.tau is not None else torch.zeros_like(included)
        batch = ModelBatch(x=x32, x_hat=x_hat, feats=feats, included=included, outlier=outlier)
        if with_losses:
            splice = (included & ~outlier).unsqueeze(-1)
            x_spliced = torch.where(splice, x_hat.to(x.dtype), x)
            batch.ce_clean, batch.ce_spliced, batch.ce_zero, batch.kl = runner.continuations(toks, x, x_spliced)
        return batch

    def run(self, base_live: bool, ft_runners: list[tuple[str, ModelRunner]], spill: BaseSpill | None) -> None:
        """One sweep over the tokens. With ``base_live`` the base runs here (and is written to
        ``spill`` when given); otherwise its side of each batch is read back from ``spill``."""
        n_ctx = self.tokens.shape[0]
        cursor = 0
        while cursor < n_ctx:
            toks_cpu = self.tokens[cursor : cursor + self.batch_size]
            try:
                base_batch, base_view, fts = self._compute(toks_cpu, cursor, base_live, ft_runners, spill)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not is_oom(exc):
                    raise
                # Nothing of this batch was counted yet: retry it, and the rest, at half the size.
                self._halve(exc)
                continue
            self._accumulate(cursor, base_batch, base_view, fts, spill)
            cursor += toks_cpu.shape[0]
            if self.bar is not None:
                self.bar.update(toks_cpu.numel() * ((1 if base_live else 0) + len(ft_runners)))
            if self.on_batch is not None:
                self.on_batch(cursor, n_ctx)

    def _compute(
        self, toks_cpu: torch.Tensor, cursor: int, base_live: bool, ft_runners: list[tuple[str, ModelRunner]], spill: BaseSpill | None
    ) -> tuple[ModelBatch | None, BaseView, list[tuple[str, ModelBatch]]]:
        device = self.base_runner.device
        toks = toks_cpu.to(device)
        included = included_mask(toks, self.special, self.options)
        base_batch = None
        if base_live:
            base_batch = self.model_batch(self.base_runner, toks, included, self.acc.base is not None)
            base_view = BaseView(base_batch.x, base_batch.feats, included, activations_finite(base_batch))
        else:
            assert spill is not None
            base_view = spill.read(cursor, toks_cpu.shape[0], device)
        fts = [(name, self.model_batch(runner, toks.to(runner.device), included.to(runner.device), True)) for name, runner in ft_runners]
        return base_batch, base_view, fts

    def _accumulate(
        self, cursor: int, base_batch: ModelBatch | None, base_view: BaseView, fts: list[tuple[str, ModelBatch]], spill: BaseSpill | None
    ) -> None:
        if base_batch is not None:
            if self.acc.base is not None:
                self.acc.base.update(base_batch)
            if spill is not None:
                spill.write(cursor, base_view)
        dev = base_view.x.device
        for name, fb in fts:
            self.acc.finetunes[name].update(fb)
            mask = base_view.included & base_view.finite & activations_finite(fb).to(dev)
            self.acc.pairs[name].update(base_view.x, fb.x.to(dev), base_view.feats, fb.feats.to(dev), mask)

    def _halve(self, exc: BaseException) -> None:
        if self.batch_size == 1:
            raise EngineError(
                f"out of memory even at batch size 1 (started at {self.options.batch_size}, halved {self.oom_splits} time(s)): "
                f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}. Free device memory, or try --sae-sequential, "
                "a smaller --sae-context-size, --sae-dtype bfloat16 or float16, or --sae-device cpu"
            ) from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.batch_size = max(1, self.batch_size // 2)
        self.oom_splits += 1
