#!/usr/bin/env python
"""One prepared run for a single large GPU without network (H100/H200 class): the engine at
the study's full model sizes, in under 8 minutes.

Parts, in order, each with its own share of the time budget (``--budget-s``, default 450 s):

1. check     float32 vs bfloat16 on a short run: a full-depth Gemma-2b-shaped pair in
             float32 and the same weights cast to bfloat16, the engine on the same tokens;
             every compared metric must agree within the stated tolerance (below).
2. gemma     the full-size Gemma-2b-shaped pair (18 layers, vocab 256k, SAE 16,384 at
             blocks.6.hook_resid_post) in bfloat16 at 256k tokens: engine vs the sae_lens
             way vs the floor, after a small count (32k) for the marginal time; then the
             engine's logit similarity against the previous implementation on the GPU.
3. mistral   the full-size Mistral-7B-shaped pair (32 layers, SAE 65,536 at
             blocks.8.hook_resid_pre) in bfloat16 at 64k tokens (after 16k): engine vs the
             floor, and the sae_lens way when the projection says it fits.

The time guard: each part runs until its share of the budget is spent
(check by 12 %, gemma by 64 %, mistral by 97 % of what ``--budget-s`` leaves after the
imports). After the small
count, each side's time at the big count is projected as (its small-count time) x
(big / small), which overestimates, since the fixed cost is scaled too; the big count is cut
(to whole batches) until the projected sides fit the part's time left, and the output
says so. A side that still overruns is stopped at the next batch by a forward pre-hook on
the models' embeddings (``bench_real.deadline_guard``) and recorded as aborted. The
JSON is rewritten after every part, so a run killed from outside keeps what finished.
``gpu.sh`` wraps this in ``timeout`` as a last backstop.

bf16 vs float32 tolerance: the unit roundoff of bfloat16 is u = 2^-8 ≈ 3.9e-3 (8
significant bits). Each compared metric must satisfy |bf16 − fp32| <= 4u x max(|fp32|, 1)
≈ 0.0156 x max(|fp32|, 1): four roundings' worth, relative for the losses (CE ≈ 12.5
nats on these random models, so ≈ 0.2 nats) and absolute for the metrics bounded by 1
(explained variance, cosine, residual cosine, logit/activation similarity, KL under 1);
L0 gets 8u relative (features whose pre-activation sits within rounding of the ReLU
threshold flip). The observed differences are in the JSON next to the tolerances.

    python benchmarks/gpu.py                                  # the GPU run; JSON to $OUT/gpu-results.json
    python benchmarks/gpu.py --out results.json --budget-s 420
    python benchmarks/gpu.py --tiny                           # tiny dims on the CPU, seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import bench_real as br  # noqa: E402
import real_models as rm  # noqa: E402

U_BF16 = 2.0**-8  # unit roundoff of bfloat16
TOL = 4 * U_BF16
TOL_L0 = 8 * U_BF16

#: compared metric -> (tolerance, kind): "scaled": |d| <= tol * max(|ref|, 1)
CHECK_METRICS: dict[str, tuple[float, str]] = {
    "base.ce_loss_clean": (TOL, "scaled"), "ft.ce_loss_clean": (TOL, "scaled"),
    "base.ce_loss_spliced": (TOL, "scaled"), "ft.ce_loss_spliced": (TOL, "scaled"),
    "ft.ce_loss_zero_ablation": (TOL, "scaled"), "ft.kl_div_spliced": (TOL, "scaled"),
    "ft.explained_variance": (TOL, "scaled"), "ft.cossim": (TOL, "scaled"),
    "resid_cosine_mean": (TOL, "scaled"), "activation_similarity_mean": (TOL, "scaled"),
    "logit_similarity_mean": (TOL, "scaled"),
    "base.l0": (TOL_L0, "relative"), "ft.l0": (TOL_L0, "relative"),
}

FULL = {
    "check": {"arch": "gemma-2b", "layers": None, "context_size": 512, "batch_size": 8, "tokens": 4096, "device": "cuda"},
    "gemma": {"arch": "gemma-2b", "layers": None, "dtype": "bfloat16", "context_size": 1024, "batch_size": 8,
              "tokens": [32768, 262144], "sides": ["engine", "saelens", "floor"], "optional_sides": [], "device": "cuda"},
    "mistral": {"arch": "mistral-7b", "layers": None, "dtype": "bfloat16", "context_size": 1024, "batch_size": 8,
                "tokens": [16384, 65536], "sides": ["engine", "floor"], "optional_sides": ["saelens"], "device": "cuda"},
}
TINY = {
    "check": {"arch": "tiny-gemma", "layers": None, "context_size": 32, "batch_size": 4, "tokens": 128, "device": "cpu"},
    "gemma": {"arch": "tiny-gemma", "layers": None, "dtype": "bfloat16", "context_size": 32, "batch_size": 4,
              "tokens": [128, 512], "sides": ["engine", "saelens", "floor"], "optional_sides": [], "device": "cpu"},
    "mistral": {"arch": "tiny-mistral", "layers": None, "dtype": "bfloat16", "context_size": 32, "batch_size": 4,
                "tokens": [128, 256], "sides": ["engine", "floor"], "optional_sides": ["saelens"], "device": "cpu"},
}
PART_END = {"check": 0.12, "gemma": 0.64, "mistral": 0.97}  # fraction of the budget by which each part must end


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.parts_t0 = self.t0  # set after the imports: the parts share what is left

    def start_parts(self) -> None:
        self.parts_t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def part_deadline(self, part: str) -> float:
        """Absolute perf_counter time by which ``part`` must end."""
        left = self.budget_s - (self.parts_t0 - self.t0)
        return self.parts_t0 + PART_END[part] * left

    def left(self, part: str) -> float:
        return self.part_deadline(part) - time.perf_counter()


def free(device: str) -> None:
    """Between parts: drop the last part's models from the device (a full gc takes seconds
    with sae_lens and datasets loaded, so not between sides)."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def gpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, cuda=torch.version.cuda,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


class Args:
    """The knobs bench_real.run_side reads."""

    def __init__(self, batch_size: int, n_bootstrap: int = 1000, feature_chunk: int | None = None) -> None:  # noqa: D107
        self.batch_size = batch_size
        self.n_bootstrap = n_bootstrap
        self.feature_chunk = feature_chunk


def build(spec: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> rm.RealSetup:
    return rm.build(spec["arch"], layers=spec["layers"], dtype=dtype, device=spec["device"], n_ctx=spec["context_size"],
                    seed=seed, context_size=spec["context_size"])


def timed_side(side: str, setup: rm.RealSetup, toks: torch.Tensor, args: Args, device: torch.device, deadline: float) -> dict[str, Any]:
    handles = br.deadline_guard([setup.base, setup.finetune], deadline)
    t0 = time.perf_counter()
    try:
        rec = br.measure(lambda: br.run_side(side, setup, toks, args), device)
    except br.DeadlineExceeded:
        rec = {"aborted": "stopped by the time guard", "elapsed_s": time.perf_counter() - t0, "n_tokens": int(toks.numel())}
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory on one side: record it, keep the other sides
        rec = {"aborted": f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", "elapsed_s": time.perf_counter() - t0,
               "n_tokens": int(toks.numel()), "traceback": traceback.format_exc()}
        free(str(device))
    finally:
        for h in handles:
            h.remove()
    rec["side"] = side
    return rec


# --------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------


def part_check(spec: dict[str, Any], clock: Clock, log: Any) -> dict[str, Any]:
    deadline = clock.part_deadline("check")
    device = torch.device(spec["device"])
    t = time.perf_counter()
    setup = build(spec, torch.float32)
    build_s = time.perf_counter() - t
    toks = setup.tokens(spec["tokens"], spec["context_size"], spec["batch_size"], seed=11)
    args = Args(spec["batch_size"])
    res: dict[str, Any] = {"spec": {**spec, "n_tokens": int(toks.numel())}, "build_s": build_s, "notes": setup.notes,
                           "tolerance": {"u_bf16": U_BF16, "rule": "|bf16 - fp32| <= tol x max(|fp32|, 1); l0: <= tol x |fp32|",
                                         "tol": TOL, "tol_l0": TOL_L0}}
    fp32 = timed_side("engine", setup, toks, args, device, deadline)
    if fp32.get("aborted"):
        res["aborted"] = "float32 run: " + fp32["aborted"]
        return res
    bf16_setup = rm.RealSetup(
        arch=setup.arch, base=rm.cast_copy(setup.base, torch.bfloat16), finetune=rm.cast_copy(setup.finetune, torch.bfloat16),
        sae=setup.sae, hook=setup.hook, start_layer=setup.start_layer, notes=setup.notes, build_seconds={},
    )
    del setup
    free(spec["device"])
    bf16 = timed_side("engine", bf16_setup, toks, args, device, deadline)
    del bf16_setup
    free(spec["device"])
    if bf16.get("aborted"):
        res["aborted"] = "bfloat16 run: " + bf16["aborted"]
        return res
    rows = {}
    ok_all = True
    for key, (tol, kind) in CHECK_METRICS.items():
        a, b = fp32["check"].get(key), bf16["check"].get(key)
        if a is None or b is None:
            rows[key] = {"fp32": a, "bf16": b, "ok": a is None and b is None, "note": "undefined"}
            ok_all &= rows[key]["ok"]
            continue
        diff = abs(b - a)
        allowed = tol * (abs(a) if kind == "relative" else max(abs(a), 1.0))
        ok = diff <= allowed
        ok_all &= ok
        rows[key] = {"fp32": a, "bf16": b, "abs_diff": diff, "allowed": allowed, "ok": ok}
    res.update(metrics=rows, passed=ok_all, fp32_s=fp32["elapsed_s"], bf16_s=bf16["elapsed_s"],
               peak_gpu_mb={"fp32": fp32.get("peak_gpu_mb"), "bf16": bf16.get("peak_gpu_mb")})
    print(f"[gpu] check: bf16 vs fp32 {'PASSED' if ok_all else 'FAILED'} "
          f"(worst: {max(rows.items(), key=lambda kv: kv[1].get('abs_diff', 0) / max(kv[1].get('allowed', 1), 1e-30))[0]})", file=log, flush=True)
    return res


def part_compare(name: str, spec: dict[str, Any], clock: Clock, log: Any, logit_probe: bool) -> dict[str, Any]:
    deadline = clock.part_deadline(name)
    device = torch.device(spec["device"])
    t = time.perf_counter()
    setup = build(spec, br.DTYPES[spec["dtype"]])
    build_s = time.perf_counter() - t
    small, target = spec["tokens"]
    bs, ctx = spec["batch_size"], spec["context_size"]
    batch_tokens = bs * ctx
    toks_all = setup.tokens(target, ctx, bs, seed=7)
    args = Args(bs)
    sides = list(spec["sides"]) + list(spec["optional_sides"])
    res: dict[str, Any] = {"spec": spec, "build_s": build_s, "notes": list(setup.notes), "runs": []}
    print(f"[gpu] {name}: built in {build_s:.1f} s ({rm.n_params(setup.base) / 1e9:.2f} B params each); "
          f"{clock.left(name):.0f} s left for this part", file=log, flush=True)

    # warm-up: one batch per side, untimed
    t = time.perf_counter()
    handles = br.deadline_guard([setup.base, setup.finetune], deadline)
    try:
        br.warm_up(sides, setup, toks_all[:bs], args)
    except br.DeadlineExceeded:
        res["notes"].append("warm-up stopped by the time guard; part skipped")
        return res
    finally:
        for h in handles:
            h.remove()
    br.sync(device)
    res["warmup_s"] = time.perf_counter() - t

    def run_count(n_tokens: int, order: list[str]) -> dict[str, dict[str, Any]]:
        n_ctx = math.ceil(n_tokens / batch_tokens) * bs
        toks = toks_all[:n_ctx]
        out = {}
        for side in order:
            rec = timed_side(side, setup, toks, args, device, deadline)
            rec["repeat"] = 0
            res["runs"].append(rec)
            out[side] = rec
            gpu = f", peak GPU {rec['peak_gpu_mb'] / 1024:.1f} GB" if "peak_gpu_mb" in rec else ""
            msg = rec.get("aborted") or f"{rec['elapsed_s']:.1f} s, {rec['n_tokens'] / rec['elapsed_s']:.0f} tok/s{gpu}"
            print(f"[gpu] {name}: {side:8s} {int(toks.numel()):>7d} tokens: {msg}", file=log, flush=True)
        return out

    first = run_count(small, sides)
    done = {s for s, r in first.items() if not r.get("aborted")}
    n_small = int(toks_all[: math.ceil(small / batch_tokens) * bs].numel())
    rate = {s: first[s]["elapsed_s"] / first[s]["n_tokens"] for s in done}
    n_big, big_sides, notes = plan_big_count(
        rate, [s for s in spec["sides"] if s in done], [s for s in spec["optional_sides"] if s in done],
        target, n_small, batch_tokens, clock.left(name) - 5.0,
    )
    res["notes"].extend(notes)
    if n_big > n_small and big_sides:
        run_count(n_big, big_sides[::-1])  # the other order than the small count
    summary = br.summarize(res["runs"])
    res["summary"] = summary

    if logit_probe and time.perf_counter() < deadline - 10:
        res["logit_similarity"] = logit_probe_run(setup, device)
        print(f"[gpu] {name}: logit similarity gram {res['logit_similarity']['gram_s']:.2f} s vs previous "
              f"{res['logit_similarity'].get('previous_s', float('nan')):.2f} s", file=log, flush=True)
    del setup
    free(spec["device"])
    return res


def plan_big_count(
    rate: dict[str, float], must: list[str], optional: list[str], target: int, n_small: int, batch_tokens: int, left: float,
) -> tuple[int, list[str], list[str]]:
    """The time guard's plan for the big count: (tokens, sides, notes).

    ``rate`` is each side's seconds per token at the small count (its fixed cost included,
    so the projection over-estimates). The ``must`` sides run at the largest whole number of
    batches up to ``target`` that fits in ``left`` seconds; an ``optional`` side joins only if
    the target still fits with it. Below ``n_small`` tokens there is no second count.
    """
    notes: list[str] = []
    per_tok = sum(rate[s] for s in must)
    n_big = target if per_tok <= 0 else min(target, int(max(left, 0.0) / per_tok) // batch_tokens * batch_tokens)
    sides = list(must)
    for s in optional:
        if (per_tok + rate[s]) * target <= left:
            sides.append(s)
            per_tok += rate[s]
        else:
            notes.append(f"{s} left out at the big count: projected {rate[s] * target:.0f} s, not in the budget")
    if n_big <= n_small or not sides:
        notes.append(f"time guard: no time for a second token count (projected {per_tok * target:.0f} s at {target} tokens, "
                     f"{max(left, 0.0):.0f} s left); no marginal figures")
        return n_small, [], notes
    if n_big < target:
        notes.append(f"time guard: big count cut from {target} to {n_big} tokens (projected {per_tok * target:.0f} s, {left:.0f} s left)")
    return n_big, sides, notes


@torch.no_grad()
def logit_probe_run(setup: rm.RealSetup, device: torch.device) -> dict[str, Any]:
    from bench_logit_similarity import previous_logit_similarity, timed

    from pytest_sae_transfer.metrics import weights

    Wb, Wf = weights.folded_unembed(setup.base), weights.folded_unembed(setup.finetune)
    W_dec = setup.sae.W_dec.detach()
    n = min(Wb.shape[1], Wf.shape[1])
    weights._BASE_CACHE.clear()
    new, t_new, _ = timed(lambda: weights.logit_similarity(W_dec, Wb, Wf, n), device)
    old, t_old, _ = timed(lambda: previous_logit_similarity(W_dec, Wb, Wf, n), device)
    both = torch.isfinite(new) & torch.isfinite(old)
    return {"gram_s": t_new, "previous_s": t_old, "max_abs_diff": float((new[both] - old[both]).abs().max()) if bool(both.any()) else None,
            "dtype": str(Wb.dtype)}


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------


def print_table(doc: dict[str, Any], file: Any = sys.stdout) -> None:
    print(file=file)
    env = doc["environment"]
    print(f"GPU run on {env.get('gpu', 'no GPU')} ({'tiny mode' if doc['tiny'] else 'full size'}), "
          f"{doc['elapsed_s']:.0f} s of a {doc['budget_s']:.0f} s budget", file=file)
    print(f"{'part':8s} {'side':8s} {'tokens':>8s} {'time s':>8s} {'tok/s':>9s} {'peak GPU GB':>11s} {'peak RSS GB':>11s}", file=file)
    for name in ("gemma", "mistral"):
        part = doc["parts"].get(name)
        if not part or "runs" not in part:
            continue
        for r in part["runs"]:
            if r.get("aborted"):
                print(f"{name:8s} {r['side']:8s} {r['n_tokens']:>8d} {'aborted: ' + r['aborted']}", file=file)
                continue
            gpu = r.get("peak_gpu_mb")
            gpu_s = f"{gpu / 1024:11.1f}" if gpu is not None else f"{'-':>11s}"
            print(f"{name:8s} {r['side']:8s} {r['n_tokens']:>8d} {r['elapsed_s']:8.1f} {r['n_tokens'] / r['elapsed_s']:9.0f} "
                  f"{gpu_s} {r['peak_rss_mb'] / 1024:11.1f}", file=file)
    for name in ("gemma", "mistral"):
        part = doc["parts"].get(name)
        if not part or "summary" not in part:
            continue
        sides = part["summary"]["sides"]
        cells = []
        for side in br.SIDES:
            s = sides.get(side, {})
            if s.get("marginal_tokens_per_s_wall"):
                cells.append(f"{side} {s['marginal_tokens_per_s_wall']:.0f} tok/s (fixed {s['fixed_s_wall']:.1f} s)")
        if cells:
            print(f"{name}: marginal " + "; ".join(cells), file=file)
        r = part["summary"]["ratios"]
        for other in ("floor", "saelens"):
            v = r.get(f"engine_over_{other}_marginal_time_wall")
            if v:
                print(f"{name}: engine / {other} time per marginal token {v:.2f} ({other} / engine {1 / v:.2f}x)", file=file)
        if "logit_similarity" in part:
            ls = part["logit_similarity"]
            print(f"{name}: logit similarity {ls['gram_s']:.2f} s (Gram) vs {ls['previous_s']:.2f} s (previous), max |diff| {ls['max_abs_diff']}", file=file)
        for note in part.get("notes", []):
            print(f"{name}: note: {note}", file=file)
    chk = doc["parts"].get("check")
    if chk:
        if "metrics" in chk:
            print(f"check (bf16 vs fp32, {chk['spec']['arch']}, {chk['spec']['n_tokens']} tokens): {'PASSED' if chk['passed'] else 'FAILED'}", file=file)
            for key, row in chk["metrics"].items():
                if "abs_diff" in row:
                    print(f"  {key:28s} fp32 {row['fp32']:12.6g} bf16 {row['bf16']:12.6g} |diff| {row['abs_diff']:.3g} <= {row['allowed']:.3g} "
                          f"{'ok' if row['ok'] else 'FAIL'}", file=file)
        else:
            print(f"check: {chk.get('aborted') or chk.get('error') or 'not run'}", file=file)
    for name, part in doc["parts"].items():
        if part.get("error"):
            print(f"{name}: ERROR {part['error']}", file=file)
    for s in doc.get("skipped", []):
        print(f"skipped: {s}", file=file)


def write(doc: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu-results.json" if out else Path("gpu-results.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (seconds): keeps this script from rotting")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu-results.json, else ./gpu-results.json)")
    ap.add_argument("--budget-s", type=float, default=None, help="total time budget (default 450; --tiny: 600, a busy CPU)")
    ap.add_argument("--parts", nargs="+", default=["check", "gemma", "mistral"], choices=["check", "gemma", "mistral"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU work)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = TINY if args.tiny else FULL
    budget = args.budget_s or (600.0 if args.tiny else 450.0)
    clock = Clock(budget)
    out = Path(args.out) if args.out else default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = sys.stderr
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")

    import sae_lens  # noqa: F401  (the imports before the parts: ~7 s)
    import transformer_lens  # noqa: F401

    clock.start_parts()
    doc: dict[str, Any] = {"tiny": args.tiny, "budget_s": budget, "environment": gpu_info(), "plan": plan, "parts": {}, "skipped": []}
    for name in args.parts:
        if clock.left(name) < (2 if args.tiny else 20):
            doc["skipped"].append(f"{name}: its share of the budget was already spent ({clock.now():.0f} s in)")
            continue
        try:
            if name == "check":
                doc["parts"][name] = part_check(plan[name], clock, log)
            else:
                doc["parts"][name] = part_compare(name, plan[name], clock, log, logit_probe=(name == "gemma"))
        except Exception as exc:  # noqa: BLE001 - record, free, go on with the next part
            doc["parts"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(f"[gpu] {name}: ERROR {type(exc).__name__}: {exc}", file=log, flush=True)
        free(plan[name]["device"])
        doc["elapsed_s"] = clock.now()
        write(doc, out)
    doc["elapsed_s"] = clock.now()
    write(doc, out)
    print_table(doc)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
