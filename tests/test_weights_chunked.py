"""The weight metrics without whole copies of the unembeddings: the final norm's weight folded
in chunk by chunk must give what the explicitly folded matrices give, the chunked float64
Frobenius norm what the whole float64 one gives, and the row-chunked paired feature sums
what one pass over all rows gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_sae_transfer.metrics import weights as W
from pytest_sae_transfer.metrics.paired import PairedAccumulator
from pytest_sae_transfer.metrics.promoted import promoted_tokens
from pytest_sae_transfer.metrics.weights import (
    Unembedding,
    folded_unembed,
    frobenius_ratio,
    logit_similarity,
    unembedding,
)

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _case(seed: int, d_sae: int, d_model: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_model, generator=g)
    Wb = torch.randn(d_model, vocab, generator=g)
    Wf = Wb + 0.4 * torch.randn(d_model, vocab, generator=g)
    sb = 0.2 + 2 * torch.rand(d_model, generator=g)  # a final-norm weight far from all ones
    sf = sb * (1 + 0.3 * torch.randn(d_model, generator=g))
    return W_dec, Wb, Wf, sb, sf


@PROPS
@given(seed=st.integers(0, 10_000), d_model=st.integers(2, 12), vocab=st.integers(3, 90),
       chunk=st.sampled_from([1, 7, 64, 1 << 25]), same_scale=st.booleans())
def test_folding_on_the_fly_equals_folded_copy(seed: int, d_model: int, vocab: int, chunk: int, same_scale: bool) -> None:
    W_dec, Wb, Wf, sb, sf = _case(seed, 9, d_model, vocab)
    if same_scale:
        sf = sb.clone()
    n_vocab = vocab - seed % 3 if vocab > 3 else vocab
    W._BASE_CACHE.clear()
    folded = logit_similarity(W_dec, sb.unsqueeze(1) * Wb, sf.unsqueeze(1) * Wf, n_vocab, chunk_elems=chunk)
    W._BASE_CACHE.clear()
    on_the_fly = logit_similarity(W_dec, Unembedding(Wb, sb), Unembedding(Wf, sf), n_vocab, chunk_elems=chunk)
    # the folded copy rounds each product to float32 first: agreement to float32 rounding
    np.testing.assert_allclose(on_the_fly.numpy(), folded.numpy(), rtol=0, atol=2e-5)
    # and a different scale gives a different answer (the scale is really used)
    W._BASE_CACHE.clear()
    unscaled = logit_similarity(W_dec, Wb, Unembedding(Wf, sf), n_vocab, chunk_elems=chunk)
    if d_model > 2:
        assert not np.allclose(unscaled.numpy(), folded.numpy(), atol=1e-4, equal_nan=True)


def test_same_unembedding_same_scale_is_one() -> None:
    W_dec, Wb, _, sb, _ = _case(3, 20, 8, 50)
    got = logit_similarity(W_dec, Unembedding(Wb, sb), Unembedding(Wb.clone(), sb.clone()), 50)
    np.testing.assert_allclose(got.numpy(), 1.0, rtol=0, atol=1e-12)


def test_base_cache_sees_a_changed_scale() -> None:
    W_dec, Wb, Wf, sb, sf = _case(4, 15, 6, 40)
    W._BASE_CACHE.clear()
    first = logit_similarity(W_dec, Unembedding(Wb, sb), Unembedding(Wf, sf), 40)
    sb.mul_(torch.linspace(0.5, 2.0, 6))  # the same tensor, changed in place
    again = logit_similarity(W_dec, Unembedding(Wb, sb), Unembedding(Wf, sf), 40)
    W._BASE_CACHE.clear()
    ref = logit_similarity(W_dec, sb.unsqueeze(1) * Wb, sf.unsqueeze(1) * Wf, 40)
    assert not np.allclose(first.numpy(), again.numpy())
    np.testing.assert_allclose(again.numpy(), ref.numpy(), rtol=0, atol=2e-5)


@PROPS
@given(seed=st.integers(0, 10_000), d_model=st.integers(1, 10), vocab=st.integers(1, 70),
       chunk=st.integers(1, 200), scaled=st.booleans())
def test_chunked_frobenius_equals_whole_float64(seed: int, d_model: int, vocab: int, chunk: int, scaled: bool) -> None:
    _, Wb, Wf, sb, sf = _case(seed, 1, d_model, vocab)
    n = max(1, vocab - seed % 4)
    ub, uf = (Unembedding(Wb, sb), Unembedding(Wf, sf)) if scaled else (Unembedding(Wb), Unembedding(Wf))
    plain = float(uf.folded()[:, :n].double().norm() / ub.folded()[:, :n].double().norm())
    if scaled:  # the reference folds in float64, as the chunks do
        plain = float((sf.double().unsqueeze(1) * Wf.double())[:, :n].norm() / (sb.double().unsqueeze(1) * Wb.double())[:, :n].norm())
    got = frobenius_ratio(uf, ub, n, chunk_elems=chunk)
    assert got == pytest.approx(plain, rel=1e-13)
    if not scaled:
        assert frobenius_ratio(Wf[:, :n], Wb[:, :n]) == pytest.approx(plain, rel=1e-13)


def test_unembedding_of_an_unfolded_model() -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=50, act_fn="gelu",
                                  normalization_type="LN", seed=0)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        model.ln_final.w.copy_(0.5 + torch.rand(16, generator=torch.Generator().manual_seed(1)))
    u = unembedding(model)
    assert u.scale is not None and u.W.data_ptr() == model.W_U.data_ptr()  # a view: no copy
    torch.testing.assert_close(u.folded(), model.ln_final.w.detach().unsqueeze(1) * model.W_U.detach())
    torch.testing.assert_close(folded_unembed(model), u.folded())
    W_dec = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))
    ids = [0, 3, 11]
    whole = promoted_tokens(W_dec, u.folded(), ids)
    scaled = promoted_tokens(W_dec, u.W, ids, scale=u.scale)
    for i in ids:
        assert [t for t, _ in scaled[i]] == [t for t, _ in whole[i]]
        np.testing.assert_allclose([v for _, v in scaled[i]], [v for _, v in whole[i]], rtol=1e-5, atol=1e-6)
    # a bfloat16 unembedding is converted block by block: the same tokens as a whole float32 copy
    bf = u.W.to(torch.bfloat16)
    blocks = promoted_tokens(W_dec, bf, ids, chunk_elems=40, scale=u.scale)
    ref = promoted_tokens(W_dec, bf.float(), ids, scale=u.scale.to(torch.bfloat16).float())
    assert blocks == ref


@PROPS
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), T=st.integers(1, 6), d_sae=st.integers(1, 9),
       chunk=st.integers(1, 60))
def test_paired_feature_sums_chunked_equal_one_pass(seed: int, B: int, T: int, d_sae: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(seed)
    fa = torch.relu(torch.randn(B, T, d_sae, generator=g))
    fb = torch.relu(fa + 0.3 * torch.randn(B, T, d_sae, generator=g))
    x = torch.randn(B, T, 4, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    one = PairedAccumulator(d_sae, T, chunk_elems=1 << 30).measure(x, x + 0.1, fa, fb, mask)
    many = PairedAccumulator(d_sae, T, chunk_elems=chunk).measure(x, x + 0.1, fa, fb, mask)
    assert one.n == many.n == float(mask.sum())
    torch.testing.assert_close(many.sums, one.sums, rtol=1e-12, atol=1e-12)
    a, b = fa[mask].double(), fb[mask].double()
    torch.testing.assert_close(one.sums[4], (a * b).sum(0), rtol=1e-6, atol=1e-6)
