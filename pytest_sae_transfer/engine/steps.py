"""Small steps of a batch that are not a model's: the SAE round trip, the token mask,
the automatic outlier norm, out-of-memory recognition and the progress bar."""

from __future__ import annotations

import sys
from typing import Any

import torch

from .options import EngineError, EngineOptions
from .runner import ModelRunner


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@torch.no_grad()
def sae_roundtrip(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, reconstruction) as float32 on x's device. encode and decode stay paired:
    some normalisations (constant_norm_rescale) carry state from one to the other."""
    p = next(sae.parameters())
    feats = sae.encode(x.to(device=p.device, dtype=p.dtype))
    if feats.is_sparse:
        feats = feats.to_dense()
    x_hat = sae.decode(feats)
    return feats.to(device=x.device, dtype=torch.float32), x_hat.to(device=x.device, dtype=torch.float32)


def included_mask(toks: torch.Tensor, special: torch.Tensor, options: EngineOptions) -> torch.Tensor:
    if not options.exclude_special_tokens or special.numel() == 0:
        return torch.ones_like(toks, dtype=torch.bool)
    return ~torch.isin(toks, special.to(toks.device))


def auto_outlier_norms(runner: ModelRunner, tokens: torch.Tensor, special: torch.Tensor, options: EngineOptions,
                       layers: list[int]) -> dict[int, float]:
    """τ per layer = 2 x the mean base activation norm there, over included tokens (a pre-pass)."""
    total = dict.fromkeys(layers, 0.0)
    count = dict.fromkeys(layers, 0.0)
    for start in range(0, tokens.shape[0], options.batch_size):
        toks = tokens[start : start + options.batch_size].to(runner.device)
        included = included_mask(toks, special, options)
        for layer, x in runner.capture(toks, layers).items():
            norms = x.double().norm(dim=-1)
            ok = included & torch.isfinite(norms)
            total[layer] += float(norms[ok].sum())
            count[layer] += float(ok.sum())
    if any(c == 0 for c in count.values()):
        raise EngineError("no included tokens to estimate the automatic outlier norm from")
    return {layer: 2.0 * total[layer] / count[layer] for layer in layers}


def progress_bar(total: int, options: EngineOptions, desc: str) -> Any:
    show = options.progress
    stream = options.progress_file or sys.stderr
    if show is None:
        show = bool(getattr(stream, "isatty", lambda: False)())
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc, file=stream, dynamic_ncols=True, leave=True)
