"""The session's results between runs: cache keys built from everything that decides a
result, and base and pair results encoded as cache entries."""

from __future__ import annotations

import dataclasses
from typing import Any, ContextManager, Mapping

import torch

from ..engine import BaseState
from ..report import FinetuneResult, ModelResult, decode_histograms, encode_histograms
from .cache import MemoryOnlyCache, ResultCache, cache_key

#: What the session keeps per finetune: its result, its per-feature vectors and histograms.
PairEntry = tuple[FinetuneResult, dict[str, Any], dict[str, Any]]


class ResultStore:
    """Reads and writes base and pair results under keys derived from ``key_parts``.

    A cache that cannot be written (full disk, read-only) costs a re-run later, never
    this run's verdict: the failure becomes a note in ``notes`` instead of an error.
    """

    def __init__(self, cache: ResultCache | MemoryOnlyCache, key_parts: Mapping[str, Any], notes: list[str]) -> None:
        self.cache = cache
        self.key_parts = dict(key_parts)
        self.notes = notes

    def base_key(self) -> str:
        return cache_key({"kind": "base", **self.key_parts})

    def pair_key(self, finetune_identity: str) -> str:
        return cache_key({"kind": "pair", "finetune": finetune_identity, **self.key_parts})

    def lock(self, key: str) -> ContextManager[None]:
        return self.cache.lock(key)

    def get_base(self) -> BaseState | None:
        """The cached BaseState, or None."""
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
        )

    def put_base(self, state: BaseState) -> None:
        self._put(
            self.base_key(),
            {"result": state.result.to_json(), "n_eval": state.n_eval, "outlier_norm": state.outlier_norm},
            {"fire_count": state.fire_count.numpy(), **encode_histograms(state.histograms), **_tables(state)},
        )

    def get_pair(self, finetune: str, finetune_identity: str) -> PairEntry | None:
        hit = self.cache.get(self.pair_key(finetune_identity))
        if hit is None:
            return None
        payload, arrays = hit
        result = FinetuneResult.from_json(payload["result"])
        result.model = finetune
        vectors = {k[len("vec::"):]: v for k, v in arrays.items() if k.startswith("vec::")}
        return result, vectors, decode_histograms(arrays)

    def put_pair(self, finetune_identity: str, entry: PairEntry) -> None:
        result, vectors, hists = entry
        arrays = {f"vec::{k}": v for k, v in vectors.items()}
        arrays.update(encode_histograms(hists))
        self._put(self.pair_key(finetune_identity), {"result": dataclasses.replace(result, checks=[]).to_json()}, arrays)

    def _put(self, key: str, payload: dict[str, Any], arrays: dict[str, Any]) -> None:
        try:
            self.cache.put(key, payload, arrays)
        except OSError as exc:
            note = f"could not write the result cache in {str(getattr(self.cache, 'root', ''))!r} ({exc}); results were not cached"
            if note not in self.notes:
                self.notes.append(note)


def _tables(state: BaseState) -> dict[str, Any]:
    """The base's per-context tables as cache arrays (the finetunes' paired intervals need them)."""
    if state.context_tables is None:
        return {}
    stats, sum_x = state.context_tables
    return {"context_stats": stats.numpy(), "context_sum_x": sum_x.numpy()}
