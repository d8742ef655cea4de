"""Streaming accumulators for the SPEC.md metrics.

Each accumulator sees one batch at a time and keeps only O(d_in + d_sae) state
plus a few scalars per context (for the bootstrap), never a [tokens x d_sae]
tensor. Everything is accumulated in float64, whatever dtype the model runs in.
"""

from __future__ import annotations

from .model import ModelAccumulator, ModelBatch
from .paired import PairedAccumulator
from .stats import pearson_from_sums

__all__ = ["ModelAccumulator", "ModelBatch", "PairedAccumulator", "pearson_from_sums"]
