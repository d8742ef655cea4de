#!/usr/bin/env python
"""Time our engine against the sae_lens way of doing the same job, on the toy zoo.

The job: every SPEC.md metric for toy-base and one finetune (toy-code by
default) with the zoo's standard SAE, over the same packed toy-eval contexts.

* ours      ``evaluate_transfer(base, {"toy-code": ft}, sae, tokens)``: one
            streaming pass, bootstrap CIs included.
* sae_lens  ``run_evals`` for the base and for the finetune (KL, CE, sparsity,
            variance and featurewise density, through a real ActivationsStore
            over the same tokens), PLUS the extra passes the study needed for
            its paired metrics: ``run_with_cache`` on both models for the
            residual cosine/euclidean, the SAE features of both models kept in
            memory as [tokens x d_sae] (as the study did) for activation
            similarity and the dead-feature error, and logit similarity from the
            weights. ``run_with_cache`` stops at the hook layer (generous to
            this side).

Each (side, token count) runs in a fresh subprocess, so the RSS high-water mark
(``resource.getrusage(...).ru_maxrss``, per process and monotone) belongs to
that run alone. Model loading happens before the clock starts on both sides.

Usage::

    python benchmarks/bench_engine.py                       # 16k and 256k tokens
    python benchmarks/bench_engine.py --tokens 16384 --batch-size 16 --out bench.json
    python benchmarks/bench_engine.py --side ours --tokens 16384   # one child run, prints one JSON line
    python benchmarks/bench_engine.py --threads 1 --repeat 3       # a shared, busy machine: see below

Speeds are reported per wall-clock second and per CPU second (user + system time
of the run). On a machine other jobs are using, wall time varies with their load,
and torch's default multi-threading makes it worse (OpenMP threads spin-wait for
cores they do not get, which inflates the CPU time as well); ``--threads 1``
with ``--repeat`` gives the comparison that holds up there.

toy-eval may hold fewer tokens than asked for; the packed contexts are then
repeated (cycled) to reach the count, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HOOK = "blocks.1.hook_resid_post"
SPECIAL = (0, 1, 2)  # the zoo tokenizer's <bos>, <eos>, <pad>


# --------------------------------------------------------------------------
# shared setup
# --------------------------------------------------------------------------


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: unlike wall time, barely
    moved by other processes competing for the cores (the load average is recorded too)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timing(info: dict[str, Any], t0: float, c0: float, load0: float) -> dict[str, Any]:
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    return {
        "elapsed_s": elapsed, "tokens_per_s": info["n_tokens"] / elapsed,
        "cpu_s": cpu, "tokens_per_cpu_s": info["n_tokens"] / cpu,
        "loadavg_1min": [load0, os.getloadavg()[0]],
    }


def current_rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def pack_tokens(n_tokens: int, context_size: int, batch_size: int) -> tuple[Any, dict[str, Any]]:
    """toy-eval packed as pytest_sae_transfer.loading.load_tokens packs it (BOS first and
    between documents), n_contexts rounded up to whole batches; cycled if too short."""
    import torch
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    from pytest_sae_transfer import zoo
    from pytest_sae_transfer.loading import iter_dataset_rows

    tok = zoo.load_tokenizer()
    n_ctx = math.ceil(n_tokens / context_size)
    n_ctx = math.ceil(n_ctx / batch_size) * batch_size

    def docs():
        for row in iter_dataset_rows("toy-eval"):
            ids = tok(row["text"], add_special_tokens=False)["input_ids"]
            if ids:
                yield torch.tensor(ids, dtype=torch.long)

    contexts = []
    for ctx in concat_and_batch_sequences(
        docs(), context_size=context_size, begin_batch_token_id=tok.bos_token_id,
        begin_sequence_token_id=None, sequence_separator_token_id=tok.bos_token_id,
    ):
        contexts.append(ctx)
        if len(contexts) == n_ctx:
            break
    available = len(contexts)
    packed = torch.stack(contexts)
    if available < n_ctx:
        reps = math.ceil(n_ctx / available)
        packed = packed.repeat(reps, 1)[:n_ctx]
    info = {
        "n_contexts": n_ctx, "context_size": context_size, "n_tokens": n_ctx * context_size,
        "toy_eval_contexts_available": available, "cycled": available < n_ctx,
        "repeats": round(n_ctx / available, 2) if available < n_ctx else 1,
    }
    return packed.contiguous(), info


def load_all(finetune: str, sae_id: str | None) -> tuple[Any, Any, Any]:
    from sae_lens import SAE

    from pytest_sae_transfer import zoo

    base = zoo.load_model("toy-base")
    ft = zoo.load_model(finetune)
    sae = SAE.load_from_disk(str(zoo.sae_dir("toy-res", sae_id)), device="cpu").eval()
    return base, ft, sae


# --------------------------------------------------------------------------
# side: ours
# --------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    from pytest_sae_transfer.engine import EngineOptions, evaluate_transfer

    base, ft, sae = load_all(args.finetune, args.sae_id)
    tokens, info = pack_tokens(args.tokens[0], args.context_size, args.batch_size)
    rss_before = current_rss_mb()
    peak_before = peak_rss_mb()
    load0, c0, t0 = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    report = evaluate_transfer(
        base, {args.finetune: ft}, sae, tokens,
        EngineOptions(batch_size=args.batch_size, special_token_ids=SPECIAL, progress=not args.quiet, progress_file=sys.stderr),
    )
    times = timing(info, t0, c0, load0)
    ftr = report.finetune(args.finetune)
    return {
        "side": "ours", **info, **times,
        "rss_before_mb": rss_before, "peak_before_mb": peak_before, "peak_rss_mb": peak_rss_mb(),
        "check": {
            "base.l0": report.base.metrics["l0"], "ft.l0": ftr.metrics["l0"],
            "base.ce_loss_spliced": report.base.metrics["ce_loss_spliced"], "ft.ce_loss_spliced": ftr.metrics["ce_loss_spliced"],
            "ft.kl_div_spliced": ftr.metrics["kl_div_spliced"], "ft.explained_variance": ftr.metrics["explained_variance"],
            "resid_cosine_mean": ftr.paired["resid_cosine_mean"],
            "activation_similarity_mean": ftr.paired["activation_similarity_mean"],
            "logit_similarity_mean": ftr.paired["logit_similarity_mean"],
            "n_regular_features": ftr.paired["n_regular_features"],
        },
    }


# --------------------------------------------------------------------------
# side: sae_lens (+ the study's extra passes)
# --------------------------------------------------------------------------


def run_saelens(args: argparse.Namespace) -> dict[str, Any]:
    base, ft, sae = load_all(args.finetune, args.sae_id)
    tokens, info = pack_tokens(args.tokens[0], args.context_size, args.batch_size)
    out = saelens_way(base, ft, sae, tokens, hook=HOOK, special=SPECIAL, batch_size=args.batch_size, quiet=args.quiet)
    times = timing(info, out.pop("t0"), out.pop("c0"), out.pop("load0"))
    return {"side": "saelens", **info, **times, **out}


def cache_point(hook: str) -> tuple[str, int]:
    """(hook to cache, stop_at_layer) that yields ``hook``'s activation with the fewest blocks run:
    ``blocks.L.hook_resid_pre`` is the tensor ``blocks.{L-1}.hook_resid_post`` holds."""
    _, block, kind = hook.split(".")
    L = int(block)
    if kind == "hook_resid_pre" and L > 0:
        return f"blocks.{L - 1}.hook_resid_post", L
    return hook, L + 1


def saelens_way(
    base: Any, ft: Any, sae: Any, tokens: Any, *, hook: str, special: tuple[int, ...], batch_size: int,
    quiet: bool = True, feature_chunk: int | None = None, logit_weights: bool = True,
) -> dict[str, Any]:
    """The sae_lens side on any models: run_evals for both, the study's paired pass with the
    features of both models kept in memory as [tokens x d_sae] float32 (on the host), and the
    study's paired metrics from those arrays.

    The clock starts after the inputs are built; the result carries ``t0``, ``c0`` and
    ``load0`` for :func:`timing`. ``feature_chunk`` (None: all at once, as the toy
    benchmark always ran) computes the paired metrics and the logit weights that many
    features at a time, which only bounds their float64 temporaries: at real widths the
    all-at-once version needs several times the feature arrays again (and a
    [d_sae x vocab] float64 logit matrix per model). ``logit_weights=False`` skips the
    logit weights (for an untimed warm-up only).
    """
    import datasets
    import numpy as np
    import torch
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore
    from tqdm.auto import tqdm

    bs, T = batch_size, tokens.shape[1]
    n_batches = tokens.shape[0] // bs
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})  # the input, built before the clock
    cache_hook, stop_layer = cache_point(hook)
    special_t = torch.tensor(special)
    device = next(base.parameters()).device
    phases: dict[str, float] = {}
    rss_before = current_rss_mb()
    peak_before = peak_rss_mb()
    load0, c0, t0 = os.getloadavg()[0], cpu_seconds(), time.perf_counter()

    # 1. run_evals, base and finetune, everything sae_lens computes for one model
    evals = {}
    for tag, model in (("base", base), ("ft", ft)):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store = ActivationsStore.from_sae(
                model, sae, dataset=dataset, streaming=False, context_size=T, store_batch_size_prompts=bs, device=str(device),
            )
            cfg = EvalConfig(
                batch_size_prompts=bs, n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches,
                compute_kl=True, compute_ce_loss=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
                compute_featurewise_density_statistics=True,
            )
            evals[tag] = run_evals(sae, store, model, ActivationScaler(), cfg, exclude_special_tokens=list(special), verbose=not quiet)
        phases[f"run_evals_{tag}"] = time.perf_counter() - t

    # 2. the study's extra pass: hook activations of both models, features kept in memory
    t = time.perf_counter()
    mask_all = ~torch.isin(tokens, special_t)
    n_incl = int(mask_all.sum())
    d_sae = sae.cfg.d_sae
    acts_b = torch.empty(n_incl, d_sae, dtype=torch.float32)
    acts_f = torch.empty(n_incl, d_sae, dtype=torch.float32)
    cos_all = torch.zeros(tokens.shape, dtype=torch.float64)
    euc_all = torch.zeros(tokens.shape, dtype=torch.float64)
    row = 0
    with torch.no_grad():
        for i in tqdm(range(n_batches), desc="study paired pass", disable=quiet, file=sys.stderr):
            toks = tokens[i * bs : (i + 1) * bs]
            mask = mask_all[i * bs : (i + 1) * bs].to(device)
            _, cb = base.run_with_cache(toks, names_filter=[cache_hook], stop_at_layer=stop_layer)
            _, cf = ft.run_with_cache(toks, names_filter=[cache_hook], stop_at_layer=stop_layer)
            xb, xf = cb[cache_hook], cf[cache_hook]
            cos_all[i * bs : (i + 1) * bs] = torch.nn.functional.cosine_similarity(xb, xf, dim=-1).double().cpu()
            euc_all[i * bs : (i + 1) * bs] = (xb - xf).norm(dim=-1).double().cpu()
            fb, ff = sae.encode(xb[mask]), sae.encode(xf[mask])
            acts_b[row : row + fb.shape[0]] = fb.cpu()
            acts_f[row : row + ff.shape[0]] = ff.cpu()
            row += fb.shape[0]
    phases["paired_pass"] = time.perf_counter() - t

    # 3. the study's paired metrics from those arrays, the densities and the weights
    t = time.perf_counter()
    eps = 1e-10
    dens_b = np.asarray(evals["base"][1]["feature_density"])
    dens_f = np.asarray(evals["ft"][1]["feature_density"])
    log_b, log_f = np.log10(dens_b + eps), np.log10(dens_f + eps)
    density_r = float(np.corrcoef(log_b, log_f)[0, 1])
    dead_b, dead_f = dens_b == 0, dens_f == 0
    regular = torch.from_numpy((log_b >= -5) & (log_b <= -1) & (log_f >= -5) & (log_f <= -1))
    one_dead = torch.from_numpy(dead_b ^ dead_f)

    def chunks(mask: Any) -> list[Any]:
        idx = mask.nonzero().squeeze(1)
        step = feature_chunk or max(1, idx.numel())
        return [idx[i : i + step] for i in range(0, idx.numel(), step)] or [idx]

    sims = []
    for cols in chunks(regular):
        A, B = acts_b[:, cols].double(), acts_f[:, cols].double()
        A, B = A - A.mean(0), B - B.mean(0)
        sims.append((A * B).sum(0) / torch.sqrt((A * A).sum(0) * (B * B).sum(0)))
        del A, B
    act_sim = torch.cat(sims)
    act_sim = act_sim[torch.isfinite(act_sim)]
    dead_err = torch.cat([
        (torch.log10(acts_b[:, cols].clamp_min(0).double() + eps) - torch.log10(acts_f[:, cols].clamp_min(0).double() + eps)).abs().mean(0)
        for cols in chunks(one_dead)
    ])

    def folded(model: Any) -> Any:
        W_U = model.W_U.detach()
        w = getattr(model.ln_final, "w", None)
        return W_U * w.detach().unsqueeze(1) if isinstance(w, torch.Tensor) else W_U

    Ub, Uf = folded(base), folded(ft)
    logit_parts = [torch.zeros(0, dtype=torch.float64)]
    for cols in chunks(regular) if logit_weights else []:
        W_dec = sae.W_dec.detach()[cols.to(sae.W_dec.device)].to(Ub.dtype)
        Lb, Lf = (W_dec @ Ub).double(), (W_dec @ Uf).double()
        Lb, Lf = Lb - Lb.mean(1, keepdim=True), Lf - Lf.mean(1, keepdim=True)
        logit_parts.append(((Lb * Lf).sum(1) / torch.sqrt((Lb * Lb).sum(1) * (Lf * Lf).sum(1))).cpu())
        del Lb, Lf
    logit_sim = torch.cat(logit_parts)
    del Ub, Uf
    resid_cos = float(cos_all[mask_all].mean())
    resid_euc = float(euc_all[mask_all].mean())
    by_pos = [float(cos_all[mask_all[:, p], p].mean()) if bool(mask_all[:, p].any()) else None for p in range(T)]
    phases["paired_metrics"] = time.perf_counter() - t
    mb, mf = evals["base"][0], evals["ft"][0]
    return {
        "t0": t0, "c0": c0, "load0": load0, "phases_s": phases,
        "rss_before_mb": rss_before, "peak_before_mb": peak_before, "peak_rss_mb": peak_rss_mb(),
        "feature_arrays_mb": 2 * acts_b.numel() * 4 / 2**20,
        "check": {
            "base.l0": mb["sparsity"]["l0"], "ft.l0": mf["sparsity"]["l0"],
            "base.ce_loss_spliced": mb["model_performance_preservation"]["ce_loss_with_sae"],
            "ft.ce_loss_spliced": mf["model_performance_preservation"]["ce_loss_with_sae"],
            "ft.kl_div_spliced": mf["model_behavior_preservation"]["kl_div_with_sae"],
            "ft.explained_variance": mf["reconstruction_quality"]["explained_variance"],
            "resid_cosine_mean": resid_cos, "resid_euclidean_mean": resid_euc, "resid_cosine_by_position_1": by_pos[1],
            "activation_similarity_mean": float(act_sim.mean()) if act_sim.numel() else None,
            "logit_similarity_mean": float(logit_sim.mean()) if logit_sim.numel() else None,
            "n_regular_features": int(regular.sum()), "density_log10_pearson": density_r,
            "dead_error_features": int(one_dead.sum()), "dead_error_mean": float(dead_err.mean()) if dead_err.numel() else None,
        },
    }


# --------------------------------------------------------------------------
# parent: one fresh subprocess per (token count, side)
# --------------------------------------------------------------------------


def child(side: str, n_tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--side", side, "--tokens", str(n_tokens),
        "--batch-size", str(args.batch_size), "--context-size", str(args.context_size), "--finetune", args.finetune,
    ]
    if args.sae_id:
        cmd += ["--sae-id", args.sae_id]
    if args.quiet:
        cmd.append("--quiet")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[bench] {side:8s} {n_tokens:>8d} tokens ...", file=sys.stderr, flush=True)
    return run_child(cmd)


def run_child(cmd: list[str]) -> dict[str, Any]:
    """Run one child measurement in a fresh process (its own peak RSS); its last JSON line."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"child run failed ({' '.join(cmd)}): exit {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """One record per (side, token count): medians of the speeds, the largest peak RSS."""
    import statistics

    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["side"], r["n_tokens"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        rec = dict(rs[0])
        for field in ("elapsed_s", "tokens_per_s", "cpu_s", "tokens_per_cpu_s", "rss_before_mb"):
            rec[field] = statistics.median(r[field] for r in rs)
        rec["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        rec["n_repeats"] = len(rs)
        out[key] = rec
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 262144], help="token counts to time (default: 16384 262144)")
    ap.add_argument("--batch-size", type=int, default=8, help="contexts per batch, both sides (default 8)")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--finetune", default="toy-code")
    ap.add_argument("--sae-id", default=None, help="toy-res sae_id (default: the standard SAE)")
    ap.add_argument("--side", choices=["ours", "saelens"], help="run one side in this process and print one JSON line")
    ap.add_argument("--sides", nargs="+", default=["ours", "saelens"], choices=["ours", "saelens"])
    ap.add_argument("--out", default=None, help="write all results to this JSON file")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run (default: torch's default)")
    ap.add_argument(
        "--repeat", type=int, default=1,
        help="time each (side, token count) this many times, the sides alternating, and report medians (for noisy, shared machines)",
    )
    args = ap.parse_args(argv)

    from pytest_sae_transfer import zoo

    if not (zoo.ZOO_DIR / zoo.MANIFEST_FILE).is_file():
        raise SystemExit(f"the toy zoo is not built ({zoo.ZOO_DIR / zoo.MANIFEST_FILE} is missing); run `python scripts/build_zoo.py`")

    if args.side:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_ours(args) if args.side == "ours" else run_saelens(args)
        result["torch_threads"] = torch.get_num_threads()
        print(json.dumps(result), flush=True)
        return 0

    runs: list[dict[str, Any]] = []
    for n in args.tokens:
        for rep in range(args.repeat):
            # alternate which side goes first, so that a drift in the machine's load hits both
            for side in args.sides if rep % 2 == 0 else args.sides[::-1]:
                res = child(side, n, args)
                res["repeat"] = rep
                runs.append(res)
                cyc = f" (toy-eval has {res['toy_eval_contexts_available']} contexts: cycled x{res['repeats']})" if res["cycled"] else ""
                print(
                    f"[bench] {side:8s} {res['n_tokens']:>8d} tokens: {res['elapsed_s']:8.1f} s  "
                    f"{res['tokens_per_s']:9.0f} tok/s  {res['tokens_per_cpu_s']:9.0f} tok/CPU-s  peak RSS {res['peak_rss_mb']:7.0f} MB  "
                    f"load {res['loadavg_1min'][0]:.1f}->{res['loadavg_1min'][1]:.1f}{cyc}",
                    file=sys.stderr, flush=True,
                )

    by = aggregate(runs)
    counts = sorted({r["n_tokens"] for r in runs})
    summary: dict[str, Any] = {"speed_ratio": {}, "speed_ratio_cpu_time": {}, "targets": {}}
    print()
    print(
        f"{'tokens':>8s} | {'ours tok/s':>10s} {'tok/CPU-s':>9s} {'peak MB':>8s} | {'saelens tok/s':>13s} {'tok/CPU-s':>9s} {'peak MB':>8s} | "
        f"{'speedup (wall)':>14s} {'(CPU time)':>10s}"
    )
    for n in counts:
        o, s = by.get(("ours", n)), by.get(("saelens", n))
        ratio = o["tokens_per_s"] / s["tokens_per_s"] if o and s else None
        ratio_cpu = o["tokens_per_cpu_s"] / s["tokens_per_cpu_s"] if o and s else None
        summary["speed_ratio"][str(n)] = ratio
        summary["speed_ratio_cpu_time"][str(n)] = ratio_cpu
        fmt = lambda r, k, f: format(r[k], f) if r else "-"  # noqa: E731
        rfmt = lambda v, w: "-".rjust(w) if v is None else (format(v, ".2f") + "x").rjust(w)  # noqa: E731
        print(
            f"{n:>8d} | {fmt(o, 'tokens_per_s', '10.0f')} {fmt(o, 'tokens_per_cpu_s', '9.0f')} {fmt(o, 'peak_rss_mb', '8.0f')} | "
            f"{fmt(s, 'tokens_per_s', '13.0f')} {fmt(s, 'tokens_per_cpu_s', '9.0f')} {fmt(s, 'peak_rss_mb', '8.0f')} | "
            f"{rfmt(ratio, 14)} {rfmt(ratio_cpu, 10)}"
        )
    ours_runs = [by[("ours", n)] for n in counts if ("ours", n) in by]
    if len(ours_runs) >= 2:
        lo, hi = ours_runs[0], ours_runs[-1]
        growth = hi["peak_rss_mb"] / lo["peak_rss_mb"] - 1
        growth_above_start = (hi["peak_rss_mb"] - hi["rss_before_mb"]) - (lo["peak_rss_mb"] - lo["rss_before_mb"])
        summary["ours_peak_rss_growth"] = growth
        summary["ours_peak_above_loaded_mb"] = {str(r["n_tokens"]): r["peak_rss_mb"] - r["rss_before_mb"] for r in ours_runs}
        summary["targets"]["ours_memory_growth_below_10pct"] = growth < 0.10
        print(
            f"\nours: peak RSS {lo['peak_rss_mb']:.0f} MB -> {hi['peak_rss_mb']:.0f} MB from {lo['n_tokens']} to {hi['n_tokens']} tokens "
            f"({growth * 100:+.1f}%; above the loaded-models baseline: {lo['peak_rss_mb'] - lo['rss_before_mb']:.0f} -> "
            f"{hi['peak_rss_mb'] - hi['rss_before_mb']:.0f} MB, {growth_above_start:+.0f} MB)"
        )
    ratios = [r for r in summary["speed_ratio"].values() if r is not None]
    if ratios:
        summary["targets"]["ours_at_least_2x_faster"] = min(ratios) >= 2.0
    ratios_cpu = [r for r in summary["speed_ratio_cpu_time"].values() if r is not None]
    if ratios_cpu:
        summary["targets"]["ours_at_least_2x_faster_cpu_time"] = min(ratios_cpu) >= 2.0
    for name, ok in summary["targets"].items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    for n in counts:
        o, s = by.get(("ours", n)), by.get(("saelens", n))
        if o and s:
            print(f"\nsame numbers both ways at {n} tokens (ours / sae_lens way):")
            for key in o["check"]:
                if key in s["check"]:
                    print(f"  {key:28s} {o['check'][key]!s:>22s}  {s['check'][key]!s:>22s}")
            if "phases_s" in s:
                print("  sae_lens side phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["phases_s"].items()))
    if any(r["cycled"] for r in runs):
        print("\nnote: toy-eval holds fewer tokens than some runs asked for; its packed contexts were repeated (see 'repeats').")

    import torch

    doc = {
        "runs": runs, "summary": summary, "aggregated": [by[k] for k in sorted(by)],
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "settings": {
            "batch_size": args.batch_size, "context_size": args.context_size, "finetune": args.finetune,
            "sae_id": args.sae_id or "standard", "threads": args.threads, "repeat": args.repeat,
        },
    }
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
