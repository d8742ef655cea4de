#!/usr/bin/env python
"""What the streaming top-k table costs per batch, next to the accumulators the engine already runs.

One synthetic batch at a realistic size (default 2048 token rows = 16 contexts of 128,
d_sae = 16384, d_in = 2048, about 80 features firing per token) is fed to

* ``TopKAccumulator.update`` for the base and for the finetune (what feature-level
  transfer adds per batch and finetune),
* ``PairedAccumulator.update`` and ``ModelAccumulator.update`` x 2 (the per-batch
  accumulator work the engine already does for that pair; the model forward passes
  and the SAE come on top, so this is a lower bound of the engine's marginal time).

The top-k tables are warmed up first over ``--warmup`` batches, as they would be
after the start of a run (the first batches fill the tables and cost more; that
cost is reported separately). Timings interleave the measured functions and report
medians, because this machine is shared. Prints one JSON object.

    python benchmarks/bench_topk.py --threads 2 --repeat 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, default=16)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--d-in", type=int, default=2048)
    ap.add_argument("--l0", type=float, default=80.0, help="mean number of features firing per token")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--zoo-tokens", type=int, default=0,
                    help="instead: the whole zoo engine (toy-base + toy-code) on this many toy-eval tokens, "
                         "against top-k updates on the same batches' real features")
    args = ap.parse_args()
    if args.zoo_tokens:
        return zoo_main(args)

    import torch

    from pytest_sae_transfer.metrics.model import ModelAccumulator, ModelBatch
    from pytest_sae_transfer.metrics.paired import PairedAccumulator
    from pytest_sae_transfer.metrics.topk import TopKAccumulator

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    B, T, D, d_in = args.contexts, args.context_size, args.d_sae, args.d_in
    gen = torch.Generator().manual_seed(0)
    p_fire = args.l0 / D
    # A per-feature firing rate spread over three decades, as real SAEs have.
    rates = p_fire * torch.exp(torch.randn(D, generator=gen))

    def batch_feats(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        fire = torch.rand(B, T, D, generator=g) < rates
        return (torch.rand(B, T, D, generator=g) * 5 * fire).to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    included = torch.ones(B, T, dtype=torch.bool, device=dev)
    included[:, 0] = False  # BOS
    x_b = torch.randn(B, T, d_in, generator=gen).to(dev)
    x_f = x_b + 0.1 * torch.randn(B, T, d_in, generator=gen).to(dev)
    f_b, f_f = batch_feats(1), batch_feats(2)
    ce = torch.rand(B, T - 1, device=dev)
    kl = torch.rand(B, T, device=dev)

    def mbatch(x: torch.Tensor, f: torch.Tensor) -> ModelBatch:
        return ModelBatch(x=x, x_hat=0.9 * x, feats=f, included=included,
                          outlier=torch.zeros_like(included), ce_clean=ce, ce_spliced=ce, ce_zero=ce, kl=kl)

    topk_b, topk_f = TopKAccumulator(D, args.k), TopKAccumulator(D, args.k)
    t0 = time.perf_counter()
    topk_b.update(f_b, included, 0)
    sync()
    first_batch_s = time.perf_counter() - t0
    for i in range(1, args.warmup):
        topk_b.update(batch_feats(100 + i), included, i * B)
        topk_f.update(batch_feats(200 + i), included, i * B)
    offset = args.warmup * B

    paired = PairedAccumulator(D, T)
    model_b, model_f = ModelAccumulator(d_in, D), ModelAccumulator(d_in, D)
    mb_b, mb_f = mbatch(x_b, f_b), mbatch(x_f, f_f)

    # Fresh batches from the same distribution as the warm-up: a realistic steady state,
    # where a few entries still beat each feature's k-th value.
    steady = [(batch_feats(300 + i), batch_feats(400 + i)) for i in range(args.repeat)]

    def run_topk() -> None:
        nonlocal offset
        fb, ff = steady.pop()
        topk_b.update(fb, included, offset)
        topk_f.update(ff, included, offset)
        offset += B

    def run_paired() -> None:
        paired.update(x_b, x_f, f_b, f_f, included)

    def run_models() -> None:
        model_b.update(mb_b)
        model_f.update(mb_f)

    times: dict[str, list[float]] = {"topk_base_and_finetune": [], "paired_update": [], "model_updates_x2": []}
    fns = {"topk_base_and_finetune": run_topk, "paired_update": run_paired, "model_updates_x2": run_models}
    for _ in range(args.repeat):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "rows": B * T, "d_sae": D, "d_in": d_in, "l0": args.l0, "k": args.k, "device": str(dev),
        "threads": torch.get_num_threads(),
        "median_s": med,
        "min_s": {k: min(v) for k, v in times.items()},
        "first_batch_topk_one_model_s": first_batch_s,
        "topk_over_paired": med["topk_base_and_finetune"] / med["paired_update"],
        "topk_over_all_accumulators": med["topk_base_and_finetune"] / (med["paired_update"] + med["model_updates_x2"]),
    }
    print(json.dumps(out, indent=2))


def zoo_main(args: argparse.Namespace) -> None:
    """The engine's time on the zoo against the top-k updates of the same batches."""
    import torch

    from benchmarks.bench_engine import SPECIAL, load_all, pack_tokens
    from pytest_sae_transfer.engine import EngineOptions, evaluate_transfer
    from pytest_sae_transfer.engine.runner import ModelRunner, hook_layer, sae_roundtrip
    from pytest_sae_transfer.metrics.topk import TopKAccumulator

    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.contexts
    base, ft, sae = load_all("toy-code", None)
    tokens, info = pack_tokens(args.zoo_tokens, 128, batch)
    special = torch.tensor(SPECIAL)
    layer = hook_layer(sae.cfg.metadata.hook_name, base.cfg.n_layers)
    runners = [ModelRunner(m, layer, 1 << 24, True) for m in (base, ft)]
    feats = []
    with torch.no_grad():
        for lo in range(0, tokens.shape[0], batch):
            toks = tokens[lo : lo + batch]
            inc = ~torch.isin(toks, special)
            feats.append((lo, inc, [sae_roundtrip(sae, r.to_hook(toks))[0] for r in runners]))
    engine_s, topk_s = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        evaluate_transfer(base, {"toy-code": ft}, sae, tokens,
                          EngineOptions(batch_size=batch, special_token_ids=SPECIAL, progress=False))
        engine_s.append(time.perf_counter() - t)
        accs = [TopKAccumulator(sae.cfg.d_sae, args.k) for _ in runners]
        t = time.perf_counter()
        for lo, inc, fs in feats:
            for acc, f in zip(accs, fs):
                acc.update(f, inc, lo)
        topk_s.append(time.perf_counter() - t)
    e, k = statistics.median(engine_s), statistics.median(topk_s)
    print(json.dumps({
        **info, "batch_contexts": batch, "d_sae": sae.cfg.d_sae, "k": args.k, "threads": torch.get_num_threads(),
        "engine_s": engine_s, "topk_base_and_finetune_s": topk_s,
        "topk_over_engine": k / e,
    }, indent=2))


if __name__ == "__main__":
    main()
