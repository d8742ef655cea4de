#!/usr/bin/env python
"""Profile one engine run at a real model's width (time and memory).

Modes (one per process, so that each measures only itself):

* ``run``    just the run (for ``py-spy record -- python benchmarks/profile_engine.py --mode run``).
* ``rss``    a sampler thread reads VmRSS every ``--interval-ms`` and the main thread's
             innermost frame in this repository; prints the peak, each line's largest
             RSS rise within one sample interval (the big allocations, by file:line),
             and the RSS the run held at its peak above the loaded models.
* ``torch``  ``torch.profiler`` with ``profile_memory`` and stacks over the run: the ops
             that allocate most, and every op whose output has a dimension equal to the
             SAE width or the vocabulary (with its repository call site).

    python benchmarks/profile_engine.py --arch gemma-2b --layers 1 --tokens 1024 --mode rss
    .venv/bin/py-spy record -r 50 -f raw -o /tmp/engine.txt -- .venv/bin/python benchmarks/profile_engine.py --mode run
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import bench_real as br  # noqa: E402
import real_models as rm  # noqa: E402


def repo_frame(frame: Any) -> str | None:
    """The innermost frame of this repository's package (or, failing that, benchmarks/)."""
    best = None
    f = frame
    while f is not None:
        fn = f.f_code.co_filename
        if "/pytest_sae_transfer/" in fn:
            return f"{fn.split('/work/wt-bench/')[-1].split(str(REPO) + '/')[-1]}:{f.f_lineno} ({f.f_code.co_name})"
        if best is None and "/benchmarks/" in fn and "profile_engine" not in fn:
            best = f"{Path(fn).name}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return best


class RssSampler(threading.Thread):
    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, str | None]] = []
        self.stop = threading.Event()
        self.main_id = threading.main_thread().ident

    def run(self) -> None:
        while not self.stop.is_set():
            frame = sys._current_frames().get(self.main_id)
            self.samples.append((time.perf_counter(), br._proc_status_mb("VmRSS"), repo_frame(frame) if frame else None))
            time.sleep(self.interval_s)


@torch.no_grad()
def chunked_frobenius_ratio(W_ft: torch.Tensor, W_base: torch.Tensor) -> float:
    """‖W_ft‖_F / ‖W_base‖_F in float64, a column block at a time (the engine's value, bounded memory)."""

    def norm2(W: torch.Tensor) -> float:
        return sum(float(W[:, i : i + 8192].double().pow(2).sum()) for i in range(0, W.shape[1], 8192))

    return (norm2(W_ft) / norm2(W_base)) ** 0.5


def pyspy_summary(path: str, within: list[str], top: int = 30) -> int:
    """Inclusive and self sample shares per repository frame (file:line) from collapsed stacks,
    counting only stacks that pass through frames containing every text in ``within`` (the
    timed run, not the build or the warm-up: e.g. ``profile_engine.py:166``, the line of
    the timed call, and ``run_pass (`` for its token pass)."""
    import collections

    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    leaf_lib: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not all(w in stack for w in within):
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        repo = [f for f in frames if "pytest_sae_transfer/" in f or "bench_real.py" in f]
        for f in set(repo):
            incl[f] += n
        if repo:
            self_[repo[-1]] += n  # the innermost repository frame: time spent below it is charged to it
        leaf_lib[frames[-1].split(" (")[0] + " (" + frames[-1].split("/")[-1]] += n
    print(f"{total} samples in the timed run")
    print("innermost repository frame (time in it and in the libraries it calls):")
    for f, n in self_.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {f}")
    print("inclusive:")
    for f, n in incl.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {f}")
    print("leaf frames:")
    for f, n in leaf_lib.most_common(15):
        print(f"  {100 * n / total:5.1f}%  {f}")
    return 0


def frobenius_mode(args: Any) -> int:
    """RSS of the engine's own frobenius_ratio on two unembeddings of the arch's shape."""
    from pytest_sae_transfer.metrics.weights import frobenius_ratio

    a = rm.ARCHS[args.arch]
    d, v = a.tl["d_model"], a.tl["d_vocab"]
    dtype = br.DTYPES[args.dtype]
    Wb = torch.randn(d, v, dtype=dtype)
    Wf = torch.randn(d, v, dtype=dtype)
    before = br._proc_status_mb("VmRSS")
    br.reset_peak_rss()
    t = time.perf_counter()
    r = frobenius_ratio(Wf, Wb)
    out = {"shape": [d, v], "dtype": args.dtype, "inputs_mb": 2 * Wb.numel() * Wb.element_size() / 2**20,
           "rss_before_mb": before, "peak_rss_mb": br._proc_status_mb("VmHWM"), "elapsed_s": time.perf_counter() - t,
           "ratio": r, "chunked_ratio": chunked_frobenius_ratio(Wf, Wb)}
    out["rise_mb"] = out["peak_rss_mb"] - before
    print(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gemma-2b", choices=sorted(rm.ARCHS))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=sorted(br.DTYPES))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--mode", choices=["run", "rss", "torch", "frobenius", "pyspy-summary"], default="run")
    ap.add_argument("--pyspy-file", default=None, help="--mode pyspy-summary: a `py-spy record -f raw` output")
    ap.add_argument("--within", nargs="+", default=["side_engine"], help="--mode pyspy-summary: count only stacks through all these frame texts")
    ap.add_argument("--interval-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--share-embedding", action="store_true",
                    help="the finetune uses the base's W_E tensor (saves one d_vocab x d_model copy; W_U and blocks stay perturbed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.mode == "frobenius":
        return frobenius_mode(args)
    if args.mode == "pyspy-summary":
        return pyspy_summary(args.pyspy_file, args.within)

    t = time.perf_counter()
    setup = rm.build(args.arch, layers=args.layers, dtype=br.DTYPES[args.dtype], n_ctx=args.context_size, context_size=args.context_size)
    print(f"[profile] built in {time.perf_counter() - t:.1f} s; hook {setup.hook}; notes {setup.notes}; "
          f"RSS {br._proc_status_mb('VmRSS'):.0f} MB", file=sys.stderr, flush=True)
    if args.share_embedding:
        setup.finetune.embed.W_E = setup.base.embed.W_E
        import gc

        gc.collect()
    tokens = setup.tokens(args.tokens, args.context_size, args.batch_size, seed=7)
    # warm-up batch (lazy imports, allocator), untimed; its logit similarity is stubbed out
    # (minutes at real widths, and measured in the run proper)
    with rm.logit_similarity_skipped():
        br.side_engine(setup, tokens[: args.batch_size], args.batch_size, n_bootstrap=10)
    out: dict[str, Any] = {"settings": vars(args), "hook": setup.hook, "notes": setup.notes}
    loaded = br._proc_status_mb("VmRSS")

    if args.mode == "run":
        t = time.perf_counter()
        rec = br.side_engine(setup, tokens, args.batch_size, args.n_bootstrap)
        out.update(elapsed_s=time.perf_counter() - t, phases_s=rec["phases_s"])
    elif args.mode == "rss":
        br.reset_peak_rss()
        sampler = RssSampler(args.interval_ms / 1000.0)
        sampler.start()
        t = time.perf_counter()
        rec = br.side_engine(setup, tokens, args.batch_size, args.n_bootstrap)
        elapsed = time.perf_counter() - t
        sampler.stop.set()
        sampler.join()
        s = sampler.samples
        # RSS grows as pages are first written, over many samples: attribute to a line the
        # rise from the sample before it was reached to the highest sample while it stays
        rises: dict[str, float] = {}
        i = 1
        while i < len(s):
            where, start_rss, top = s[i][2], s[i - 1][1], s[i][1]
            j = i
            while j + 1 < len(s) and s[j + 1][2] == where:
                j += 1
                top = max(top, s[j][1])
            if where is not None and top - start_rss > rises.get(where, 0.0):
                rises[where] = top - start_rss
            i = j + 1
        peak_t, peak_rss, peak_where = max(s, key=lambda x: x[1])
        out.update(
            elapsed_s=elapsed, phases_s=rec["phases_s"], loaded_rss_mb=loaded, peak_rss_sampled_mb=peak_rss,
            peak_rss_hwm_mb=br._proc_status_mb("VmHWM"), peak_at=peak_where, peak_at_s=peak_t - s[0][0],
            largest_rise_by_line_mb=dict(sorted(rises.items(), key=lambda kv: -kv[1])[:25]), n_samples=len(s),
        )
        print(f"[profile] loaded {loaded:.0f} MB; peak {out['peak_rss_hwm_mb']:.0f} MB (sampled {peak_rss:.0f} MB at {peak_where}, "
              f"{out['peak_at_s']:.1f} s in); run {elapsed:.1f} s", file=sys.stderr)
        for where, mb in out["largest_rise_by_line_mb"].items():
            print(f"  {mb:9.1f} MB  {where}", file=sys.stderr)
    else:
        from torch.profiler import ProfilerActivity, profile

        d_sae, vocab = setup.sae.cfg.d_sae, setup.base.cfg.d_vocab
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
            rec = br.side_engine(setup, tokens, args.batch_size, args.n_bootstrap)
        table = prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=25)
        time_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        big: dict[str, dict[str, Any]] = {}
        for ev in prof.events():
            if not ev.name.startswith("aten::") or ev.self_cpu_memory_usage <= 0:
                continue
            shapes = [tuple(x) for x in (ev.input_shapes or []) if x]
            dims = {d for shp in shapes for d in shp}
            if d_sae not in dims and vocab not in dims:
                continue
            site, inner = "?", None
            p = ev.cpu_parent
            while p is not None:
                name = p.name
                if inner is None and ("transformer_lens/" in name or "sae_lens/" in name):
                    inner = name.split("site-packages/")[-1]
                if "pytest_sae_transfer/" in name:
                    site = name.split("wt-bench/")[-1]
                    break
                if site == "?" and "benchmarks/" in name and "profile_engine" not in name:
                    site = name.split("wt-bench/")[-1]
                p = p.cpu_parent
            key = f"{ev.name} @ {site}" + (f" via {inner}" if inner else "")
            entry = big.setdefault(key, {"calls": 0, "max_alloc_mb": 0.0, "total_alloc_mb": 0.0, "example_shapes": shapes[:3]})
            entry["calls"] += 1
            mb = ev.self_cpu_memory_usage / 2**20
            if mb > entry["max_alloc_mb"]:
                entry["max_alloc_mb"], entry["example_shapes"] = mb, shapes[:3]
            entry["total_alloc_mb"] += mb
        out["allocations_with_d_sae_or_vocab"] = dict(sorted(big.items(), key=lambda kv: -kv[1]["max_alloc_mb"]))
        print(table, file=sys.stderr)
        print(time_table, file=sys.stderr)
        print("ops allocating tensors with a d_sae or vocabulary dimension (by call site):", file=sys.stderr)
        for key, e in out["allocations_with_d_sae_or_vocab"].items():
            print(f"  {e['max_alloc_mb']:9.1f} MB max, {e['calls']:5d} calls  {key}  {e['example_shapes']}", file=sys.stderr)
    print(json.dumps(out, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
