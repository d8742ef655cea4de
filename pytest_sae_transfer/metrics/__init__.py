"""Streaming accumulators and the metric maths.

Each accumulator sees one batch at a time and keeps only O(d_in + d_sae) state
plus a few scalars per context (for the bootstrap), never a [tokens x d_sae]
tensor. Everything is accumulated in float64, whatever dtype the model runs in.

Modules: ``keys`` (metric names; no torch) · ``stats`` (Pearson from sums,
RowTable) · ``model`` (per-model accumulator and formulas) · ``paired``
(base-vs-finetune accumulator) · ``pairs`` (the paired block from the sums) ·
``weights`` (metrics from the weights alone) · ``bootstrap`` (intervals over
contexts) · ``topk`` (each feature's top activating tokens, streamed: O(d_sae x k))
· ``entries`` (a sparse batch's nonzero features, listed once and read by the
per-model, top-k and paired statistics instead of the dense tensor) · ``feature_rank``
(the worst-transferring features) · ``promoted`` (a feature's
top tokens from W_dec · W_U). This package's ``__init__`` imports nothing, so that the metric names
can be read without torch.
May import: nothing of the package but itself.
"""
