"""The batch loop. Per batch, each model runs once through the layers (every SAE's hook
captured on the way); then, SAE by SAE, the round trip and the statistics; then each
model's losses, the clean continuation shared by all SAEs. A CUDA out-of-memory error
halves the batch size and retries the same contexts: nothing of a batch is kept until
all of it has been computed, so nothing is counted twice."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ..metrics.entries import DensityGate, FeatureEntries, feature_entries
from ..metrics.model import L0_SUM, N_EVAL, BatchStats, ModelAccumulator, ModelBatch
from ..metrics.paired import PairBatchStats, PairedAccumulator
from ..metrics.topk import Candidates, TopKAccumulator
from .options import EngineError, EngineOptions
from .runner import ModelRunner
from .spill import BaseSpill, BaseView
from .steps import included_mask, is_oom, sae_roundtrip


@dataclasses.dataclass(frozen=True)
class SAESlot:
    """One SAE of the run: its key (how results are named), the SAE, the layer its hook reads,
    and the outlier norm τ at that layer (None: no mask)."""

    key: str
    sae: Any
    layer: int
    outlier_norm: float | None


@dataclasses.dataclass
class Accumulators:
    """Everything the pass accumulates, per SAE key: the base's own metrics (only for SAEs whose
    base result is not cached), and per (finetune, SAE key) the finetune's and the pair's."""

    base: dict[str, ModelAccumulator]
    finetunes: dict[tuple[str, str], ModelAccumulator]
    pairs: dict[tuple[str, str], PairedAccumulator]
    #: Top-k activating tokens per feature: the base's (with ``base``) and each (finetune, SAE)'s.
    topk_base: dict[str, TopKAccumulator] = dataclasses.field(default_factory=dict)
    topk: dict[tuple[str, str], TopKAccumulator] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Pending:
    """A batch, measured but not yet kept."""

    model: list[tuple[ModelAccumulator, BatchStats]] = dataclasses.field(default_factory=list)
    pairs: list[tuple[PairedAccumulator, PairBatchStats]] = dataclasses.field(default_factory=list)
    spills: list[tuple[BaseSpill, dict[str, torch.Tensor]]] = dataclasses.field(default_factory=list)
    topk: list[tuple[TopKAccumulator, Candidates]] = dataclasses.field(default_factory=list)


class Sweep:
    """Passes over ``tokens`` in batches. The batch size is sticky: once halved after an
    out-of-memory error it stays halved for the rest of the run (``batch_size``,
    ``oom_splits``), so later passes do not hit the same error again."""

    def __init__(
        self,
        slots: list[SAESlot],
        tokens: torch.Tensor,
        special: torch.Tensor,
        options: EngineOptions,
        base_runner: ModelRunner,
        accumulators: Accumulators,
        bar: Any = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.slots = slots
        self.layers = sorted({slot.layer for slot in slots})
        self.tokens = tokens
        self.special = special
        self.options = options
        self.base_runner = base_runner
        self.acc = accumulators
        self.bar = bar
        self.on_batch = on_batch
        self.batch_size = options.batch_size
        self.oom_splits = 0
        #: Per SAE: read its features as nonzero entries (sparse SAEs) or densely.
        self.density = DensityGate()

    def run(self, base_live: bool, ft_runners: list[tuple[str, ModelRunner]], spills: dict[str, BaseSpill] | None) -> None:
        """One sweep over the tokens. With ``base_live`` the base runs here (and is written to
        ``spills`` when given); otherwise its side of each batch is read back from ``spills``."""
        n_ctx = self.tokens.shape[0]
        if not base_live:
            # a finetune swept alone against the base's spill: the gate has seen only the base,
            # and a finetune whose features turned dense must not be listed on its first batch
            self.density = DensityGate()
        cursor = 0
        while cursor < n_ctx:
            toks_cpu = self.tokens[cursor : cursor + self.batch_size]
            try:
                pending = self._batch(toks_cpu, cursor, base_live, ft_runners, spills)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not is_oom(exc):
                    raise
                # Nothing of this batch was kept: retry it, and the rest, at half the size.
                self._halve(exc)
                continue
            for acc, st in pending.model:
                acc.commit(st)
            for pair, pst in pending.pairs:
                pair.commit(pst)
            for spill, packed in pending.spills:
                spill.write(cursor, packed)
            for top, cand in pending.topk:
                top.merge(cand)
            cursor += toks_cpu.shape[0]
            if self.bar is not None:
                self.bar.update(toks_cpu.numel() * ((1 if base_live else 0) + len(ft_runners)))
            if self.on_batch is not None:
                self.on_batch(cursor, n_ctx)

    def _batch(
        self, toks_cpu: torch.Tensor, cursor: int, base_live: bool, ft_runners: list[tuple[str, ModelRunner]],
        spills: dict[str, BaseSpill] | None,
    ) -> _Pending:
        device = self.base_runner.device
        toks = toks_cpu.to(device)
        included = included_mask(toks, self.special, self.options)
        pending = _Pending()
        base_xs = self.base_runner.capture(toks, self.layers) if base_live else {}
        ft_xs = {name: runner.capture(toks.to(runner.device), self.layers) for name, runner in ft_runners}
        base_spliced: list[tuple[SAESlot, ModelBatch, BatchStats]] = []  # base sides that need losses
        ft_spliced: dict[str, list[tuple[SAESlot, ModelBatch, BatchStats]]] = {name: [] for name, _ in ft_runners}
        for slot in self.slots:
            sparse = self.density.sparse(slot.key)
            if base_live:
                b = self._model_batch(slot, base_xs[slot.layer], included, sparse)
                view = BaseView(b.x, b.feats, included, b.finite_mask())
                base_entries = b.entries() if sparse else None
                base_acc = self.acc.base.get(slot.key)
                if base_acc is not None:
                    base_spliced.append((slot, b, self._measure(pending, base_acc, b, slot.key)))
                    self._top(pending, self.acc.topk_base.get(slot.key), b, cursor)
                if spills is not None:
                    pending.spills.append((spills[slot.key], BaseSpill.pack(view)))
            else:
                assert spills is not None
                view = spills[slot.key].read(cursor, toks_cpu.shape[0], device)
                base_entries = feature_entries(view.feats, view.included & view.finite) if sparse else None
            for name, runner in ft_runners:
                ft_included = included.to(runner.device)
                fb = self._model_batch(slot, ft_xs[name][slot.layer], ft_included, sparse)
                ft_spliced[name].append((slot, fb, self._measure(pending, self.acc.finetunes[(name, slot.key)], fb, slot.key)))
                self._top(pending, self.acc.topk.get((name, slot.key)), fb, cursor)
                dev = view.x.device
                mask = view.included & view.finite & fb.finite_mask().to(dev)
                entries = _pair_entries(base_entries, fb, dev)
                pair = self.acc.pairs[(name, slot.key)]
                pending.pairs.append((pair, pair.measure(view.x, fb.x.to(dev), view.feats, fb.feats.to(dev), mask, entries)))
                fb.release()  # measured: the dense features can go
            if base_live:
                b.release()
        if base_spliced:
            self._losses(self.base_runner, toks, base_xs, base_spliced)
        for name, runner in ft_runners:
            self._losses(runner, toks.to(runner.device), ft_xs[name], ft_spliced[name])
        return pending

    def _model_batch(self, slot: SAESlot, x: torch.Tensor, included: torch.Tensor, sparse: bool) -> ModelBatch:
        """One model's batch for one SAE: the activation, its round trip, the outlier mask, and
        (kept in ``x_spliced``) the input with the reconstruction spliced in."""
        feats, x_hat = sae_roundtrip(slot.sae, x)
        x32 = x.float()
        outlier = x32.norm(dim=-1) > slot.outlier_norm if slot.outlier_norm is not None else torch.zeros_like(included)
        batch = ModelBatch(x=x32, x_hat=x_hat, feats=feats, included=included, outlier=outlier, sparse=sparse)
        splice = (included & ~outlier).unsqueeze(-1)
        batch.x_spliced = torch.where(splice, x_hat.to(x.dtype), x)
        return batch

    @staticmethod
    def _top(pending: _Pending, top: TopKAccumulator | None, batch: ModelBatch, cursor: int) -> None:
        if top is None:
            return
        if batch.sparse:
            cand = top.candidates_from_entries(batch.entries(), cursor, batch.included.shape[1])
        else:
            cand = top.candidates(batch.feats, batch.included & batch.finite_mask(), cursor)
        pending.topk.append((top, cand))

    def _measure(self, pending: _Pending, acc: ModelAccumulator, batch: ModelBatch, key: str) -> BatchStats:
        st = acc.measure(batch)  # its finite mask is computed once and kept on the batch
        pending.model.append((acc, st))
        totals = st.stats[:, [L0_SUM, N_EVAL]].sum(0).tolist()
        self.density.observe(key, totals[0], totals[1] * acc.d_sae)
        return st

    @staticmethod
    def _losses(runner: ModelRunner, toks: torch.Tensor, xs: dict[int, torch.Tensor],
                sides: list[tuple[SAESlot, ModelBatch, BatchStats]]) -> None:
        """The model's continuations for every SAE at once; fills each SAE's loss statistics."""
        if not sides:
            return
        deepest = max(xs)
        ce_clean, per_sae = runner.losses(toks, (deepest, xs[deepest]), [(slot.layer, b.x_spliced) for slot, b, _ in sides])
        for (slot, b, st), losses in zip(sides, per_sae):
            b.ce_clean, b.ce_spliced, b.ce_zero, b.kl = ce_clean, losses.ce_spliced, losses.ce_zero, losses.kl
            b.x_spliced = None
            ModelAccumulator.measure_losses(st, b)

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


def _pair_entries(base: FeatureEntries | None, ft: ModelBatch, device: torch.device) -> tuple[FeatureEntries, FeatureEntries] | None:
    """Both sides' entries for the paired sums, on the base's device; None on the dense path."""
    if base is None:
        return None
    return base, ft.entries().to(device)
