"""Properties the engine must have whatever the weights: hypothesis over tiny models.

* a finetune identical to the base is indistinguishable from it;
* batch size changes nothing (the bootstrap CIs included);
* permuting the SAE's features permutes the per-feature vectors, nothing else;
* a finetune whose hook activation is exactly c x the base's has resid cosine 1
  and euclidean distance |1 - c| ||x_base||, and scaling a finetune keeps its cosine;
* same inputs and seed give a bit-identical report;
* out-of-memory batches are halved and retried, with the same results;
* non-finite activations are counted, never dropped silently, never leak.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from helpers import one_sae, random_tokens, tiny_pair, tiny_sae, zero_ablation_loss_per_token
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_sae_transfer.engine import EngineOptions, ModelRunner, evaluate_transfer, run_transfer

SPECIAL = (0, 1, 2)
HOOK = "blocks.0.hook_resid_post"
FEW = settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TIMING_KEYS = ("elapsed_seconds", "tokens_per_second")


# --------------------------------------------------------------------------
# builders (cached: hypothesis draws few distinct seeds)
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _pair(seed: int) -> tuple[Any, Any]:
    base, _ = tiny_pair(seed=seed, d_model=16, d_vocab=64, n_ctx=16)
    ft = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in ft.parameters():
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 1.0
            p.add_(0.1 * scale * torch.randn(p.shape, generator=gen))
    return base, ft.eval()


def pair(seed: int) -> tuple[Any, Any]:
    """(base, finetune); callers that modify a model must deepcopy it first."""
    return _pair(seed)


def make_sae(seed: int, architecture: str = "standard", hook: str = HOOK, d_sae: int = 48) -> Any:
    extra: dict[str, Any] = {"k": 6} if architecture == "topk" else {}
    sae = tiny_sae(d_in=16, d_sae=d_sae, hook_name=hook, seed=seed, architecture=architecture, **extra)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(sae.b_dec.shape, generator=gen))
        if getattr(sae, "b_enc", None) is not None:
            # a spread of biases: dense, regular, rare and dead features
            sae.b_enc.copy_(-torch.linspace(0.0, 3.0, d_sae)[torch.randperm(d_sae, generator=gen)])
    return sae


def tokens(seed: int, n_ctx: int = 8, ctx: int = 16) -> torch.Tensor:
    toks = random_tokens(n_ctx, ctx, d_vocab=64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 3)
    # EOS/PAD/BOS inside the contexts: the special-token mask is always exercised
    rows = torch.arange(n_ctx)
    toks[rows, torch.randint(1, ctx, (n_ctx,), generator=gen)] = 1
    toks[rows, torch.randint(1, ctx, (n_ctx,), generator=gen)] = 2
    return toks


def opts(**kw: Any) -> EngineOptions:
    base = {"special_token_ids": SPECIAL, "batch_size": 4, "n_bootstrap": 200, "seed": 0}
    base.update(kw)
    return EngineOptions(**base)


def report_json(report: Any) -> dict[str, Any]:
    data = one_sae(report.to_json())
    for key in TIMING_KEYS:
        data["config"].pop(key, None)
    return data


def close(a: Any, b: Any, rel: float = 1e-5, abs_: float = 1e-7, path: str = "") -> None:
    """Recursive approximate equality of two JSON-like values (None must match None)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys differ: {sorted(set(a) ^ set(b))}"
        for k in a:
            close(a[k], b[k], rel, abs_, f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, rel, abs_, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None, f"{path}: {a!r} vs {b!r}"
        assert a == pytest.approx(b, rel=rel, abs=abs_), f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def metrics_part(report: Any) -> dict[str, Any]:
    """Everything the engine measured (no config), but the feature-level section: it names
    features by id (the per-feature vectors it is built from are compared separately)."""
    data = report_json(report)
    finetunes = [{k: v for k, v in ft.items() if k != "features"} for ft in data["finetunes"]]
    return {"base": data["base"], "finetunes": finetunes}


#: Interval entries that divide by a quantity these random models put near 0: the zero-ablated
#: loss is within half a nat of the clean one, and the base's CE penalty changes sign across
#: bootstrap replicates. Float32 rounding in the sums is amplified by one over that
#: denominator, past any fixed relative tolerance; the sums themselves are compared exactly
#: as the rest (ce_loss_clean/spliced/zero_ablation and their differences).
ILL_CONDITIONED = {"ci95": ("ce_loss_recovered",), "delta_ci95": ("ce_loss_recovered",),
                   "ratio_ci95": ("ce_loss_recovered", "ce_loss_delta")}


def split_conditioning(part: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``part`` without the ILL_CONDITIONED entries, those entries)."""
    part = copy.deepcopy(part)
    ill: dict[str, Any] = {}
    for i, entry in enumerate([part["base"], *part["finetunes"]]):
        for field, keys in ILL_CONDITIONED.items():
            for key in keys:
                if key in entry.get(field, {}):
                    ill[f"{i}.{field}.{key}"] = entry[field].pop(key)
    return part, ill


def close_results(a: dict[str, Any], b: dict[str, Any], rel: float, abs_: float) -> None:
    """``close`` on everything, with ILL_CONDITIONED entries held to a looser 1e-3."""
    (a_ok, a_ill), (b_ok, b_ill) = split_conditioning(a), split_conditioning(b)
    close(a_ok, b_ok, rel=rel, abs_=abs_)
    close(a_ill, b_ill, rel=1e-3, abs_=1e-6)


def vectors_close(v1: dict[str, np.ndarray], v2: dict[str, np.ndarray], rel: float = 1e-5, abs_: float = 1e-7) -> None:
    assert set(v1) == set(v2)
    for key in v1:
        a, b = np.asarray(v1[key], dtype=np.float64), np.asarray(v2[key], dtype=np.float64)
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{key}: NaN pattern differs"
        ok = ~np.isnan(a)
        np.testing.assert_allclose(a[ok], b[ok], rtol=rel, atol=abs_, err_msg=key)


# --------------------------------------------------------------------------
# identical finetune
# --------------------------------------------------------------------------


@FEW
@given(seed=st.integers(0, 3), architecture=st.sampled_from(["standard", "topk", "jumprelu"]))
def test_identical_finetune_is_indistinguishable(seed, architecture):
    base, _ = pair(seed)
    same = copy.deepcopy(base)
    sae = make_sae(seed, architecture)
    toks = tokens(seed)
    report = evaluate_transfer(base, {"same": same}, sae, toks, opts())
    ft = report.finetune("same")
    p = ft.paired

    assert p["resid_cosine_mean"] == pytest.approx(1.0, abs=1e-12)
    assert p["resid_euclidean_mean"] == 0.0
    included_positions = [c for c in p["resid_cosine_by_position"] if c is not None]
    assert included_positions and all(c == pytest.approx(1.0, abs=1e-12) for c in included_positions)
    assert all(e in (None, 0.0) for e in p["resid_euclidean_by_position"])
    assert p["resid_cosine_by_position"][0] is None  # BOS everywhere

    assert p["n_dead_base_only"] == 0 and p["n_dead_finetune_only"] == 0 and p["dead_shift_fraction"] == 0.0
    assert p["density_log10_pearson"] == pytest.approx(1.0, abs=1e-12)
    assert p["dead_activation_error_base_only_mean"] is None and p["dead_activation_error_finetune_only_mean"] is None

    vec = report.features.vectors["same"]
    np.testing.assert_array_equal(vec["density_base"], vec["density_finetune"])
    regular = ~np.isnan(vec["logit_similarity"])
    assert regular.sum() == p["n_regular_features"]
    if p["n_regular_features"]:
        # every regular feature fires somewhere and not everywhere, so it varies: similarity 1
        act = vec["activation_similarity"][regular]
        assert p["n_activation_similarity_undefined"] == 0
        np.testing.assert_allclose(act, 1.0, atol=1e-12)
        np.testing.assert_allclose(vec["logit_similarity"][regular], 1.0, atol=1e-12)
        assert p["activation_similarity_mean"] == pytest.approx(1.0, abs=1e-12)
        assert p["activation_similarity_frac_above_0_8"] == 1.0
        assert p["logit_similarity_mean"] == pytest.approx(1.0, abs=1e-12)
    assert p["unembed_frobenius_ratio"] == 1.0
    assert p["weight_deviation"] == [0.0] * base.cfg.n_layers

    # Every per-model number (CE included) is the base's, and so is every interval.
    assert ft.metrics == report.base.metrics
    assert ft.ci95 == report.base.ci95


# --------------------------------------------------------------------------
# batch size
# --------------------------------------------------------------------------


EXECUTION_MODES = {
    "fused": {},
    "unfused": {"fuse_continuations": False},
    "sequential": {"sequential": True},  # base first, spilled to disk, then the finetune
    "small_logit_chunks": {"logits_chunk_elems": 1000},
}


@FEW
@given(
    seed=st.integers(0, 3),
    batch_sizes=st.lists(st.integers(1, 9), min_size=2, max_size=2, unique=True),
    mode=st.sampled_from(sorted(EXECUTION_MODES)),
)
def test_batch_size_does_not_change_results(seed, batch_sizes, mode, tmp_path_factory):
    """Batch size, and how the work is scheduled, change nothing (CIs included)."""
    base, ft = pair(seed)
    sae = make_sae(seed)
    toks = tokens(seed, n_ctx=9)
    extra = dict(EXECUTION_MODES[mode])
    if extra.get("sequential"):
        extra["spill_dir"] = str(tmp_path_factory.mktemp("spill"))
    reports = [
        evaluate_transfer(base, {"ft": ft}, sae, toks, opts(batch_size=batch_sizes[0])),
        evaluate_transfer(base, {"ft": ft}, sae, toks, opts(batch_size=batch_sizes[1], **extra)),
    ]
    a, b = (metrics_part(r) for r in reports)
    assert a["base"]["ci95"] and a["finetunes"][0]["paired_ci95"]
    # point values, per-position lists and the bootstrap intervals alike
    close_results(a, b, rel=1e-5, abs_=1e-7)
    vectors_close(reports[0].features.vectors["ft"], reports[1].features.vectors["ft"])


# --------------------------------------------------------------------------
# the zero-ablated continuation, computed once per model
# --------------------------------------------------------------------------


@FEW
@given(seed=st.integers(0, 3), ctx=st.integers(2, 16))
def test_zero_ablation_shortcut_matches_the_full_continuation(seed, ctx):
    """The once-per-model zero-ablation CE equals TransformerLens's per-batch loss at every token."""
    base, _ = pair(seed)
    toks = tokens(seed, n_ctx=5, ctx=16)[:, :ctx]
    runner = ModelRunner(base, 1 << 24, True)
    table = runner.zero_ablation_ce(ctx, 1)
    assert table is not None and table.shape == (base.cfg.d_vocab_out,)
    x = runner.capture(toks, [1])[1]
    _, _, ce_zero, _ = runner.continuations(toks, 1, x, x)
    np.testing.assert_allclose(ce_zero.numpy(), zero_ablation_loss_per_token(base, 1, toks).numpy(), rtol=1e-5, atol=1e-6)


def test_zero_ablation_falls_back_per_batch_when_positions_differ():
    """A model that adds a position-dependent vector after the hook breaks the shortcut's
    premise: the runner must notice and run the zero-ablated continuation per batch."""
    base = copy.deepcopy(pair(0)[0])
    gen = torch.Generator().manual_seed(5)
    by_position = torch.randn(base.cfg.n_ctx, base.cfg.d_model, generator=gen)
    base.add_hook("blocks.1.hook_resid_pre", lambda resid, hook: resid + by_position[: resid.shape[1]])
    try:
        toks = tokens(0)
        runner = ModelRunner(base, 1 << 24, True)
        assert runner.zero_ablation_ce(toks.shape[1], 1) is None
        x = runner.capture(toks, [1])[1]
        _, _, ce_zero, _ = runner.continuations(toks, 1, x, x)
        np.testing.assert_allclose(ce_zero.numpy(), zero_ablation_loss_per_token(base, 1, toks).numpy(), rtol=1e-5, atol=1e-6)
        # the positions really differ after a zero residual, so one shared row would be wrong
        final = runner.final_resid(torch.zeros(1, toks.shape[1], base.cfg.d_model), 1)[0]
        assert float((final - final[0]).abs().max()) > 0.1 * float(final[0].abs().max())
    finally:
        base.reset_hooks(including_permanent=True)


# --------------------------------------------------------------------------
# feature permutation
# --------------------------------------------------------------------------


def permuted_sae(sae: Any, perm: torch.Tensor) -> Any:
    """A new SAE whose feature j is the original feature perm[j]."""
    from sae_lens import SAE

    d_sae = sae.cfg.d_sae
    assert sae.cfg.d_in != d_sae
    state = {}
    for name, value in sae.state_dict().items():
        if value.ndim == 2 and value.shape[1] == d_sae:  # W_enc (and gated r_mag-like matrices)
            value = value[:, perm]
        elif value.ndim == 2 and value.shape[0] == d_sae:  # W_dec
            value = value[perm, :]
        elif value.ndim == 1 and value.shape[0] == d_sae:  # b_enc, threshold, ...
            value = value[perm]
        state[name] = value.clone()
    new = SAE.from_dict(sae.cfg.to_dict())
    new.load_state_dict(state)
    return new.eval()


@FEW
@given(seed=st.integers(0, 3), architecture=st.sampled_from(["standard", "topk", "jumprelu"]), perm_seed=st.integers(0, 10**6))
def test_feature_permutation_permutes_vectors_only(seed, architecture, perm_seed):
    base, ft = pair(seed)
    sae = make_sae(seed, architecture)
    perm = torch.randperm(sae.cfg.d_sae, generator=torch.Generator().manual_seed(perm_seed))
    psae = permuted_sae(sae, perm)
    toks = tokens(seed)

    # the permuted SAE really is the same dictionary, features reordered
    x = torch.randn(5, sae.cfg.d_in)
    with torch.no_grad():
        torch.testing.assert_close(psae.encode(x), sae.encode(x)[:, perm])
        torch.testing.assert_close(psae.decode(psae.encode(x)), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)

    r1 = evaluate_transfer(base, {"ft": ft}, sae, toks, opts())
    r2 = evaluate_transfer(base, {"ft": ft}, psae, toks, opts())
    close_results(metrics_part(r1), metrics_part(r2), rel=1e-5, abs_=1e-6)
    v1, v2 = r1.features.vectors["ft"], r2.features.vectors["ft"]
    idx = perm.numpy()
    vectors_close({k: np.asarray(v)[idx] for k, v in v1.items()}, v2, rel=1e-5, abs_=1e-6)


# --------------------------------------------------------------------------
# scaling the residual stream
# --------------------------------------------------------------------------


def scaled_at_hook(model: Any, c: float, layer: int) -> Any:
    """A copy whose residual stream up to blocks.<layer>.hook_resid_post is exactly c x the original's.

    Embeddings and every block's output weights before the hook are scaled by c; each
    block's input goes through a LayerNorm, which is scale-invariant but for its eps:
    LN(c x; c^2 eps) = LN(x; eps), so those LayerNorms get eps x c^2 (the blocks after
    the hook are left alone)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.embed.W_E.mul_(c)
        out.pos_embed.W_pos.mul_(c)
        for block in out.blocks[: layer + 1]:
            for p in (block.attn.W_O, block.attn.b_O, block.mlp.W_out, block.mlp.b_out):
                p.mul_(c)
            for ln in (block.ln1, block.ln2):
                ln.eps = ln.eps * c * c
    return out.eval()


@torch.no_grad()
def hook_acts(model: Any, toks: torch.Tensor, hook: str = HOOK) -> torch.Tensor:
    _, cache = model.run_with_cache(toks, names_filter=hook)
    return cache[hook].double()


@FEW
@given(seed=st.integers(0, 3), c=st.floats(0.25, 4.0).filter(lambda v: abs(v - 1.0) > 0.05))
def test_scaled_finetune_cosine_one_and_predictable_distance(seed, c):
    base, _ = pair(seed)
    ft_c = scaled_at_hook(base, c, layer=0)
    toks = tokens(seed)
    xb, xc = hook_acts(base, toks), hook_acts(ft_c, toks)
    # the construction does what it claims (LayerNorm eps is the only deviation)
    torch.testing.assert_close(xc, c * xb, rtol=1e-4, atol=1e-5)

    sae = make_sae(seed)
    report = evaluate_transfer(base, {"scaled": ft_c}, sae, toks, opts())
    p = report.finetune("scaled").paired
    mask = ~torch.isin(toks, torch.tensor(SPECIAL))
    norms = xb.norm(dim=-1)  # [C, T]
    expected_euc = abs(1.0 - c) * norms
    assert p["resid_cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert p["resid_euclidean_mean"] == pytest.approx(float(expected_euc[mask].mean()), rel=1e-4)
    for pos, value in enumerate(p["resid_euclidean_by_position"]):
        m = mask[:, pos]
        if not bool(m.any()):
            assert value is None
        else:
            assert value == pytest.approx(float(expected_euc[m, pos].mean()), rel=1e-4)
    # the base-vs-base weight comparison sees exactly the scaled blocks
    assert p["weight_deviation"][0] > 0 and p["weight_deviation"][1] == 0.0


@FEW
@given(seed=st.integers(0, 3), c=st.floats(0.25, 4.0))
def test_scaling_a_finetune_keeps_its_cosine(seed, c):
    base, ft = pair(seed)
    ft_c = scaled_at_hook(ft, c, layer=0)
    sae = make_sae(seed)
    toks = tokens(seed)
    r1 = evaluate_transfer(base, {"ft": ft}, sae, toks, opts(n_bootstrap=0))
    r2 = evaluate_transfer(base, {"ft": ft_c}, sae, toks, opts(n_bootstrap=0))
    p1, p2 = r1.finetune("ft").paired, r2.finetune("ft").paired
    assert p2["resid_cosine_mean"] == pytest.approx(p1["resid_cosine_mean"], rel=1e-4, abs=1e-5)
    for a, b in zip(p1["resid_cosine_by_position"], p2["resid_cosine_by_position"]):
        assert (a is None and b is None) or a == pytest.approx(b, rel=1e-4, abs=1e-5)
    # euclidean: ||x_b - c x_f||, computed independently
    mask = ~torch.isin(toks, torch.tensor(SPECIAL))
    xb, xf = hook_acts(base, toks), hook_acts(ft, toks)
    expected = (xb - c * xf).norm(dim=-1)[mask].mean()
    assert p2["resid_euclidean_mean"] == pytest.approx(float(expected), rel=1e-4)


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(seed=st.integers(0, 3), boot_seed=st.integers(0, 2**31 - 1))
def test_same_seed_gives_bit_identical_report(seed, boot_seed):
    base, ft = pair(seed)
    sae = make_sae(seed)
    toks = tokens(seed)
    runs = [evaluate_transfer(base, {"ft": ft}, sae, toks, opts(seed=boot_seed)) for _ in range(2)]
    texts = [json.dumps(report_json(r), sort_keys=True, allow_nan=False) for r in runs]
    assert texts[0] == texts[1]
    for key in runs[0].features.vectors["ft"]:
        np.testing.assert_array_equal(runs[0].features.vectors["ft"][key], runs[1].features.vectors["ft"][key])
    # and a different bootstrap seed moves the intervals, not the point values
    other = evaluate_transfer(base, {"ft": ft}, sae, toks, opts(seed=boot_seed + 1))
    assert other.base.metrics == runs[0].base.metrics
    assert other.base.ci95 != runs[0].base.ci95


# --------------------------------------------------------------------------
# out-of-memory halving
# --------------------------------------------------------------------------


@FEW
@given(
    seed=st.integers(0, 3),
    k=st.integers(1, 3),
    where=st.sampled_from(["capture", "losses"]),
    exc=st.sampled_from(["cuda", "memory", "runtime"]),
)
def test_out_of_memory_batches_are_halved(seed, k, where, exc):
    base, ft = pair(seed)
    sae = make_sae(seed)
    toks = tokens(seed, n_ctx=9)
    clean = evaluate_transfer(base, {"ft": ft}, sae, toks, opts(batch_size=8))

    original = getattr(ModelRunner, where)
    calls = {"raised": 0}

    def faulty(self, tokens_arg, *args, **kwargs):
        if tokens_arg.shape[0] > k:
            calls["raised"] += 1
            if exc == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if exc == "memory":
                raise MemoryError()
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate 10 bytes. Buy new RAM! out of memory")
        return original(self, tokens_arg, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(ModelRunner, where, faulty)
    try:
        out = run_transfer(base, {"ft": ft}, sae, toks, opts(batch_size=8))
    finally:
        mp.undo()
    assert calls["raised"] > 0
    assert out.oom_splits > 0 and out.report.config["oom_batch_splits"] == out.oom_splits
    assert clean.config["oom_batch_splits"] == 0
    close(metrics_part(clean), metrics_part(out.report), rel=1e-5, abs_=1e-7)
    vectors_close(clean.features.vectors["ft"], out.report.features.vectors["ft"])


def test_other_errors_are_not_retried(monkeypatch):
    base, ft = pair(0)
    sae = make_sae(0)

    def broken(self, tokens_arg, *args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(ModelRunner, "capture", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluate_transfer(base, {"ft": ft}, sae, tokens(0), opts())


# --------------------------------------------------------------------------
# non-finite values
# --------------------------------------------------------------------------


def poisoned(model: Any, token_ids: list[int]) -> Any:
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.W_E[token_ids] = float("inf")
    return out.eval()


def _assert_nothing_else_nan(report: Any) -> None:
    for entry in [report.base, *report.finetunes]:
        for key, value in entry.metrics.items():
            assert value is not None and (not isinstance(value, float) or math.isfinite(value)), f"{entry.model}.{key} = {value!r}"
        for key, (lo, hi) in entry.ci95.items():
            assert math.isfinite(lo) and math.isfinite(hi), f"{entry.model}.ci95.{key}"
    p = report.finetunes[0].paired
    for key in ("resid_cosine_mean", "resid_euclidean_mean", "density_log10_pearson"):
        assert p[key] is not None and math.isfinite(p[key]), key


@FEW
@given(seed=st.integers(0, 3), n_bad=st.integers(1, 4))
def test_nonfinite_activations_counted_never_dropped(seed, n_bad):
    """Inf embeddings for a few token ids. At blocks.0.hook_resid_post attention spreads the
    NaN over the whole context (TransformerLens computes pattern @ v, and 0 x NaN = NaN), so
    the non-finite tokens are every included token of the contexts that hold a bad id;
    the expected fraction is measured directly at the hook."""
    base, _ = pair(seed)
    toks = tokens(seed)
    present = sorted(set(toks[:, 1:].flatten().tolist()) - set(SPECIAL))
    bad = present[:: max(1, len(present) // n_bad)][:n_bad]
    ft = poisoned(base, bad)
    sae = make_sae(seed)
    mask = ~torch.isin(toks, torch.tensor(SPECIAL))
    x_ft = hook_acts(ft, toks)
    nonfinite = ~torch.isfinite(x_ft).all(-1)
    expected = int((nonfinite & mask).sum()) / int(mask.sum())
    assert expected > 0

    report = evaluate_transfer(base, {"bad": ft}, sae, toks, opts())
    m = report.finetune("bad").metrics
    assert m["nonfinite_fraction"] == pytest.approx(expected, abs=1e-12)
    assert m["n_nonfinite"] == int((nonfinite & mask).sum())
    assert report.base.metrics["nonfinite_fraction"] == 0.0
    # no token silently dropped: n_tokens still counts every included token
    assert m["n_tokens"] == report.base.metrics["n_tokens"] == int(mask.sum())
    if expected < 1.0:
        _assert_nothing_else_nan(report)
        assert report.finetune("bad").paired["n_tokens"] == int((mask & ~nonfinite).sum())


def test_nonfinite_fraction_counts_activations_not_downstream_losses():
    """SPEC: nonfinite_fraction is the fraction of included tokens whose *activation or
    reconstruction* is NaN/Inf. At blocks.0.hook_resid_pre (the embedding) an Inf embedding
    row makes exactly the tokens with that id non-finite; the NaN then spreads through
    attention downstream, so CE/KL are NaN for whole contexts, but the activations of the
    other tokens are finite and must still be evaluated (L0, densities, variance)."""
    seed = 0
    base, _ = pair(seed)
    toks = tokens(seed)
    present = sorted(set(toks[:2, 1:].flatten().tolist()) - set(SPECIAL))
    bad = present[:2]
    ft = poisoned(base, bad)
    hook = "blocks.0.hook_resid_pre"
    sae = make_sae(seed, hook=hook)
    mask = ~torch.isin(toks, torch.tensor(SPECIAL))
    x_ft = hook_acts(ft, toks, hook)
    act_bad = ~torch.isfinite(x_ft).all(-1)
    assert bool((act_bad == torch.isin(toks, torch.tensor(bad))).all())

    report = evaluate_transfer(base, {"bad": ft}, sae, toks, opts())
    m = report.finetune("bad").metrics
    expected = int((act_bad & mask).sum()) / int(mask.sum())
    assert m["nonfinite_fraction"] == pytest.approx(expected, abs=1e-12), (
        "tokens with finite activations were counted as non-finite (their downstream CE/KL was NaN)"
    )
    assert m["n_tokens"] == int(mask.sum())
    _assert_nothing_else_nan(report)
    # the finetune's activation statistics use every token whose activation is finite
    ok = mask & ~act_bad
    with torch.no_grad():
        f = sae.encode(x_ft[ok].float())
    assert m["l0"] == pytest.approx(float((f != 0).sum(-1).double().mean()), rel=1e-9)
    # positions whose loss is NaN downstream are left out of the loss means, and counted
    contexts_hit = act_bad.any(1, keepdim=True).expand_as(mask)
    assert m["n_nonfinite_loss"] == int((mask & ~act_bad & contexts_hit).sum()) > 0
    assert 0 < expected < 0.5
