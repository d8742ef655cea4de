#!/usr/bin/env python
"""The engine against the sae_lens way and against the floor, at the study's real model sizes.

Models: ``real_models.py`` (random weights of the exact Gemma-2b / Mistral-7B shapes, a
seeded perturbed copy as the finetune, a real-width standard SAE at the study's hook).
Three sides, run in one process and alternating (the order flips every repeat), on the
same random contexts:

* engine   ``run_transfer(base, {"finetune": ft}, sae, tokens, EngineOptions(...))``,
           every metric and its bootstrap intervals.
* saelens  the sae_lens way exactly as ``bench_engine.py`` defines it (imported from
           there): ``run_evals`` for each model, the study's paired pass keeping both
           models' features in memory as [tokens x d_sae], its paired metrics and the
           logit weights of the regular features (computed ``--feature-chunk`` features
           at a time so the float64 temporaries stay bounded at real widths).
* floor    per batch and model: one full forward pass with its loss (capturing the hook
           activation on the way), the SAE round trip, and one spliced continuation with
           its loss (TransformerLens's own loss over full logits). Nothing else: the passes
           any tool needs to report clean and spliced CE, written the plain way; the
           engine's chunked in-place CE/KL and fused continuations can beat it.

For each side it reports tokens/s at each token count, the marginal time per token
between the counts (least squares over the counts), the fixed cost (the intercept: time
that does not grow with tokens), and the peak RSS. The engine's fixed cost is also
broken down: model building (outside every side's clock), time before the first batch
finishes beyond a normal batch, time after the last batch (weight metrics, bootstrap,
assembly), and the weight metrics' logit similarity timed on its own.

Peak RSS, in process: before each side the kernel's high-water mark is reset
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and ``VmHWM`` is read after it; the
figure includes the models (reported separately as the RSS before the side). With
``--isolate``, each side additionally runs once at the largest token count in a fresh
subprocess (which builds the same seeded models) and its ``ru_maxrss`` is reported, as
``bench_engine.py`` measures.

    python benchmarks/bench_real.py --arch gemma-2b --layers 8 --tokens 2048 8192 --json out.json
    python benchmarks/bench_real.py --arch gemma-2b --layers 1 --tokens 256 512 --batch-size 2   # ~11 GB
    python benchmarks/bench_real.py --arch tiny-gemma --tokens 256 512 --context-size 32          # seconds

Memory (float32, CPU): a Gemma-2b-shaped model is ~4.6 GB at 1 layer plus ~0.44 GB per
further layer (8 layers: ~7.7 GB), and two are resident. On top of them, a batch of
``batch_size x context_size`` tokens costs about 4 x tokens x vocab x 4 bytes in the
sae_lens side's run_evals (full-vocabulary logits for clean, spliced and zero-ablated
runs and their log-softmax): 2 GB per 128 tokens of batch at Gemma's 256k vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import bench_engine  # noqa: E402  (the sae_lens way, and its timing helpers)
import real_models as rm  # noqa: E402

SIDES = ("engine", "saelens", "floor")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeadlineExceeded(RuntimeError):
    """A side ran past the time it was given (see :func:`deadline_guard`)."""


# --------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mb(field: str) -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _meminfo_mb(field: str) -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("inf")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def deadline_guard(models: list[Any], deadline: float | None) -> list[Any]:
    """Make every forward pass that starts at the embedding raise :class:`DeadlineExceeded`
    once ``time.perf_counter()`` passes ``deadline`` (so a side stops within a batch of it).
    Returns the hook handles; remove them with ``h.remove()``."""
    if deadline is None:
        return []

    def check(module: Any, inputs: Any) -> None:
        if time.perf_counter() > deadline:
            raise DeadlineExceeded("time budget spent")

    return [m.embed.register_forward_pre_hook(check) for m in models]


def measure(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run one side: wall and CPU time, RSS before and peak (VmHWM reset), GPU peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hwm_reset = reset_peak_rss()
    rss_before = _proc_status_mb("VmRSS")
    load0 = os.getloadavg()[0]
    sync(device)
    c0, t0 = bench_engine.cpu_seconds(), time.perf_counter()
    out = fn()
    sync(device)
    wall = time.perf_counter() - t0
    rec = {
        "elapsed_s": wall, "cpu_s": bench_engine.cpu_seconds() - c0, "loadavg_1min": [load0, os.getloadavg()[0]],
        "rss_before_mb": rss_before,
        "peak_rss_mb": _proc_status_mb("VmHWM") if hwm_reset else float("nan"),
        **out,
    }
    if device.type == "cuda":
        rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return rec


# --------------------------------------------------------------------------
# the three sides
# --------------------------------------------------------------------------


def side_engine(setup: rm.RealSetup, tokens: torch.Tensor, batch_size: int, n_bootstrap: int = 1000, chunk_elems: int | None = None) -> dict[str, Any]:
    from pytest_sae_transfer.engine import EngineOptions, run_transfer

    stamps: list[float] = []
    kw = {} if chunk_elems is None else {"logits_chunk_elems": chunk_elems}
    opts = EngineOptions(batch_size=batch_size, special_token_ids=setup.special_ids, n_bootstrap=n_bootstrap, progress=False, **kw)
    t0 = time.perf_counter()
    out = run_transfer(setup.base, {"finetune": setup.finetune}, setup.sae, tokens, opts, on_batch=lambda c, n: stamps.append(time.perf_counter()))
    t_end = time.perf_counter()
    rep = out.report
    ft = rep.finetune("finetune")
    n_batches = len(stamps)
    per_batch = (stamps[-1] - stamps[0]) / (n_batches - 1) if n_batches > 1 else float("nan")
    phases = {
        "first_batch_s": stamps[0] - t0 if stamps else float("nan"),
        "batches_s": stamps[-1] - t0 if stamps else float("nan"),
        "per_batch_s": per_batch,
        # weight metrics (logit similarity, norms, deviation) + bootstrap + report assembly
        "after_last_batch_s": t_end - stamps[-1] if stamps else float("nan"),
        "engine_pass_s": float(rep.config.get("elapsed_seconds") or float("nan")),
    }
    if n_batches > 1:
        # the first batch's excess over a steady batch: setup, the once-per-model zero-ablation run, warm-up
        phases["first_batch_excess_s"] = phases["first_batch_s"] - per_batch
    m_b, m_f = rep.base.metrics, ft.metrics
    return {
        "n_tokens": int(tokens.numel()), "phases_s": phases, "oom_batch_splits": out.oom_splits,
        "check": {
            "base.l0": m_b.get("l0"), "ft.l0": m_f.get("l0"),
            "base.ce_loss_clean": m_b.get("ce_loss_clean"), "ft.ce_loss_clean": m_f.get("ce_loss_clean"),
            "base.ce_loss_spliced": m_b.get("ce_loss_spliced"), "ft.ce_loss_spliced": m_f.get("ce_loss_spliced"),
            "ft.ce_loss_zero_ablation": m_f.get("ce_loss_zero_ablation"),
            "ft.kl_div_spliced": m_f.get("kl_div_spliced"), "ft.explained_variance": m_f.get("explained_variance"),
            "ft.cossim": m_f.get("cossim"),
            "resid_cosine_mean": ft.paired.get("resid_cosine_mean"),
            "activation_similarity_mean": ft.paired.get("activation_similarity_mean"),
            "logit_similarity_mean": ft.paired.get("logit_similarity_mean"),
            "n_regular_features": ft.paired.get("n_regular_features"),
            "unembed_frobenius_ratio": ft.paired.get("unembed_frobenius_ratio"),
        },
    }


@torch.no_grad()
def side_floor(setup: rm.RealSetup, tokens: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Per batch and model: a full forward with loss (the hook activation captured on the
    way), the SAE round trip, one spliced continuation with loss. Nothing else."""
    sae, hook, layer = setup.sae, setup.hook, setup.start_layer
    p = next(sae.parameters())
    device = next(setup.base.parameters()).device
    sums = {"base": [0.0, 0.0], "ft": [0.0, 0.0]}
    n_batches = tokens.shape[0] // batch_size
    for i in range(n_batches):
        toks = tokens[i * batch_size : (i + 1) * batch_size].to(device)
        for tag, model in (("base", setup.base), ("ft", setup.finetune)):
            grabbed: dict[str, torch.Tensor] = {}

            def grab(act: torch.Tensor, hook: Any) -> None:
                grabbed["x"] = act

            clean = model.run_with_hooks(toks, return_type="loss", fwd_hooks=[(hook, grab)])
            x = grabbed.pop("x")
            x_hat = sae.decode(sae.encode(x.to(p.dtype))).to(x.dtype)
            spliced = model(x_hat, start_at_layer=layer, tokens=toks, return_type="loss")
            sums[tag][0] += float(clean)
            sums[tag][1] += float(spliced)
    return {
        "n_tokens": int(tokens.numel()),
        "check": {
            "base.ce_loss_clean_all_tokens": sums["base"][0] / n_batches, "ft.ce_loss_clean_all_tokens": sums["ft"][0] / n_batches,
            "base.ce_loss_spliced_all_tokens": sums["base"][1] / n_batches, "ft.ce_loss_spliced_all_tokens": sums["ft"][1] / n_batches,
        },
    }


def default_feature_chunk(setup: rm.RealSetup) -> int:
    """Features per chunk of the sae_lens side's float64 logit weights: about 2^26 elements."""
    return max(64, (1 << 26) // setup.base.cfg.d_vocab)


def side_saelens(
    setup: rm.RealSetup, tokens: torch.Tensor, batch_size: int, feature_chunk: int | None = None, logit_weights: bool = True,
) -> dict[str, Any]:
    out = bench_engine.saelens_way(
        setup.base, setup.finetune, setup.sae, tokens, hook=setup.hook, special=setup.special_ids,
        batch_size=batch_size, quiet=True, feature_chunk=feature_chunk or default_feature_chunk(setup), logit_weights=logit_weights,
    )
    for key in ("t0", "c0", "load0", "rss_before_mb", "peak_before_mb", "peak_rss_mb"):
        out.pop(key, None)  # measured by measure() for every side alike
    out["n_tokens"] = int(tokens.numel())
    return out


def run_side(side: str, setup: rm.RealSetup, tokens: torch.Tensor, args: Any) -> dict[str, Any]:
    if side == "engine":
        return side_engine(setup, tokens, args.batch_size, args.n_bootstrap, getattr(args, "logits_chunk_elems", None))
    if side == "floor":
        return side_floor(setup, tokens, args.batch_size)
    if side == "saelens":
        return side_saelens(setup, tokens, args.batch_size, args.feature_chunk)
    raise ValueError(side)


def warm_up(sides: list[str], setup: rm.RealSetup, tokens: torch.Tensor, args: Any) -> None:
    """One untimed batch per side, for first-call costs (lazy imports, allocator and BLAS
    warm-up). The logit-weight computations of the engine and the sae_lens side are left
    out: minutes at real widths, and no first-call cost of their own."""
    with rm.logit_similarity_skipped():
        for side in sides:
            if side == "saelens":
                side_saelens(setup, tokens, args.batch_size, args.feature_chunk, logit_weights=False)
            else:
                run_side(side, setup, tokens, args)


@torch.no_grad()
def weights_probe(setup: rm.RealSetup) -> dict[str, float]:
    """The engine's logit similarity, timed alone (cold): the biggest part of its fixed cost."""
    from pytest_sae_transfer.metrics.weights import logit_similarity, unembedding

    device = next(setup.base.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    ub, uf = unembedding(setup.base), unembedding(setup.finetune)  # as the engine reads them: folded chunk by chunk
    n_vocab = min(ub.W.shape[1], uf.W.shape[1])
    logit_similarity(setup.sae.W_dec.detach(), ub, uf, n_vocab)
    sync(device)
    return {"logit_similarity_s": time.perf_counter() - t0}


def _engine_work(a: Any, args: Any, item: int) -> int:
    from pytest_sae_transfer.engine import memory

    tl = a.tl
    shape = memory.ModelShape(tl["d_model"], tl["d_vocab"], tl["d_mlp"], tl["n_heads"], 0, item)
    est = memory.estimate(shape, [memory.SAEShape(tl["d_model"], a.d_sae)], args.batch_size, args.context_size)
    return est.total - est.terms["weights"] - est.terms["saes"]


def memory_estimate_mb(args: Any) -> dict[str, float]:
    """A rough peak-RSS estimate per side (CPU runs), from the arch's shapes, before building.

    Models: two of them. Engine: the models and the SAE plus what the engine's memory model
    (``pytest_sae_transfer.engine.memory``) predicts beyond weights (logit work buffers,
    features, forward working set, weight-metric chunks). sae_lens side: run_evals holds about
    six [batch x context x vocab] float32 tensors (three runs' logits and their
    log-softmax), both models' features [tokens x d_sae] in float32, and its float64
    logit-weight chunks. Floor: about two float32 logit tensors.
    """
    a = rm.ARCHS[args.arch]
    item = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    V, d_sae = a.tl["d_vocab"], a.d_sae
    base = 2 * rm.param_count(a, args.layers) * item + rm.sae_param_count(a) * 4 + 600 * 2**20
    batch_logits = args.batch_size * args.context_size * V * 4
    n_max = max(args.tokens)
    chunk = args.feature_chunk or max(64, (1 << 26) // V)
    mb = 2.0**20
    return {
        "models_and_sae": base / mb,
        "engine": (base + _engine_work(a, args, item)) / mb,
        "saelens": (base + 6 * batch_logits + 2 * n_max * d_sae * 4 + 4 * chunk * V * 8) / mb,
        "floor": (base + 2 * batch_logits) / mb,
    }


# --------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of time against tokens; None with fewer than 2 counts."""
    xs = sorted({n for n, _ in points})
    if len(xs) < 2:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - slope * mx, slope


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sides: dict[str, Any] = {}
    for side in SIDES:
        rs = [r for r in runs if r["side"] == side and not r.get("aborted")]
        if not rs:
            continue
        counts = sorted({r["n_tokens"] for r in rs})
        by_n = {}
        for n in counts:
            grp = [r for r in rs if r["n_tokens"] == n]
            wall = statistics.median(r["elapsed_s"] for r in grp)
            cpu = statistics.median(r["cpu_s"] for r in grp)
            by_n[str(n)] = {
                "elapsed_s": wall, "cpu_s": cpu, "tokens_per_s": n / wall, "tokens_per_cpu_s": n / cpu,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in grp),
                "peak_above_start_mb": max(r["peak_rss_mb"] - r["rss_before_mb"] for r in grp),
                "n_repeats": len(grp),
            }
            gpu = [r["peak_gpu_mb"] for r in grp if "peak_gpu_mb" in r]
            if gpu:
                by_n[str(n)]["peak_gpu_mb"] = max(gpu)
        rec: dict[str, Any] = {"by_tokens": by_n}
        for key, field in (("wall", "elapsed_s"), ("cpu", "cpu_s")):
            fit = fit_line([(r["n_tokens"], r[field]) for r in rs])
            if fit is not None:
                intercept, slope = fit
                rec[f"marginal_s_per_token_{key}"] = slope
                rec[f"marginal_tokens_per_s_{key}"] = 1.0 / slope if slope > 0 else None
                rec[f"fixed_s_{key}"] = intercept
        # Wall time without the step after the token pass (engine: weight metrics, bootstrap,
        # report; sae_lens: paired metrics and logit weights of the regular features). The
        # sae_lens step grows with the number of regular features, which on short runs at a
        # real SAE width still grows with tokens (features that never fired are dead, not
        # regular); without it the marginal time is the token pass alone, on both sides.
        phase = {"engine": "after_last_batch_s", "saelens": "paired_metrics"}.get(side)
        if phase and all(phase in r.get("phases_s", {}) for r in rs):
            fit = fit_line([(r["n_tokens"], r["elapsed_s"] - r["phases_s"][phase]) for r in rs])
            if fit is not None:
                rec["token_pass_marginal_s_per_token_wall"] = fit[1]
                rec["token_pass_fixed_s_wall"] = fit[0]
                rec["excluded_step"] = phase
        sides[side] = rec
    ratios: dict[str, Any] = {}
    e = sides.get("engine", {}).get("token_pass_marginal_s_per_token_wall")
    for other in ("floor", "saelens"):
        o = sides.get(other, {}).get("token_pass_marginal_s_per_token_wall", sides.get(other, {}).get("marginal_s_per_token_wall"))
        ratios[f"engine_over_{other}_token_pass_marginal_time_wall"] = e / o if e and o and o > 0 else None
    for other in ("floor", "saelens"):
        for key in ("wall", "cpu"):
            e = sides.get("engine", {}).get(f"marginal_s_per_token_{key}")
            o = sides.get(other, {}).get(f"marginal_s_per_token_{key}")
            # time per marginal token, engine / other: < 1 means the engine is faster
            ratios[f"engine_over_{other}_marginal_time_{key}"] = e / o if e and o and o > 0 else None
        for n in sorted({r["n_tokens"] for r in runs}):
            e = sides.get("engine", {}).get("by_tokens", {}).get(str(n))
            o = sides.get(other, {}).get("by_tokens", {}).get(str(n))
            if e and o:
                ratios.setdefault(f"engine_over_{other}_total_time", {})[str(n)] = e["elapsed_s"] / o["elapsed_s"]
    return {"sides": sides, "ratios": ratios}


def _f(v: Any, fmt: str, width: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-".rjust(width)
    return format(v, fmt).rjust(width)


def print_table(doc: dict[str, Any], file: Any = sys.stdout) -> None:
    summ = doc["summary"]
    sides = summ["sides"]
    counts = sorted({int(n) for s in sides.values() for n in s["by_tokens"]})
    print(file=file)
    print(f"{doc['settings']['arch']} x {doc['settings']['layers']} layers, {doc['settings']['dtype']}, {doc['settings']['device']}, "
          f"batch {doc['settings']['batch_size']} x {doc['settings']['context_size']} tokens", file=file)
    for note in doc.get("notes", []):
        print(f"  note: {note}", file=file)
    head = f"{'side':8s} | " + " | ".join(f"{n:>7d} tok: tok/s   peak MB" for n in counts)
    head += " | marginal tok/s  fixed s (wall; CPU)"
    print(head, file=file)
    for side in SIDES:
        s = sides.get(side)
        if not s:
            continue
        cells = []
        for n in counts:
            b = s["by_tokens"].get(str(n))
            cells.append(f"{' ' * 7}    {_f(b and b['tokens_per_s'], '.1f', 7)} {_f(b and b['peak_rss_mb'], '.0f', 9)}" if b else " " * 30)
        tail = (f" | {_f(s.get('marginal_tokens_per_s_wall'), '.1f', 14)}  {_f(s.get('fixed_s_wall'), '.1f', 7)}"
                f"; {_f(s.get('fixed_s_cpu'), '.1f', 6)}")
        print(f"{side:8s} | " + " | ".join(cells) + tail, file=file)
    r = summ["ratios"]
    for other in ("floor", "saelens"):
        w, c = r.get(f"engine_over_{other}_marginal_time_wall"), r.get(f"engine_over_{other}_marginal_time_cpu")
        if w is not None or c is not None:
            print(f"engine / {other:7s} time per marginal token: {_f(w, '.2f', 5)} (wall), {_f(c, '.2f', 5)} (CPU time)"
                  + (f"   [{other} / engine = {1 / w:.2f}x]" if w else ""), file=file)
    for other in ("floor", "saelens"):
        v = r.get(f"engine_over_{other}_token_pass_marginal_time_wall")
        if v is not None:
            print(f"engine / {other:7s} time per marginal token, token pass only (without the step after it): {v:.2f} (wall)"
                  + (f"   [{other} / engine = {1 / v:.2f}x]" if v > 0 else ""), file=file)
    fc = doc.get("engine_fixed_cost")
    if fc:
        print("engine fixed cost (s): " + ", ".join(f"{k} {v:.1f}" for k, v in fc.items() if isinstance(v, (int, float))), file=file)
    if doc.get("build_s"):
        print("build and warm-up (s, outside every clock): " + ", ".join(f"{k} {v:.1f}" for k, v in doc["build_s"].items()), file=file)
    iso = doc.get("isolated_peak_rss_mb")
    if iso:
        print("peak RSS in a fresh process (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in iso.items()), file=file)
    aborted = [r for r in doc["runs"] if r.get("aborted")]
    for a in aborted:
        print(f"ABORTED: {a['side']} at {a['n_tokens']} tokens: {a['aborted']}", file=file)


def engine_fixed_cost(runs: list[dict[str, Any]], probe: dict[str, float] | None) -> dict[str, float]:
    eng = [r for r in runs if r["side"] == "engine" and not r.get("aborted")]
    if not eng:
        return {}
    med = lambda key: statistics.median(r["phases_s"][key] for r in eng if key in r["phases_s"])  # noqa: E731
    out = {"after_last_batch": med("after_last_batch_s")}
    if any("first_batch_excess_s" in r["phases_s"] for r in eng):
        out["first_batch_excess"] = med("first_batch_excess_s")
    if probe:
        out["logit_similarity_alone"] = probe["logit_similarity_s"]
        out["after_last_batch_minus_logit_similarity"] = out["after_last_batch"] - probe["logit_similarity_s"]
    return out


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


def build_setup(args: Any) -> rm.RealSetup:
    ctx = args.context_size
    return rm.build(
        args.arch, layers=args.layers, dtype=DTYPES[args.dtype], device=args.device, n_ctx=ctx,
        rel_noise=args.noise, seed=args.seed, context_size=ctx,
    )


def child_main(args: Any) -> int:
    """--child SIDE: one side at one token count in this fresh process; one JSON line out."""
    setup = build_setup(args)
    n = args.tokens[0]
    tokens = setup.tokens(n, args.context_size, args.batch_size, seed=args.seed + 7)
    rec = measure(lambda: run_side(args.child, setup, tokens, args), torch.device(args.device))
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    rec["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    rec["side"] = args.child
    print(json.dumps(rec), flush=True)
    return 0


def isolated_peaks(args: Any, n_tokens: int, sides: list[str]) -> dict[str, float]:
    out = {}
    for side in sides:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--tokens", str(n_tokens)] + _common_argv(args)
        print(f"[bench-real] fresh process: {side} at {n_tokens} tokens ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"child failed ({' '.join(cmd)}): exit {proc.returncode}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        out[side] = json.loads(line)["ru_maxrss_mb"]
    return out


def _common_argv(args: Any) -> list[str]:
    argv = ["--arch", args.arch, "--dtype", args.dtype, "--device", args.device, "--batch-size", str(args.batch_size),
            "--context-size", str(args.context_size), "--noise", str(args.noise), "--seed", str(args.seed),
            "--n-bootstrap", str(args.n_bootstrap)]
    if args.layers is not None:
        argv += ["--layers", str(args.layers)]
    if args.feature_chunk:
        argv += ["--feature-chunk", str(args.feature_chunk)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gemma-2b", choices=sorted(rm.ARCHS))
    ap.add_argument("--layers", type=int, default=None, help="cut the depth to this many blocks (default: the real depth)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4, help="contexts per batch, every side (default 4)")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--noise", type=float, default=0.05, help="finetune perturbation, relative to each weight's RMS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--feature-chunk", type=int, default=None, help="sae_lens side: features per float64 chunk (default ~2^26 / vocab)")
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--repeat", type=int, default=1, help="time each (side, count) this many times; the side order flips every repeat")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--isolate", action="store_true", help="also measure each side's peak RSS in a fresh process at the largest count")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed one-batch run of each side")
    ap.add_argument("--no-weights-probe", action="store_true", help="skip timing the engine's logit similarity alone")
    ap.add_argument("--json", default=None, help="write everything to this JSON file")
    ap.add_argument("--from-json", default=None, help="re-summarise the runs of an earlier --json file and print its table")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        doc["summary"] = summarize(doc["runs"])
        doc["engine_fixed_cost"] = engine_fixed_cost(doc["runs"], doc.get("weights_probe_s"))
        print_table(doc)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        return 0
    device = torch.device(args.device)
    counts = sorted(set(args.tokens))
    estimate = memory_estimate_mb(args)
    available = _meminfo_mb("MemAvailable")
    if device.type == "cpu":
        print("[bench-real] estimated peak RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in estimate.items())
              + f"; available now {available:.0f}", file=sys.stderr, flush=True)
        over = [k for k in args.sides if estimate[k] > available]
        if over:
            print(f"[bench-real] WARNING: {', '.join(over)} may not fit in the memory available now", file=sys.stderr, flush=True)

    t = time.perf_counter()
    import sae_lens  # noqa: F401  (imports timed apart from building)
    import transformer_lens  # noqa: F401

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    setup = build_setup(args)
    build_s = {**setup.build_seconds, "total": time.perf_counter() - t, "imports": import_s}
    print(f"[bench-real] built {args.arch} x {setup.base.cfg.n_layers} layers ({rm.n_params(setup.base) / 1e9:.2f} B params each) "
          f"in {build_s['total']:.1f} s; RSS {_proc_status_mb('VmRSS'):.0f} MB", file=sys.stderr, flush=True)
    tokens_all = setup.tokens(counts[-1], args.context_size, args.batch_size, seed=args.seed + 7)

    if args.warmup:
        # one batch per side, untimed: first-call costs (lazy imports, allocator and BLAS warm-up)
        # belong to no token count
        t = time.perf_counter()
        warm_up(args.sides, setup, tokens_all[: args.batch_size], args)
        build_s["warmup"] = time.perf_counter() - t

    runs: list[dict[str, Any]] = []
    for n in counts:
        n_ctx = math.ceil(math.ceil(n / args.context_size) / args.batch_size) * args.batch_size
        toks = tokens_all[:n_ctx]
        for rep in range(args.repeat):
            order = args.sides if (len(runs) // max(1, len(args.sides))) % 2 == 0 else args.sides[::-1]
            for side in order:
                rec = measure(lambda: run_side(side, setup, toks, args), device)
                rec.update(side=side, repeat=rep)
                runs.append(rec)
                print(f"[bench-real] {side:8s} {rec['n_tokens']:>7d} tokens: {rec['elapsed_s']:8.1f} s "
                      f"{rec['n_tokens'] / rec['elapsed_s']:9.1f} tok/s  CPU {rec['cpu_s']:7.1f} s  "
                      f"peak RSS {rec['peak_rss_mb']:7.0f} MB (before {rec['rss_before_mb']:.0f})  "
                      f"load {rec['loadavg_1min'][0]:.1f}->{rec['loadavg_1min'][1]:.1f}", file=sys.stderr, flush=True)

    probe = None
    if "engine" in args.sides and not args.no_weights_probe:
        probe = weights_probe(setup)
    doc: dict[str, Any] = {
        "settings": {
            "arch": args.arch, "layers": setup.base.cfg.n_layers, "real_layers": setup.arch.n_layers, "dtype": args.dtype,
            "device": args.device, "batch_size": args.batch_size, "context_size": args.context_size, "noise": args.noise,
            "seed": args.seed, "n_bootstrap": args.n_bootstrap, "hook": setup.hook, "d_sae": setup.sae.cfg.d_sae,
            "d_model": setup.base.cfg.d_model, "d_vocab": setup.base.cfg.d_vocab, "repeat": args.repeat,
            "feature_chunk": args.feature_chunk or default_feature_chunk(setup), "threads": torch.get_num_threads(),
        },
        "notes": setup.notes, "build_s": build_s, "memory_estimate_mb": estimate, "mem_available_at_start_mb": available, "weights_probe_s": probe, "runs": runs,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_end": os.getloadavg()},
    }
    doc["summary"] = summarize(runs)
    doc["engine_fixed_cost"] = engine_fixed_cost(runs, probe)
    del setup
    if args.isolate:
        doc["isolated_peak_rss_mb"] = isolated_peaks(args, counts[-1], args.sides)
    print_table(doc)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
