"""Tiny real models and SAEs that tests build for themselves (random weights, seeded)."""

from __future__ import annotations

import torch


def tiny_pair(seed: int = 0, d_model: int = 32, n_layers: int = 2, d_vocab: int = 100, n_ctx: int = 32, noise: float = 0.05):
    """A random HookedTransformer and a perturbed copy of it (the 'finetune')."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=2, d_head=d_model // 2, d_mlp=2 * d_model,
        n_ctx=n_ctx, d_vocab=d_vocab, act_fn="gelu", normalization_type="LN", seed=seed,
    )
    base = HookedTransformer(cfg).eval()
    ft = HookedTransformer(cfg).eval()
    ft.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return base, ft


def tiny_sae(d_in: int = 32, d_sae: int = 64, hook_name: str = "blocks.0.hook_resid_post", seed: int = 0, architecture: str = "standard", **extra):
    """A random sae_lens SAE; a negative encoder bias makes it sparse."""
    from sae_lens import SAE

    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"hook_name": hook_name, "context_size": 16, "prepend_bos": True, "model_name": "tiny"}}
    cfg.update(extra)
    torch.manual_seed(seed)
    sae = SAE.from_dict(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc) / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T.clone() * 0.5)
        if hasattr(sae, "b_enc"):
            sae.b_enc.fill_(-0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.1)
    return sae.eval()


def random_tokens(n_ctx: int, ctx: int, d_vocab: int = 100, seed: int = 0, bos: int = 0):
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(3, d_vocab, (n_ctx, ctx), generator=gen)
    toks[:, 0] = bos
    return toks


def zero_ablation_loss_per_token(model, layer: int, toks: torch.Tensor) -> torch.Tensor:
    """TransformerLens's own per-token loss with the hook activation zeroed: [B, T-1]
    (the reference for the engine's once-per-model zero-ablation CE)."""
    zeros = torch.zeros(*toks.shape, model.cfg.d_model)
    with torch.no_grad():
        return model(zeros, start_at_layer=layer, tokens=toks, return_type="loss", loss_per_token=True)


def one_sae(report: dict) -> dict:
    """A version-2 JSON report of a one-SAE run, seen as that SAE's entry with the run's
    config merged in (config, base, finetunes, passed): what most tests look at."""
    assert report["schema_version"] == 2 and len(report["saes"]) == 1, report.get("saes")
    entry = report["saes"][0]
    out = {"config": {**entry["config"], **report["config"]}, "base": entry["base"], "finetunes": entry["finetunes"],
           "passed": entry["passed"], "run_passed": report["passed"]}
    if "features_file" in report:
        out["features_file"] = report["features_file"]
    return out


def read_one_sae(path) -> dict:
    import json
    from pathlib import Path

    return one_sae(json.loads(Path(path).read_text(encoding="utf-8")))
