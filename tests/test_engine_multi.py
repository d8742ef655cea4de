"""Several SAEs in one pass: each SAE's numbers equal a run with that SAE alone.

The multi-SAE pass shares the trunk (one run through the layers, every hook captured
on the way) and the clean continuation between SAEs; nothing of one SAE may leak
into another's results. Checked on tiny random models with SAEs at different depths
and of different architectures, in every execution mode, with cached base results
and with out-of-memory halving.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from helpers import random_tokens, tiny_pair, tiny_sae
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_properties import close_results, metrics_part, vectors_close

from pytest_sae_transfer.engine import EngineOptions, ModelRunner, run_transfer, run_transfer_many

SPECIAL = (0, 1, 2)
FEW = settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
HOOKS = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post")


@functools.lru_cache(maxsize=None)
def models(seed: int) -> tuple[Any, Any]:
    return tiny_pair(seed=seed, d_model=16, n_layers=3, d_vocab=64, n_ctx=16, noise=0.1)


def saes(seed: int) -> dict[str, Any]:
    out = {}
    for i, hook in enumerate(HOOKS):
        arch = "topk" if i == 2 else "standard"
        extra = {"k": 5} if arch == "topk" else {}
        out[f"{hook}-{arch}"] = tiny_sae(d_in=16, d_sae=40 + 4 * i, hook_name=hook, seed=seed + i, architecture=arch, **extra)
    # two SAEs at one hook: they share the captured activation and the continuation's start
    out["twin"] = tiny_sae(d_in=16, d_sae=32, hook_name=HOOKS[2], seed=seed + 9)
    return out


def opts(**kw: Any) -> EngineOptions:
    return EngineOptions(**{"special_token_ids": SPECIAL, "batch_size": 3, "n_bootstrap": 100, "seed": 0, **kw})


def assert_same(single: Any, multi: Any) -> None:
    """Two reports of one SAE: equal to float rounding (ill-conditioned ratios as close_results allows)."""
    close_results(metrics_part(single), metrics_part(multi), rel=1e-5, abs_=1e-6)
    for name in single.features.vectors:
        vectors_close(single.features.vectors[name], multi.features.vectors[name], rel=1e-5, abs_=1e-6)


@FEW
@given(seed=st.integers(0, 5), mode=st.sampled_from(["fused", "unfused", "sequential"]))
def test_each_sae_of_a_multi_sae_run_equals_its_single_run(seed, mode, tmp_path_factory):
    base, ft = models(seed)
    toks = random_tokens(7, 16, d_vocab=64, seed=seed)
    extra: dict[str, Any] = {"fuse_continuations": mode != "unfused", "sequential": mode == "sequential"}
    if mode == "sequential":
        extra["spill_dir"] = str(tmp_path_factory.mktemp("spill"))
    run = run_transfer_many(base, {"ft": ft}, saes(seed), toks, opts(**extra))
    assert list(run.outputs) == list(saes(seed))
    for key, sae in saes(seed).items():
        alone = run_transfer(base, {"ft": ft}, sae, toks, opts(**extra))
        out = run.outputs[key]
        assert out.report.config["hook_name"] == sae.cfg.metadata.hook_name
        assert_same(alone.report, out.report)


def test_cached_base_results_are_reused_not_recomputed():
    """With the base results of some SAEs given (as the cache gives them), those SAEs' numbers
    are unchanged, and the base runs no continuation for them."""
    base, ft = models(0)
    toks = random_tokens(6, 16, d_vocab=64, seed=0)
    all_saes = saes(0)
    first = run_transfer_many(base, {"ft": ft}, all_saes, toks, opts())
    cached = {k: first.outputs[k].base_state for k in list(all_saes)[:3]}
    calls: list[int] = []
    original = ModelRunner.losses

    def counting(self: Any, tokens_arg: Any, clean: Any, spliced: Any) -> Any:
        if self.model is base:
            calls.append(len(spliced))
        return original(self, tokens_arg, clean, spliced)

    mp = pytest.MonkeyPatch()
    mp.setattr(ModelRunner, "losses", counting)
    try:
        again = run_transfer_many(base, {"ft": ft}, all_saes, toks, opts(), base_states=cached)
    finally:
        mp.undo()
    assert calls and all(n == len(all_saes) - len(cached) for n in calls)
    for key in all_saes:
        assert_same(first.outputs[key].report, again.outputs[key].report)
        if key in cached:
            assert again.outputs[key].base_state is cached[key]


def test_out_of_memory_halving_keeps_every_sae_exact():
    base, ft = models(1)
    toks = random_tokens(9, 16, d_vocab=64, seed=1)
    clean = run_transfer_many(base, {"ft": ft}, saes(1), toks, opts(batch_size=8))
    original = ModelRunner.losses
    raised = {"n": 0}

    def faulty(self: Any, tokens_arg: torch.Tensor, *args: Any) -> Any:
        if tokens_arg.shape[0] > 2 and self.model is ft:
            raised["n"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, tokens_arg, *args)

    mp = pytest.MonkeyPatch()
    mp.setattr(ModelRunner, "losses", faulty)
    try:
        halved = run_transfer_many(base, {"ft": ft}, saes(1), toks, opts(batch_size=8))
    finally:
        mp.undo()
    assert raised["n"] > 0 and halved.oom_splits == 2
    for key in saes(1):
        assert_same(clean.outputs[key].report, halved.outputs[key].report)


def test_the_trunk_runs_once_per_model_and_batch():
    """One pass through the layers per model and batch, however many SAEs; the clean
    continuation once per model and batch."""
    base, ft = models(2)
    toks = random_tokens(6, 16, d_vocab=64, seed=2)
    counts = {"capture": 0, "losses": 0}
    capture, losses = ModelRunner.capture, ModelRunner.losses

    def count_capture(self: Any, *args: Any) -> Any:
        counts["capture"] += 1
        return capture(self, *args)

    def count_losses(self: Any, *args: Any) -> Any:
        counts["losses"] += 1
        return losses(self, *args)

    mp = pytest.MonkeyPatch()
    mp.setattr(ModelRunner, "capture", count_capture)
    mp.setattr(ModelRunner, "losses", count_losses)
    try:
        run_transfer_many(base, {"ft": ft}, saes(2), toks, opts(batch_size=3))
    finally:
        mp.undo()
    n_batches = 2
    assert counts == {"capture": 2 * n_batches, "losses": 2 * n_batches}
