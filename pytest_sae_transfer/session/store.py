"""The session's results between runs: cache keys built from everything that decides a
result, and base and pair results encoded as cache entries."""

from __future__ import annotations

import dataclasses
from typing import Any, ContextManager, Mapping

import torch

from ..engine import BaseState
from ..metrics.topk import TopKTable
from ..report import FinetuneResult, ModelResult, decode_histograms, encode_histograms
from .cache import MemoryOnlyCache, ResultCache, cache_key


@dataclasses.dataclass
class PairEntry:
    """What the session keeps per (finetune, SAE): the result, its per-feature vectors, its
    streamed histograms and the finetune's top-k activation table (arrays)."""

    result: FinetuneResult
    vectors: dict[str, Any]
    histograms: dict[str, Any]
    topk: dict[str, Any] | None = None


class ResultStore:
    """Reads and writes base and pair results under keys derived from ``key_parts``
    (``pair_parts``: what decides a pair's result beyond that, e.g. the watched features).

    A cache that cannot be written (full disk, read-only) costs a re-run later, never
    this run's verdict: the failure becomes a note in ``notes`` instead of an error.
    """

    def __init__(self, cache: ResultCache | MemoryOnlyCache, key_parts: Mapping[str, Any], notes: list[str],
                 pair_parts: Mapping[str, Any] | None = None) -> None:
        self.cache = cache
        self.key_parts = dict(key_parts)
        self.pair_parts = dict(pair_parts or {})
        self.notes = notes

    def base_key(self) -> str:
        return cache_key({"kind": "base", **self.key_parts})

    def pair_key(self, finetune_identity: str) -> str:
        return cache_key({"kind": "pair", "finetune": finetune_identity, **self.key_parts, **self.pair_parts})

    def lock(self, key: str) -> ContextManager[None]:
        return self.cache.lock(key)

    def get_base(self) -> BaseState | None:
        hit = self.cache.get(self.base_key())
        if hit is None:
            return None
        payload, arrays = hit
        return BaseState(
            result=ModelResult.from_json(payload["result"]),
            fire_count=torch.from_numpy(arrays["fire_count"]).double(),
            n_eval=float(payload["n_eval"]),
            histograms=decode_histograms(arrays),
            outlier_norm=payload.get("outlier_norm"),
            context_tables=(
                (torch.from_numpy(arrays["context_stats"]), torch.from_numpy(arrays["context_sum_x"]))
                if "context_stats" in arrays and "context_sum_x" in arrays
                else None
            ),
            topk=TopKTable.from_arrays(_prefixed(arrays, "topk::")) if "topk::values" in arrays else None,
        )

    def put_base(self, state: BaseState) -> None:
        arrays = {"fire_count": state.fire_count.numpy(), **encode_histograms(state.histograms)}
        if state.context_tables is not None:
            stats, sum_x = state.context_tables
            arrays.update({"context_stats": stats.numpy(), "context_sum_x": sum_x.numpy()})
        if state.topk is not None:
            arrays.update({f"topk::{k}": v for k, v in state.topk.to_arrays().items()})
        self._put(self.base_key(), {"result": state.result.to_json(), "n_eval": state.n_eval, "outlier_norm": state.outlier_norm}, arrays)

    def get_pair(self, finetune: str, finetune_identity: str) -> PairEntry | None:
        hit = self.cache.get(self.pair_key(finetune_identity))
        if hit is None:
            return None
        payload, arrays = hit
        result = FinetuneResult.from_json(payload["result"])
        result.model = finetune
        topk = _prefixed(arrays, "topk::")
        return PairEntry(result, _prefixed(arrays, "vec::"), decode_histograms(arrays), topk or None)

    def put_pair(self, finetune_identity: str, entry: PairEntry) -> None:
        arrays = {f"vec::{k}": v for k, v in entry.vectors.items()}
        arrays.update(encode_histograms(entry.histograms))
        arrays.update({f"topk::{k}": v for k, v in (entry.topk or {}).items()})
        self._put(self.pair_key(finetune_identity), {"result": dataclasses.replace(entry.result, checks=[]).to_json()}, arrays)

    def _put(self, key: str, payload: dict[str, Any], arrays: dict[str, Any]) -> None:
        try:
            self.cache.put(key, payload, arrays)
        except OSError as exc:
            note = f"could not write the result cache in {str(getattr(self.cache, 'root', ''))!r} ({exc}); results were not cached"
            if note not in self.notes:
                self.notes.append(note)


def _prefixed(arrays: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
