"""The feature-level pipeline on the real toy zoo, wired by hand the way the engine will wire it:
the engine's own pass for the per-feature vectors, a top-k table per model from the same
batches of SAE features, the worst-feature lists, promoted tokens and the report section.

Used by tests/test_feature_zoo.py and by scripts/feature_cards_sample.py (the sample page).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

SPECIAL = (0, 1, 2)  # the zoo tokenizer's <bos>, <eos>, <pad>


@functools.lru_cache(maxsize=None)
def zoo_tokens(n_contexts: int = 64, context_size: int = 128, dataset: str = "toy-eval-code") -> torch.Tensor:
    from pytest_sae_transfer import zoo
    from pytest_sae_transfer.loading import load_tokens

    tok = zoo.load_tokenizer()
    return load_tokens(dataset, tok, n_contexts * context_size, context_size, special_token_ids=SPECIAL).tokens


def run_features(
    finetune: str,
    watched: tuple[tuple[int, str | None], ...] = (),
    n_contexts: int = 64,
    batch_size: int = 16,
    dataset: str = "toy-eval-code",
    top_n: int = 20,
    k: int = 10,
) -> dict[str, Any]:
    """Everything the feature section needs for toy-base -> ``finetune``, and the section."""
    from pytest_sae_transfer import zoo
    from pytest_sae_transfer.engine import EngineOptions, evaluate_transfer
    from pytest_sae_transfer.engine.runner import ModelRunner, hook_layer
    from pytest_sae_transfer.engine.steps import sae_roundtrip
    from pytest_sae_transfer.metrics.feature_rank import rank_features
    from pytest_sae_transfer.metrics.promoted import promoted_tokens
    from pytest_sae_transfer.metrics.topk import TopKAccumulator
    from pytest_sae_transfer.metrics.weights import folded_unembed
    from pytest_sae_transfer.report.feature_section import build_features_section, listed_ids

    base, ft = zoo.load_model("toy-base"), zoo.load_model(finetune)
    sae = zoo.load_sae("toy-res")
    tok = zoo.load_tokenizer()
    tokens = zoo_tokens(n_contexts, 128, dataset)
    report = evaluate_transfer(base, {finetune: ft}, sae, tokens,
                               EngineOptions(batch_size=batch_size, special_token_ids=SPECIAL, progress=False,
                                             watched_features=watched, top_k=k, n_worst=top_n))
    layer = hook_layer(sae.cfg.metadata.hook_name, base.cfg.n_layers)
    special = torch.tensor(SPECIAL)
    accs = {"base": TopKAccumulator(sae.cfg.d_sae, k), "finetune": TopKAccumulator(sae.cfg.d_sae, k)}
    runners = {"base": ModelRunner(base, 1 << 24, True), "finetune": ModelRunner(ft, 1 << 24, True)}
    with torch.no_grad():
        for lo in range(0, tokens.shape[0], batch_size):
            toks = tokens[lo : lo + batch_size]
            for side, runner in runners.items():
                feats, _ = sae_roundtrip(sae, runner.capture(toks, [layer])[layer])
                included = ~torch.isin(toks, special) & torch.isfinite(feats).all(-1)
                accs[side].update(feats, included, lo)
    tables = {side: acc.result() for side, acc in accs.items()}
    vectors = report.features.vectors[finetune]
    rankings = rank_features(vectors, n=top_n)
    ids = listed_ids(rankings, watched)
    promoted = {
        "base": promoted_tokens(sae.W_dec, folded_unembed(base), ids),
        "finetune": promoted_tokens(sae.W_dec, folded_unembed(ft), ids),
    }
    section = build_features_section(vectors, rankings, tables, tokens, tok, promoted, watched=watched)
    return {"report": report, "tables": tables, "vectors": vectors, "rankings": rankings, "promoted": promoted,
            "section": section, "tokens": tokens, "tokenizer": tok, "sae": sae}
