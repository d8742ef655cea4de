"""The feature transfer rate, the dense shift and the paired bootstrap, against numpy brute force.

Random token-level data go through the real accumulators (the ones the engine feeds
batch by batch); numpy recomputes the same quantities from the token arrays alone,
with its own formulas, and scipy gives the per-feature Pearson correlations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_sae_transfer.metrics.bootstrap import MODEL_CI_KEYS, Resampler, model_intervals, paired_model_intervals
from pytest_sae_transfer.metrics.keys import CHECKABLE_PAIRED_KEYS, PAIRED_EXTRA_KEYS
from pytest_sae_transfer.metrics.model import ModelAccumulator, ModelBatch
from pytest_sae_transfer.metrics.paired import PairedAccumulator
from pytest_sae_transfer.metrics.pairs import paired_metrics

LOG_EPS = 1e-10

# ---------------------------------------------------------------------------- feature transfer

#: Feature kinds for the random data: how a feature behaves on the base and on the finetune.
KINDS = ("kept", "noisy", "turned_dense", "turned_dead", "decorrelated", "dense_both", "dense_to_regular", "dead_both", "sign_flip")


def _features(rng: np.random.Generator, n_tok: int, kinds: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[n_tok, d_sae] non-negative activations for base and finetune, one column per kind."""
    fa = np.zeros((n_tok, len(kinds)))
    fb = np.zeros((n_tok, len(kinds)))
    for i, kind in enumerate(kinds):
        p = rng.uniform(0.004, 0.06)  # regular: 1e-5 .. 0.1
        fires = rng.random(n_tok) < p
        mags = rng.gamma(2.0, 1.0, n_tok)
        a = np.where(fires, mags, 0.0)
        if kind == "kept":
            b = a * (1 + 0.01 * rng.standard_normal(n_tok)).clip(0.5)
        elif kind == "noisy":  # similarity somewhere around the 0.8 line
            b = np.where(fires & (rng.random(n_tok) < rng.uniform(0.5, 1.0)), mags * rng.uniform(0.2, 2.0, n_tok), 0.0)
        elif kind == "turned_dense":
            b = np.where(fires | (rng.random(n_tok) < 0.3), mags, 0.0)
        elif kind == "turned_dead":
            b = np.zeros(n_tok)
        elif kind == "decorrelated":
            b = np.where(rng.random(n_tok) < p, rng.gamma(2.0, 1.0, n_tok), 0.0)
        elif kind == "dense_both":
            a = np.where(rng.random(n_tok) < 0.4, mags, 0.0)
            b = a.copy()
        elif kind == "dense_to_regular":
            a = np.where(rng.random(n_tok) < 0.4, mags, 0.0)
            b = np.where(fires, mags, 0.0)
        elif kind == "dead_both":
            a = np.zeros(n_tok)
            b = np.zeros(n_tok)
        elif kind == "sign_flip":  # fires on exactly the other tokens: strongly anti-correlated
            b = np.where(~fires & (rng.random(n_tok) < p), mags, 0.0)
        fa[:, i], fb[:, i] = a, b
    return fa, fb


def _batches(arr: np.ndarray, n_ctx: int, ctx: int) -> torch.Tensor:
    return torch.from_numpy(arr.reshape(n_ctx, ctx, -1).astype(np.float32))


def _run_accumulators(fa: np.ndarray, fb: np.ndarray, included: np.ndarray, n_ctx: int, ctx: int, batch: int):
    d_sae = fa.shape[1]
    d_in = 4
    base_acc = ModelAccumulator(d_in, d_sae, with_losses=False)
    ft_acc = ModelAccumulator(d_in, d_sae, with_losses=False)
    pair = PairedAccumulator(d_sae, ctx)
    FA, FB = _batches(fa, n_ctx, ctx), _batches(fb, n_ctx, ctx)
    inc = torch.from_numpy(included.reshape(n_ctx, ctx))
    gen = torch.Generator().manual_seed(0)
    for s in range(0, n_ctx, batch):
        sl = slice(s, s + batch)
        B = FA[sl].shape[0]
        x = torch.randn(B, ctx, d_in, generator=gen)
        zeros = torch.zeros(B, ctx, dtype=torch.bool)
        base_acc.update(ModelBatch(x=x, x_hat=x, feats=FA[sl], included=inc[sl], outlier=zeros))
        ft_acc.update(ModelBatch(x=x, x_hat=x, feats=FB[sl], included=inc[sl], outlier=zeros))
        pair.update(x, x, FA[sl], FB[sl], inc[sl])
    weights_part = {"notes": [], "logit_similarity": torch.zeros(d_sae, dtype=torch.float64),
                    "unembed_frobenius_ratio": 1.0, "weight_deviation": [], "n_shared_vocab": 0}
    paired, _, _ = paired_metrics(base_acc.fire_count, base_acc.n_eval, ft_acc, pair, weights_part)
    return paired


def _numpy_transfer(fa: np.ndarray, fb: np.ndarray) -> dict[str, object]:
    """The definitions, brute force: densities, bands, scipy Pearson per feature."""
    from scipy import stats

    n, d = fa.shape
    dens_a, dens_b = (fa != 0).sum(0) / n, (fb != 0).sum(0) / n
    log_a, log_b = np.log10(dens_a + LOG_EPS), np.log10(dens_b + LOG_EPS)
    reg_a = (log_a >= -5) & (log_a <= -1)
    reg_b = (log_b >= -5) & (log_b <= -1)
    transferred = 0
    for i in range(d):
        if not reg_a[i] or not reg_b[i]:
            continue
        if np.ptp(fa[:, i]) == 0 or np.ptp(fb[:, i]) == 0:
            continue  # undefined similarity: not transferred
        if stats.pearsonr(fa[:, i], fb[:, i]).statistic >= 0.8:
            transferred += 1
    dense_a, dense_b = dens_a > 0.1, dens_b > 0.1
    n_reg = int(reg_a.sum())
    return {
        "n_regular_base": n_reg,
        "n_transferred": transferred,
        "feature_transfer_rate": transferred / n_reg if n_reg else None,
        "n_dense_base_only": int((dense_a & ~dense_b).sum()),
        "n_dense_finetune_only": int((~dense_a & dense_b).sum()),
        "dense_shift_fraction": float((dense_a != dense_b).sum() / d),
    }


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=30),
    n_ctx=st.integers(4, 24),
    batch=st.integers(1, 8),
)
def test_feature_transfer_and_dense_shift_match_numpy(seed, kinds, n_ctx, batch):
    ctx = 64
    rng = np.random.default_rng(seed)
    n_tok = n_ctx * ctx
    fa, fb = _features(rng, n_tok, kinds)
    included = rng.random(n_tok) > 0.05
    paired = _run_accumulators(fa, fb, included, n_ctx, ctx, batch)
    ref = _numpy_transfer(fa[included], fb[included])
    for key in ("n_regular_base", "n_transferred", "n_dense_base_only", "n_dense_finetune_only"):
        assert paired[key] == ref[key], (key, paired[key], ref[key])
    assert paired["dense_shift_fraction"] == pytest.approx(ref["dense_shift_fraction"], abs=1e-15)
    if ref["feature_transfer_rate"] is None:
        assert paired["feature_transfer_rate"] is None
    else:
        assert paired["feature_transfer_rate"] == pytest.approx(ref["feature_transfer_rate"], abs=1e-15)
        assert 0.0 <= paired["feature_transfer_rate"] <= 1.0
    # The old survivors-only view: every transferred feature is among the regular-in-both ones.
    assert paired["n_transferred"] <= paired["n_regular_features"] <= paired["n_regular_base"]


def test_broken_features_count_as_not_transferred():
    """Each way a feature can break is counted against the rate; the survivors-only mean does not see it."""
    rng = np.random.default_rng(3)
    kinds = ["kept"] * 6 + ["turned_dense", "turned_dead", "decorrelated", "sign_flip"]
    n_ctx, ctx = 32, 64
    fa, fb = _features(rng, n_ctx * ctx, kinds)
    paired = _run_accumulators(fa, fb, np.ones(n_ctx * ctx, dtype=bool), n_ctx, ctx, 8)
    assert paired["n_regular_base"] == 10
    assert paired["n_transferred"] == 6 and paired["feature_transfer_rate"] == pytest.approx(0.6)
    assert paired["n_dense_finetune_only"] == 1 and paired["n_dense_base_only"] == 0
    assert paired["dense_shift_fraction"] == pytest.approx(0.1)
    assert paired["n_dead_finetune_only"] == 1
    # the dense and the dead feature are simply left out of the old mean
    assert paired["n_regular_features"] == 8


def test_transfer_rate_is_null_without_regular_base_features():
    n_ctx, ctx = 4, 32
    rng = np.random.default_rng(0)
    fa, fb = _features(rng, n_ctx * ctx, ["dense_both", "dead_both"])
    paired = _run_accumulators(fa, fb, np.ones(n_ctx * ctx, dtype=bool), n_ctx, ctx, 2)
    assert paired["n_regular_base"] == 0 and paired["n_transferred"] == 0
    assert paired["feature_transfer_rate"] is None  # nothing to transfer, not "all transferred"
    assert paired["dense_shift_fraction"] == 0.0


def test_extra_keys_are_checkable():
    assert set(PAIRED_EXTRA_KEYS) <= set(CHECKABLE_PAIRED_KEYS)
    assert len(set(CHECKABLE_PAIRED_KEYS)) == len(CHECKABLE_PAIRED_KEYS)


# ---------------------------------------------------------------------------- paired bootstrap

D_IN = 5


def _model_tokens(rng: np.random.Generator, n_ctx: int, ctx: int, base: dict | None, noise: float) -> dict[str, np.ndarray]:
    """Token-level arrays of one model. Contexts differ a lot from each other (a per-context
    offset), and a finetune is the base plus ``noise``-sized independent changes."""
    if base is None:
        offset = rng.normal(0, 1.0, (n_ctx, 1, 1))
        x = offset * 3 + rng.normal(0, 1, (n_ctx, ctx, D_IN))
        x_hat = x + rng.normal(0, 0.3, x.shape) * (1 + np.abs(offset))
        l0 = np.minimum(rng.poisson(5 + 4 * np.abs(offset[..., 0]), (n_ctx, ctx)), 20).astype(float)
        ce_clean = 3 + offset[..., 0] + rng.gamma(2, 0.2, (n_ctx, ctx - 1))
        ce_spliced = ce_clean + rng.gamma(2, 0.05 + 0.05 * np.abs(offset[..., 0]), (n_ctx, ctx - 1))
        ce_zero = ce_clean + 2 + rng.gamma(2, 0.3, (n_ctx, ctx - 1))
        kl = rng.gamma(2, 0.05 + 0.05 * np.abs(offset[..., 0]), (n_ctx, ctx))
        return {"x": x, "x_hat": x_hat, "l0": l0, "ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero": ce_zero, "kl": kl}

    def jitter(a: np.ndarray, scale: float) -> np.ndarray:
        return a + noise * scale * rng.standard_normal(a.shape)

    x = jitter(base["x"], 1.0)
    x_hat = x + (base["x_hat"] - base["x"]) * (1 + noise * rng.standard_normal(base["x"].shape))
    l0 = np.clip(np.round(base["l0"] + noise * 3 * rng.standard_normal(base["l0"].shape)), 0, 20)
    ce_clean = jitter(base["ce_clean"], 0.3)
    ce_spliced = ce_clean + np.abs(jitter(base["ce_spliced"] - base["ce_clean"], 0.05))
    ce_zero = ce_clean + np.abs(jitter(base["ce_zero"] - base["ce_clean"], 0.3))
    kl = np.abs(jitter(base["kl"], 0.05))
    return {"x": x, "x_hat": x_hat, "l0": l0, "ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero": ce_zero, "kl": kl}


def _feats_with_l0(l0: np.ndarray, d_sae: int, rng: np.random.Generator) -> np.ndarray:
    """[C, T, d_sae] features with exactly l0[c, t] non-zero entries per token."""
    C, T = l0.shape
    feats = np.zeros((C, T, d_sae), dtype=np.float32)
    order = np.argsort(rng.random((C, T, d_sae)), axis=-1)
    ranks = np.argsort(order, axis=-1)
    feats[ranks < l0[..., None]] = 1.0
    return feats


def _accumulate(arrs: dict[str, np.ndarray], included: np.ndarray, batch: int, d_sae: int, rng) -> ModelAccumulator:
    C, T = included.shape
    acc = ModelAccumulator(D_IN, d_sae, with_losses=True)
    feats = _feats_with_l0(arrs["l0"], d_sae, rng)
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    for s in range(0, C, batch):
        sl = slice(s, s + batch)
        acc.update(
            ModelBatch(
                x=f32(arrs["x"][sl]), x_hat=f32(arrs["x_hat"][sl]), feats=f32(feats[sl]),
                included=torch.from_numpy(included[sl]), outlier=torch.zeros(included[sl].shape, dtype=torch.bool),
                ce_clean=f32(arrs["ce_clean"][sl]), ce_spliced=f32(arrs["ce_spliced"][sl]), ce_zero=f32(arrs["ce_zero"][sl]),
                kl=f32(arrs["kl"][sl]),
            )
        )
    return acc


def _weighted_metrics(arrs: dict[str, np.ndarray], included: np.ndarray, w: np.ndarray) -> dict[str, float]:
    """The metric definitions on tokens weighted by their context's multiplicity ``w`` [C]:
    the same as evaluating them on the resampled token set."""
    f64 = lambda a: np.asarray(a, dtype=np.float32).astype(np.float64)  # noqa: E731 - what the accumulator saw
    x, xh = f64(arrs["x"]), f64(arrs["x_hat"])
    tok_w = np.broadcast_to(w[:, None], included.shape) * included
    W = tok_w.sum()
    out: dict[str, float] = {}
    out["l0"] = float((tok_w * arrs["l0"]).sum() / W)
    ce_w = tok_w[:, :-1]
    clean = float((ce_w * f64(arrs["ce_clean"])).sum() / ce_w.sum())
    spliced = float((ce_w * f64(arrs["ce_spliced"])).sum() / ce_w.sum())
    zero = float((ce_w * f64(arrs["ce_zero"])).sum() / ce_w.sum())
    out.update(ce_loss_clean=clean, ce_loss_spliced=spliced, ce_loss_delta=spliced - clean, ce_loss_zero_ablation=zero,
               ce_loss_recovered=(zero - spliced) / (zero - clean))
    out["kl_div_spliced"] = float((tok_w * f64(arrs["kl"])).sum() / W)
    err = ((x - xh) ** 2).sum(-1)
    mu = (tok_w[..., None] * x).sum((0, 1)) / W
    out["explained_variance"] = 1 - float((tok_w * err).sum() / (tok_w * ((x - mu) ** 2).sum(-1)).sum())
    m = float((tok_w[..., None] * x).sum() / (W * D_IN))
    out["r2_pooled"] = 1 - float((tok_w * err).sum() / (tok_w[..., None] * (x - m) ** 2).sum())
    out["mse"] = float((tok_w * err).sum() / W)
    cos = (x * xh).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(xh, axis=-1))
    out["cossim"] = float((tok_w * cos).sum() / W)
    return out


def _case(seed: int, n_ctx: int, ctx: int, noise: float, batch: int):
    rng = np.random.default_rng(seed)
    base = _model_tokens(rng, n_ctx, ctx, None, noise)
    ft = _model_tokens(rng, n_ctx, ctx, base, noise)
    included = rng.random((n_ctx, ctx)) > 0.1
    included[:, 0] = False  # BOS-like
    d_sae = 24
    acc_b = _accumulate(base, included, batch, d_sae, rng)
    acc_f = _accumulate(ft, included, batch, d_sae, rng)
    return base, ft, included, acc_b, acc_f


def test_paired_interval_is_numpys_percentile_of_jointly_resampled_differences():
    n_ctx, ctx = 12, 9
    base, ft, included, acc_b, acc_f = _case(seed=11, n_ctx=n_ctx, ctx=ctx, noise=0.2, batch=5)
    resampler = Resampler(n_ctx, 300, seed=4)
    delta, ratio = paired_model_intervals(acc_b.context_tables(), acc_f.context_tables(), resampler)
    assert set(delta) == set(ratio) == set(MODEL_CI_KEYS)
    weights = torch.cat(list(resampler.blocks())).numpy()
    diffs = {k: [] for k in MODEL_CI_KEYS}
    quots = {k: [] for k in MODEL_CI_KEYS}
    for w in weights:  # one multiplicity row for both models
        mb, mf = _weighted_metrics(base, included, w), _weighted_metrics(ft, included, w)
        for k in MODEL_CI_KEYS:
            diffs[k].append(mf[k] - mb[k])
            quots[k].append(mf[k] / mb[k])
    for k in MODEL_CI_KEYS:
        np.testing.assert_allclose(delta[k], np.percentile(diffs[k], [2.5, 97.5]), rtol=1e-7, atol=1e-9, err_msg=k)
        np.testing.assert_allclose(ratio[k], np.percentile(quots[k], [2.5, 97.5]), rtol=1e-7, atol=1e-9, err_msg=k)
    # The point difference lies inside its interval.
    mb, mf = acc_b.summary(), acc_f.summary()
    for k in ("ce_loss_delta", "l0", "explained_variance"):
        lo, hi = delta[k]
        assert lo <= mf[k] - mb[k] <= hi, k


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_ctx=st.integers(8, 40),
    noise=st.floats(0.0, 0.15),
    batch=st.integers(1, 16),
)
def test_paired_interval_is_narrower_than_the_naive_one_when_models_are_correlated(seed, n_ctx, noise, batch):
    """Context-to-context variation both models share cancels in the paired difference; the
    naive interval (the two separate intervals combined as if independent) keeps it."""
    ctx = 8
    _, _, _, acc_b, acc_f = _case(seed, n_ctx, ctx, noise, batch)
    resampler = Resampler(n_ctx, 400, seed=seed % 1000)
    delta, _ = paired_model_intervals(acc_b.context_tables(), acc_f.context_tables(), resampler)
    ci_b = model_intervals(*acc_b.context_tables(), resampler)
    ci_f = model_intervals(*acc_f.context_tables(), resampler)
    for key in ("ce_loss_clean", "ce_loss_spliced", "l0", "mse"):
        paired_width = delta[key][1] - delta[key][0]
        naive = math.hypot(ci_b[key][1] - ci_b[key][0], ci_f[key][1] - ci_f[key][0])
        assert paired_width < naive, (key, paired_width, naive)


def test_identical_models_give_a_zero_width_difference():
    n_ctx, ctx = 10, 8
    rng = np.random.default_rng(2)
    base = _model_tokens(rng, n_ctx, ctx, None, 0.0)
    included = np.ones((n_ctx, ctx), dtype=bool)
    acc_b = _accumulate(base, included, 4, 16, np.random.default_rng(9))
    acc_f = _accumulate(base, included, 3, 16, np.random.default_rng(9))
    delta, ratio = paired_model_intervals(acc_b.context_tables(), acc_f.context_tables(), Resampler(n_ctx, 200, seed=1))
    for key in MODEL_CI_KEYS:
        assert delta[key] == pytest.approx([0.0, 0.0], abs=1e-9), key
        assert ratio[key] == pytest.approx([1.0, 1.0], abs=1e-9), key


def test_paired_interval_refuses_different_contexts():
    _, _, _, acc_b, _ = _case(seed=1, n_ctx=6, ctx=8, noise=0.1, batch=3)
    _, _, _, acc_other, _ = _case(seed=1, n_ctx=7, ctx=8, noise=0.1, batch=3)
    with pytest.raises(ValueError, match="same contexts"):
        paired_model_intervals(acc_b.context_tables(), acc_other.context_tables(), Resampler(6, 10, seed=0))
    with pytest.raises(ValueError, match="draws 5 contexts"):
        paired_model_intervals(acc_b.context_tables(), acc_b.context_tables(), Resampler(5, 10, seed=0))


# ---------------------------------------------------------------------------- through the engine and the cache


def test_engine_fills_paired_intervals_and_a_cached_base_gives_the_same(tmp_path):
    """The engine's finetune result carries delta/ratio intervals; a base read back from the
    result cache (the base then runs only to the hook) gives the same intervals; the JSON form
    keeps them, and a report without them reads as empty maps."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers import random_tokens, tiny_pair, tiny_sae

    from pytest_sae_transfer.engine import EngineOptions, run_transfer
    from pytest_sae_transfer.report import FinetuneResult
    from pytest_sae_transfer.session.cache import ResultCache
    from pytest_sae_transfer.session.store import ResultStore

    base, ft = tiny_pair(seed=5, n_layers=2)
    sae = tiny_sae(hook_name="blocks.1.hook_resid_post")
    toks = random_tokens(12, 16, seed=5)
    options = EngineOptions(batch_size=4, n_bootstrap=200, special_token_ids=(0,))
    first = run_transfer(base, {"ft": ft}, sae, toks, options)
    result = first.report.finetune("ft")
    assert set(result.delta_ci95) == set(result.ratio_ci95) == set(MODEL_CI_KEYS)
    for key in ("ce_loss_delta", "l0", "explained_variance"):
        lo, hi = result.delta_ci95[key]
        assert lo <= result.metrics[key] - first.report.base.metrics[key] <= hi

    store = ResultStore(ResultCache(tmp_path / "cache"), {"test": 1}, [])
    store.put_base(first.base_state)
    cached = store.get_base()
    assert cached is not None and cached.context_tables is not None
    again = run_transfer(base, {"ft": ft}, sae, toks, EngineOptions(batch_size=3, n_bootstrap=200, special_token_ids=(0,)),
                         base_state=cached).report.finetune("ft")
    for key in MODEL_CI_KEYS:
        np.testing.assert_allclose(again.delta_ci95[key], result.delta_ci95[key], rtol=1e-6, atol=1e-9, err_msg=key)
        np.testing.assert_allclose(again.ratio_ci95[key], result.ratio_ci95[key], rtol=1e-6, atol=1e-9, err_msg=key)

    data = result.to_json()
    assert FinetuneResult.from_json(data).delta_ci95 == result.delta_ci95
    old = {k: v for k, v in data.items() if k not in ("delta_ci95", "ratio_ci95")}
    assert FinetuneResult.from_json(old).delta_ci95 == {} == FinetuneResult.from_json(old).ratio_ci95
