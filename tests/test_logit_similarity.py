"""logit_similarity from d_model-sized Gram matrices against a brute-force Pearson.

The reference forms every feature's full logit-weight rows u = d·Wb and v = d·Wf
(float64, [d_sae, n_vocab]) and correlates them with scipy/numpy, as the metric is
defined; the implementation never forms those rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from pytest_sae_transfer.metrics import weights as W
from pytest_sae_transfer.metrics.weights import logit_similarity


def brute(W_dec: torch.Tensor, Wb: torch.Tensor, Wf: torch.Tensor, n_vocab: int) -> np.ndarray:
    """scipy Pearson of the full float64 logit-weight rows; NaN where a row is constant."""
    D = W_dec.double().numpy()
    U = D @ Wb[:, :n_vocab].double().numpy()
    V = D @ Wf[:, :n_vocab].double().numpy()
    out = np.full(D.shape[0], np.nan)
    for i in range(D.shape[0]):
        if np.ptp(U[i]) > 0 and np.ptp(V[i]) > 0:
            out[i] = stats.pearsonr(U[i], V[i]).statistic
    return out


def exact_centred_brute(W_dec: torch.Tensor, Wb: torch.Tensor, Wf: torch.Tensor) -> np.ndarray:
    """Pearson from exactly centred unembeddings (math.fsum means): the reference for inputs
    whose spread over the vocabulary is tiny next to their mean, where forming d·W first
    and centring afterwards would itself lose the digits being compared."""

    def centred(M: torch.Tensor) -> np.ndarray:
        a = M.double().numpy()
        means = np.array([math.fsum(row) / a.shape[1] for row in a])
        return a - means[:, None]

    D = W_dec.double().numpy()
    U, V = D @ centred(Wb), D @ centred(Wf)
    return (U * V).sum(1) / np.sqrt((U * U).sum(1) * (V * V).sum(1))


def random_case(seed: int, d_sae: int, d_model: int, n_vocab: int, rel_noise: float = 0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_model, generator=g, dtype=dtype)
    Wb = torch.randn(d_model, n_vocab, generator=g, dtype=dtype)
    Wf = Wb + rel_noise * torch.randn(d_model, n_vocab, generator=g, dtype=dtype)
    return W_dec, Wb, Wf


def test_matches_brute_force_pearson() -> None:
    W_dec, Wb, Wf = random_case(0, d_sae=40, d_model=16, n_vocab=300)
    got = logit_similarity(W_dec, Wb, Wf, 300)
    assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == (40,)
    np.testing.assert_allclose(got.numpy(), brute(W_dec, Wb, Wf, 300), rtol=0, atol=1e-12)


def test_chunking_does_not_change_the_result() -> None:
    W_dec, Wb, Wf = random_case(1, d_sae=33, d_model=8, n_vocab=257)
    ref = logit_similarity(W_dec, Wb, Wf, 257)
    for chunk in (1, 7, 64, 1000, 1 << 30):
        W._BASE_CACHE.clear()
        np.testing.assert_allclose(logit_similarity(W_dec, Wb, Wf, 257, chunk_elems=chunk).numpy(), ref.numpy(), rtol=0, atol=1e-13)


def test_shared_vocabulary_prefix() -> None:
    """Different vocabulary sizes: only the first n_vocab tokens count."""
    W_dec, Wb, _ = random_case(2, d_sae=12, d_model=6, n_vocab=120)
    g = torch.Generator().manual_seed(3)
    Wf = torch.cat([Wb[:, :100] + 0.2 * torch.randn(6, 100, generator=g), 50 * torch.randn(6, 20, generator=g)], dim=1)
    got = logit_similarity(W_dec, Wb[:, :110], Wf, 100)
    np.testing.assert_allclose(got.numpy(), brute(W_dec, Wb, Wf, 100), rtol=0, atol=1e-12)


def test_identical_unembeddings_give_exactly_one() -> None:
    W_dec, Wb, _ = random_case(4, d_sae=50, d_model=10, n_vocab=200)
    np.testing.assert_allclose(logit_similarity(W_dec, Wb, Wb.clone(), 200).numpy(), 1.0, rtol=0, atol=1e-12)


def test_sign_flip_gives_minus_one_and_scale_is_ignored() -> None:
    W_dec, Wb, _ = random_case(5, d_sae=20, d_model=10, n_vocab=200)
    np.testing.assert_allclose(logit_similarity(W_dec, Wb, -3.0 * Wb + 7.0, 200).numpy(), -1.0, rtol=0, atol=1e-12)


def test_near_degenerate_unembedding_keeps_its_digits() -> None:
    """Logit weights whose spread over the vocabulary is 1e-7 of their mean.

    Σu² and (Σu)²/n then agree to ~14 digits, so n·Σu² − (Σu)² in float64 keeps
    almost nothing; centring the unembedding first keeps every digit. The float32
    logit-weight path the metric used before cannot represent the spread at all.
    """
    g = torch.Generator().manual_seed(6)
    d_model, n_vocab, d_sae = 12, 4000, 30
    offset = 1.0 + torch.rand(d_model, 1, generator=g, dtype=torch.float64)
    Wb = offset + 1e-7 * torch.randn(d_model, n_vocab, generator=g, dtype=torch.float64)
    Wf = Wb + 3e-8 * torch.randn(d_model, n_vocab, generator=g, dtype=torch.float64)
    W_dec = torch.randn(d_sae, d_model, generator=g)
    got = logit_similarity(W_dec, Wb, Wf, n_vocab).numpy()
    ref = exact_centred_brute(W_dec, Wb, Wf)
    assert np.all(np.isfinite(got)) and 0.3 < np.median(ref) < 0.999  # a real correlation, not ±1
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)

    # the naive raw-sum formula in float64 loses the answer
    D = W_dec.double().numpy()
    U, V = D @ Wb.double().numpy(), D @ Wf.double().numpy()
    n = n_vocab
    naive = (n * (U * V).sum(1) - U.sum(1) * V.sum(1)) / np.sqrt(
        (n * (U * U).sum(1) - U.sum(1) ** 2) * (n * (V * V).sum(1) - V.sum(1) ** 2)
    )
    assert np.nanmax(np.abs(naive - ref)) > 1e-2
    # so does forming the logit weights in float32 (the previous implementation)
    U32, V32 = (W_dec @ Wb.float()).double(), (W_dec @ Wf.float()).double()
    U32, V32 = U32 - U32.mean(1, keepdim=True), V32 - V32.mean(1, keepdim=True)
    old = ((U32 * V32).sum(1) / torch.sqrt((U32 * U32).sum(1) * (V32 * V32).sum(1))).numpy()
    assert np.max(np.abs(old - ref)) > 0.1


def test_constant_logit_weights_are_undefined() -> None:
    """NaN where a model's logit weights for a feature do not vary over the vocabulary."""
    W_dec, Wb, Wf = random_case(7, d_sae=6, d_model=5, n_vocab=64)
    # 1. a decoder row of zeros
    W_dec[0] = 0.0
    # 2. a finetune unembedding whose row 0 is constant, and a feature that reads only row 0
    Wf[0] = 0.37
    W_dec[1] = 0.0
    W_dec[1, 0] = 2.0
    # 3. two identical base rows, and a feature that reads their difference (d·Wb_v = 0 for every v)
    Wb[2] = Wb[3]
    W_dec[2] = 0.0
    W_dec[2, 2], W_dec[2, 3] = 1.5, -1.5
    got = logit_similarity(W_dec, Wb, Wf, 64).numpy()
    assert np.isnan(got[:3]).all(), got
    ref = brute(W_dec, Wb, Wf, 64)
    assert np.isnan(ref[:3]).all()
    np.testing.assert_allclose(got[3:], ref[3:], rtol=0, atol=1e-12)
    # a whole unembedding constant over the vocabulary: every feature undefined
    const = torch.full((5, 64), -1.25)
    assert np.isnan(logit_similarity(W_dec, Wb, const, 64).numpy()).all()
    assert np.isnan(logit_similarity(W_dec, torch.zeros(5, 64), Wf, 64).numpy()).all()


def test_base_gram_is_reused_only_for_the_same_unmodified_tensor() -> None:
    W_dec, Wb, Wf = random_case(8, d_sae=10, d_model=6, n_vocab=90)
    W._BASE_CACHE.clear()
    first = logit_similarity(W_dec, Wb, Wf, 90)
    assert len(W._BASE_CACHE) == 1
    again = logit_similarity(W_dec, Wb, Wf + 0.1, 90)  # a second finetune, same base tensor
    np.testing.assert_allclose(again.numpy(), brute(W_dec, Wb, Wf + 0.1, 90), rtol=0, atol=1e-12)
    Wb.add_(0.5 * torch.randn(Wb.shape, generator=torch.Generator().manual_seed(9)))  # in place: the cached Gram matrix is stale
    changed = logit_similarity(W_dec, Wb, Wf, 90)
    np.testing.assert_allclose(changed.numpy(), brute(W_dec, Wb, Wf, 90), rtol=0, atol=1e-12)
    assert not np.allclose(changed.numpy(), first.numpy())
    del Wb, changed
    import gc

    gc.collect()
    assert W._BASE_CACHE == []  # the base tensor is gone, and so is its Gram matrix


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    d_sae=st.integers(1, 12),
    d_model=st.integers(1, 10),
    n_vocab=st.integers(2, 80),
    log_scale=st.floats(-3.0, 3.0),
    log_offset=st.floats(-3.0, 2.0),
    rel_noise=st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0]),
    chunk_elems=st.sampled_from([1, 5, 64, 1 << 25]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_matches_brute_force(seed, d_sae, d_model, n_vocab, log_scale, log_offset, rel_noise, chunk_elems, dtype) -> None:
    """Any shapes, scales and per-row offsets over the vocabulary (up to 100x the spread)."""
    g = torch.Generator().manual_seed(seed)
    scale, offset = 10.0**log_scale, 10.0**log_offset
    W_dec = torch.randn(d_sae, d_model, generator=g, dtype=dtype)
    row_mean = offset * scale * torch.randn(d_model, 1, generator=g, dtype=dtype)
    Wb = row_mean + scale * torch.randn(d_model, n_vocab, generator=g, dtype=dtype)
    Wf = Wb + rel_noise * scale * torch.randn(d_model, n_vocab, generator=g, dtype=dtype)
    W._BASE_CACHE.clear()
    got = logit_similarity(W_dec, Wb, Wf, n_vocab, chunk_elems=chunk_elems).numpy()
    ref = exact_centred_brute(W_dec, Wb, Wf)
    # reference undefined only for a zero decoder row, which random normals never give
    assert np.isfinite(ref).all()
    assert np.array_equal(np.isnan(got), np.isnan(ref)), (got, ref)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    assert np.all(np.abs(got) <= 1.0)
    if rel_noise == 0.0:
        np.testing.assert_allclose(got, 1.0, rtol=0, atol=1e-12)
    # and the plain scipy Pearson of the full rows agrees wherever its own float64 centring is exact enough
    if offset <= 1.0:
        np.testing.assert_allclose(got, brute(W_dec, Wb, Wf, n_vocab), rtol=0, atol=1e-8)


@pytest.mark.parametrize("d_model,n_vocab", [(3, 2), (4, 3)])
def test_tiny_vocabularies(d_model: int, n_vocab: int) -> None:
    """Two tokens: any two distinct logit rows correlate at exactly ±1."""
    W_dec, Wb, Wf = random_case(9, d_sae=7, d_model=d_model, n_vocab=n_vocab)
    np.testing.assert_allclose(logit_similarity(W_dec, Wb, Wf, n_vocab).numpy(), brute(W_dec, Wb, Wf, n_vocab), rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inputs_are_left_untouched(dtype) -> None:
    W_dec, Wb, Wf = random_case(10, d_sae=9, d_model=6, n_vocab=70, dtype=dtype)
    copies = [t.clone() for t in (W_dec, Wb, Wf)]
    W._BASE_CACHE.clear()
    got = logit_similarity(W_dec, Wb, Wf, 70, chunk_elems=100)
    for before, after in zip(copies, (W_dec, Wb, Wf)):
        assert torch.equal(before, after)
    np.testing.assert_allclose(got.numpy(), brute(W_dec, Wb, Wf, 70), rtol=0, atol=1e-10)
