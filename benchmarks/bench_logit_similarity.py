#!/usr/bin/env python
"""Time logit similarity at a real model's width: the Gram-matrix implementation
(``pytest_sae_transfer.metrics.weights.logit_similarity``) against the previous one,
which formed every feature's logit weights d·W_U for both models (kept below as
``previous_logit_similarity``, verbatim from commit b8cd092).

Random float32 matrices of the study's shapes: W_dec [d_sae, d_model], a base
unembedding [d_model, vocab] ~ N(0, 0.02) and a finetune's, the base plus
``--noise`` x its RMS of Gaussian noise. The two results are compared feature by
feature.

    python benchmarks/bench_logit_similarity.py --arch gemma-2b            # 16384 x 2048 x 256000
    python benchmarks/bench_logit_similarity.py --arch gemma-2b --features 2048 --json out.json
    python benchmarks/bench_logit_similarity.py --arch mistral-7b --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {  # d_sae, d_model, vocab
    "gemma-2b": (16384, 2048, 256000),
    "mistral-7b": (65536, 4096, 32000),
    "tiny": (512, 64, 2000),
}


@torch.no_grad()
def previous_logit_similarity(W_dec: torch.Tensor, W_U_base: torch.Tensor, W_U_ft: torch.Tensor, n_vocab: int, chunk_elems: int = 1 << 25) -> torch.Tensor:
    """The implementation before the Gram-matrix one (commit b8cd092), for timing and comparison."""
    from pytest_sae_transfer.metrics.stats import rowwise_pearson

    d_sae = W_dec.shape[0]
    device = W_U_base.device
    compute_dtype = torch.float32
    Wb = W_U_base[:, :n_vocab].to(compute_dtype)
    Wf = W_U_ft[:, :n_vocab].to(device=device, dtype=compute_dtype)
    chunk = max(1, min(d_sae, chunk_elems // max(1, n_vocab)))
    out = torch.empty(d_sae, dtype=torch.float64)
    for start in range(0, d_sae, chunk):
        dec = W_dec[start : start + chunk].to(device=device, dtype=compute_dtype)
        out[start : start + chunk] = rowwise_pearson(dec @ Wb, dec @ Wf).cpu()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timed(fn: Any, device: torch.device) -> tuple[torch.Tensor, float, float]:
    _sync(device)
    c0, t0 = _cpu_s(), time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0, _cpu_s() - c0


def make_inputs(d_sae: int, d_model: int, vocab: int, noise: float, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    W_dec = torch.randn(d_sae, d_model, generator=gen, device=device)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    Wb = torch.empty(d_model, vocab, device=device).normal_(0.0, 0.02, generator=gen)
    Wf = torch.empty(d_model, vocab, device=device).normal_(0.0, 0.02 * noise, generator=gen).add_(Wb)
    return W_dec, Wb, Wf


def run(arch: str, features: int | None, noise: float, device: str, sides: list[str], quiet: bool = False) -> dict[str, Any]:
    from pytest_sae_transfer.metrics import weights

    d_sae, d_model, vocab = SHAPES[arch]
    d_sae = features or d_sae
    dev = torch.device(device)
    W_dec, Wb, Wf = make_inputs(d_sae, d_model, vocab, noise, dev)
    res: dict[str, Any] = {
        "arch": arch, "d_sae": d_sae, "d_model": d_model, "vocab": vocab, "noise": noise, "device": device,
        "torch_threads": torch.get_num_threads(), "loadavg_1min_before": os.getloadavg()[0],
        "multiply_adds": {"previous": 2 * d_sae * d_model * vocab, "gram": 3 * d_model * d_model * vocab + 3 * d_sae * d_model * d_model},
    }
    outs: dict[str, torch.Tensor] = {}
    for side in sides:
        if side == "gram":
            weights._BASE_CACHE.clear()  # cold: no Gram matrix from an earlier call
            out, wall, cpu = timed(lambda: weights.logit_similarity(W_dec, Wb, Wf, vocab), dev)
            # the same base with a second finetune reuses the base Gram matrix
            _, wall2, cpu2 = timed(lambda: weights.logit_similarity(W_dec, Wb, Wf, vocab), dev)
            res["gram_second_finetune_s"] = wall2
        else:
            out, wall, cpu = timed(lambda: previous_logit_similarity(W_dec, Wb, Wf, vocab), dev)
        outs[side] = out
        res[f"{side}_s"] = wall
        res[f"{side}_cpu_s"] = cpu
        if not quiet:
            print(f"[logit-sim] {arch} {side:8s}: {wall:8.2f} s wall, {cpu:8.2f} s CPU", file=sys.stderr, flush=True)
    if "gram" in outs and "previous" in outs:
        a, b = outs["gram"], outs["previous"]
        both = torch.isfinite(a) & torch.isfinite(b)
        res["max_abs_diff"] = float((a[both] - b[both]).abs().max()) if bool(both.any()) else None
        res["nan_mismatch"] = int((torch.isnan(a) != torch.isnan(b)).sum())
        res["speedup"] = res["previous_s"] / res["gram_s"]
    res["mean_similarity"] = {k: float(v[torch.isfinite(v)].mean()) for k, v in outs.items()}
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if dev.type == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(SHAPES), default="gemma-2b")
    ap.add_argument("--features", type=int, default=None, help="d_sae (default: the arch's SAE width)")
    ap.add_argument("--noise", type=float, default=0.05, help="finetune unembedding noise, relative to its RMS")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sides", nargs="+", default=["gram", "previous"], choices=["gram", "previous"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args.arch, args.features, args.noise, args.device, args.sides)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
