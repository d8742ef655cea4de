"""The engine's options, its error type and what it returns."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import InputError
from ..report import ModelResult, TransferReport

ENGINE_VERSION = "3"  # 2: paired delta/ratio intervals, transfer rate, dense shift; 3: top-k tables, feature section


class EngineError(InputError, ValueError):
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
    # Feature-level answers: each feature's top_k activating tokens per model, the n_worst
    # features of each ranking, and watched (id, label) pairs that always get a card.
    top_k: int = 10
    n_worst: int = 20
    watched_features: tuple[tuple[int, str | None], ...] = ()


@dataclasses.dataclass
class BaseState:
    """What the paired metrics need from the base model; cacheable and shared by finetunes."""

    result: ModelResult
    fire_count: torch.Tensor  # float64 [d_sae]
    n_eval: float
    histograms: dict[str, dict[str, Any]]
    outlier_norm: float | None
    #: The base's per-context tables (stats, sum_x), for the finetunes' paired intervals.
    context_tables: tuple[torch.Tensor, torch.Tensor] | None = None
    #: The base's top-k activating tokens per feature (``metrics.topk.TopKTable``).
    topk: Any = None


@dataclasses.dataclass
class EngineOutput:
    report: TransferReport
    base_state: BaseState
    oom_splits: int = 0


@dataclasses.dataclass
class EngineRun:
    """A multi-SAE run: each SAE's output by key, and the out-of-memory halvings of the pass."""

    outputs: dict[str, EngineOutput]
    oom_splits: int = 0
