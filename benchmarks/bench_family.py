#!/usr/bin/env python
"""A family of SAEs in one pass: the engine with every SAE of toy-res at once, against one
engine run per SAE, and against the sae_lens way once per SAE, on the toy zoo.

* multi     ``run_transfer_many(base, {ft}, {every SAE}, tokens)``: each model runs once
            per batch through the layers with every hook captured; the clean continuation
            is shared; each SAE adds its round trip and its spliced continuation.
* separate  ``run_transfer(base, {ft}, sae, tokens)`` once per SAE, one after the other.
* saelens   ``benchmarks.bench_engine.saelens_way`` once per SAE (run_evals on both
            models plus the study's paired pass), one after the other.

Each (side, token count) runs in a fresh subprocess, so its peak RSS is its own; models
load before the clock starts. The marginal time per token is the difference between two
token counts divided by the difference in tokens: what a longer run costs, without the
fixed part (the weight metrics, the bootstrap, the report).

Usage::

    python benchmarks/bench_family.py --tokens 16384 131072 --out benchmarks/results-family-cpu-2core.json
    python benchmarks/bench_family.py --side multi --tokens 16384      # one child run, one JSON line
    python benchmarks/bench_family.py --sides multi separate --threads 1 --repeat 3   # medians of 3, sides alternating
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_engine import SPECIAL, aggregate, cpu_seconds, current_rss_mb, pack_tokens, peak_rss_mb, run_child  # noqa: E402

SIDES = ("multi", "separate", "saelens")
#: The family: the standard SAE of toy-res at every layer of toy-base.
FAMILY = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post")


def child_run(side: str, n_tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sae_lens import SAE

    from pytest_sae_transfer import zoo
    from pytest_sae_transfer.engine import EngineOptions, run_transfer, run_transfer_many

    if args.threads:
        torch.set_num_threads(args.threads)
    base, ft = zoo.load_model("toy-base"), zoo.load_model(args.finetune)
    saes = {sid: SAE.load_from_disk(str(zoo.sae_dir("toy-res", sid)), device="cpu").eval() for sid in FAMILY}
    tokens, info = pack_tokens(n_tokens, args.context_size, args.batch_size)
    options = EngineOptions(batch_size=args.batch_size, special_token_ids=SPECIAL, progress=False)
    rss0, t0, c0 = current_rss_mb(), time.perf_counter(), cpu_seconds()
    checks: dict[str, Any] = {}
    if side == "multi":
        run = run_transfer_many(base, {args.finetune: ft}, saes, tokens, options)
        for sid, out in run.outputs.items():
            checks[sid] = out.report.finetune(args.finetune).metrics["ce_loss_delta"]
    elif side == "separate":
        for sid, sae in saes.items():
            out = run_transfer(base, {args.finetune: ft}, sae, tokens, options)
            checks[sid] = out.report.finetune(args.finetune).metrics["ce_loss_delta"]
    else:
        from bench_engine import saelens_way

        for sid, sae in saes.items():
            out = saelens_way(base, ft, sae, tokens, hook=sae.cfg.metadata.hook_name, special=SPECIAL,
                              batch_size=args.batch_size, quiet=True)
            checks[sid] = out["check"]["ft.ce_loss_spliced"]
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"side": side, "n_tokens": info["n_tokens"], "n_saes": len(saes), "elapsed_s": elapsed, "cpu_s": cpu,
            "tokens_per_s": info["n_tokens"] / elapsed, "tokens_per_cpu_s": info["n_tokens"] / cpu, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0,
            "cycled": info["cycled"], "check": checks, "torch_threads": torch.get_num_threads()}


def marginal_us(t_lo: float, t_hi: float, lo: int, hi: int) -> float:
    """Microseconds per token between two runs of ``lo`` and ``hi`` tokens (the fixed part drops out)."""
    return (t_hi - t_lo) / (hi - lo) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 131072])
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--side", choices=SIDES, help="run one side in this process and print one JSON line")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--finetune", default="toy-code")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each (side, token count) this many times, the sides alternating, and use the medians "
                         "(a shared machine's speed drifts between runs)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1; got {args.repeat}")
    if args.side:
        print(json.dumps(child_run(args.side, args.tokens[0], args)), flush=True)
        return 0
    runs = []
    for n in args.tokens:
        for rep in range(args.repeat):
            # alternate which side goes first, so that a drift in the machine's speed hits both
            for side in args.sides if rep % 2 == 0 else args.sides[::-1]:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--tokens", str(n), "--batch-size",
                       str(args.batch_size), "--context-size", str(args.context_size), "--finetune", args.finetune]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                print(f"[family] {side:8s} {n:>7d} tokens ...", file=sys.stderr, flush=True)
                res = run_child(cmd)
                res["repeat"] = rep
                runs.append(res)
                print(f"[family] {side:8s} {res['n_tokens']:>7d} tokens: {res['elapsed_s']:7.1f} s, peak RSS {res['peak_rss_mb']:6.0f} MB",
                      file=sys.stderr, flush=True)
    by = aggregate(runs)  # medians over the repeats
    counts = sorted({r["n_tokens"] for r in runs})
    summary: dict[str, Any] = {"marginal_us_per_token": {}, "peak_rss_mb": {}}
    lo, hi = counts[0], counts[-1]
    print(f"\n{len(FAMILY)} SAEs, toy-base vs {args.finetune}, batch {args.batch_size} x {args.context_size}"
          + (f", medians of {args.repeat} runs" if args.repeat > 1 else ""))
    print(f"{'side':9s} | " + " | ".join(f"{n:>7d} tok: s, MB" for n in counts) + " | marginal us/token")
    for side in args.sides:
        cells = [f"{by[(side, n)]['elapsed_s']:7.1f}, {by[(side, n)]['peak_rss_mb']:5.0f}" for n in counts]
        marginal = None
        if hi > lo:
            marginal = marginal_us(by[(side, lo)]["elapsed_s"], by[(side, hi)]["elapsed_s"], lo, hi)
        summary["marginal_us_per_token"][side] = marginal
        summary["peak_rss_mb"][side] = {str(n): by[(side, n)]["peak_rss_mb"] for n in counts}
        print(f"{side:9s} | " + " | ".join(f"{c:>18s}" for c in cells) + f" | {marginal:.1f}" if marginal is not None else "")
    m = summary["marginal_us_per_token"]
    if m.get("multi") and m.get("separate"):
        summary["multi_over_separate"] = m["multi"] / m["separate"]
        print(f"\nmulti / separate marginal time: {summary['multi_over_separate']:.2f} (target <= 0.6)")
        if args.repeat > 1 and hi > lo:
            # each repeat on its own, for the spread
            def marginal(side: str, rep: int) -> float:
                t = {r["n_tokens"]: r["elapsed_s"] for r in runs if r["side"] == side and r["repeat"] == rep}
                return marginal_us(t[lo], t[hi], lo, hi)

            summary["multi_over_separate_by_repeat"] = [marginal("multi", r) / marginal("separate", r) for r in range(args.repeat)]
            print("  by repeat: " + ", ".join(f"{x:.2f}" for x in summary["multi_over_separate_by_repeat"]))
    if m.get("multi") and m.get("saelens"):
        summary["saelens_over_multi"] = m["saelens"] / m["multi"]
        print(f"sae_lens way / multi marginal time: {summary['saelens_over_multi']:.2f}")
    if "multi" in args.sides and hi > lo:
        growth = by[("multi", hi)]["peak_rss_mb"] / by[("multi", lo)]["peak_rss_mb"] - 1
        summary["multi_peak_rss_growth"] = growth
        print(f"multi peak RSS {lo} -> {hi} tokens: {growth * 100:+.1f}% (target < 10%)")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary, "cpu_count": os.cpu_count()}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
