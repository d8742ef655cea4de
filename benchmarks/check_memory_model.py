#!/usr/bin/env python
"""The engine's memory model (``pytest_sae_transfer.engine.memory``) against measured CPU peaks.

Builds a real-width random base/finetune pair and SAE (``real_models.py``), runs the engine
at each ``--batch-sizes`` on the same tokens, and measures, per run, the peak RSS above
the RSS before the run (the loaded models and SAE): over the whole run, over the token
pass (up to the last batch) and over what follows it (weight metrics, bootstrap, report).
The kernel's high-water mark is reset before each run (``/proc/self/clear_refs``) and an
RSS sampler splits the phases. The memory model predicts device memory; on the CPU the
comparable figure is its total less the weights it counts (models and SAEs), which the
RSS before the run already holds.

    python benchmarks/check_memory_model.py --arch gemma-2b --layers 1 --tokens 512 --batch-sizes 2 4
    python benchmarks/check_memory_model.py --arch mistral-7b --layers 1 --tokens 512 --batch-sizes 2 4
    python benchmarks/check_memory_model.py --arch tiny-gemma --tokens 128 --batch-sizes 1 2   # seconds

``--package-root DIR`` imports the package from DIR instead (e.g. an older commit's tree
from ``git archive``), to measure it with the same script; it has no memory model, so
only the measurement is recorded. Results are appended to ``--json`` (a list of records).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _use_package_root(root: str | None) -> None:
    """Import pytest_sae_transfer from ``root`` (ahead of the editable install's finder)."""
    if root is None:
        sys.path.insert(0, str(REPO))
        return
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    sys.path.insert(0, str(Path(root).resolve()))


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # VmHWM := VmRSS


def trim() -> None:
    """Give freed heap back to the OS, so that the RSS before a run holds only live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Sampler(threading.Thread):
    def __init__(self, interval_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.samples, self.stop = interval_s, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), rss_mb()))
            time.sleep(self.interval_s)


def measure(setup: Any, tokens: Any, batch_size: int, n_bootstrap: int) -> dict[str, Any]:
    from pytest_sae_transfer.engine import EngineOptions, run_transfer
    from pytest_sae_transfer.metrics import weights

    getattr(weights, "_BASE_CACHE", []).clear()  # each run computes its base Gram matrix
    opts = EngineOptions(batch_size=batch_size, special_token_ids=setup.special_ids, n_bootstrap=n_bootstrap, progress=False)
    trim()
    before = rss_mb()
    stamps: list[float] = []
    sampler = Sampler()
    reset_peak()
    sampler.start()
    t0 = time.perf_counter()
    out = run_transfer(setup.base, {"finetune": setup.finetune}, setup.sae, tokens, opts,
                       on_batch=lambda c, n: stamps.append(time.perf_counter()))
    elapsed = time.perf_counter() - t0
    peak = rss_mb("VmHWM")
    sampler.stop.set()
    sampler.join()
    last = stamps[-1]
    pass_peak = max((r for t, r in sampler.samples if t <= last), default=float("nan"))
    end_peak = max((r for t, r in sampler.samples if t > last), default=float("nan"))
    config = dict(out.report.config)
    rec = {
        "batch_size": batch_size, "n_tokens": int(tokens.numel()), "elapsed_s": round(elapsed, 1),
        "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
        "measured_increment_mb": round(peak - before, 1),
        "measured_pass_increment_mb": round(pass_peak - before, 1),  # sampled (10 ms)
        "measured_end_increment_mb": round(end_peak - before, 1),
        "ce_clean": out.report.base.metrics.get("ce_loss_clean"),
        "logit_similarity_mean": out.report.finetunes[0].paired.get("logit_similarity_mean"),
        "unembed_frobenius_ratio": out.report.finetunes[0].paired.get("unembed_frobenius_ratio"),
    }
    if "memory_estimate" in config:
        rec["memory_estimate"] = config["memory_estimate"]
    del out
    trim()
    return rec


def predict(setup: Any, tokens: Any, batch_size: int) -> dict[str, Any] | None:
    try:
        from pytest_sae_transfer.engine import memory
    except ImportError:
        return None
    from pytest_sae_transfer.engine import EngineOptions

    opts = EngineOptions(batch_size=batch_size)
    est = memory.estimate(memory.ModelShape.of(setup.base), [memory.SAEShape.of(setup.sae)], batch_size, int(tokens.shape[1]),
                          n_finetunes=1, top_k=opts.top_k, logits_chunk_elems=opts.logits_chunk_elems)
    t = est.terms
    held = t["weights"] + t["saes"]  # already in the RSS before the run
    mb = 2.0**20
    return {
        "total_mb": round(est.total / mb, 1),
        "weights_mb": round(held / mb, 1),
        "predicted_increment_mb": round((est.total - held) / mb, 1),
        "predicted_pass_increment_mb": round((est.resident + est.per_batch - held) / mb, 1),
        "predicted_end_increment_mb": round((est.resident + t["weight_metrics"] - held) / mb, 1),
        "breakdown_mb": {k: round(v / mb, 1) for k, v in t.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gemma-2b")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--n-bootstrap", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--package-root", default=None, help="import pytest_sae_transfer from this directory")
    ap.add_argument("--label", default=None, help="what this code is (e.g. 'before', 'after')")
    ap.add_argument("--json", default=str(HERE / "results-memory-model-cpu.json"))
    args = ap.parse_args(argv)
    _use_package_root(args.package_root)
    sys.path.insert(0, str(HERE))
    import torch

    import real_models as rm

    torch.set_num_threads(args.threads)
    import pytest_sae_transfer

    t = time.perf_counter()
    setup = rm.build(args.arch, layers=args.layers, n_ctx=args.context_size, context_size=args.context_size)
    print(f"[check] {args.arch} x{args.layers} built in {time.perf_counter() - t:.0f} s; package {pytest_sae_transfer.__file__}; "
          f"RSS {rss_mb():.0f} MB", file=sys.stderr, flush=True)
    tokens = setup.tokens(args.tokens, args.context_size, max(args.batch_sizes), seed=7)
    # warm-up (lazy imports, thread pools) on one context, weight metrics stubbed out
    with rm.logit_similarity_skipped():
        measure(setup, tokens[:1], 1, 10)
    records = []
    for b in args.batch_sizes:
        rec = {"arch": args.arch, "layers": args.layers, "context_size": args.context_size, "label": args.label,
               "package": str(Path(pytest_sae_transfer.__file__).parent), **measure(setup, tokens, b, args.n_bootstrap)}
        pred = predict(setup, tokens, b)
        if pred is not None:
            rec["prediction"] = pred
            rec["predicted_over_measured"] = round(pred["predicted_increment_mb"] / rec["measured_increment_mb"], 3)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    path = Path(args.json)
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + records, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
