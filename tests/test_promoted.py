"""Promoted tokens against a brute-force sort of the full [features x vocab] logit weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_sae_transfer.metrics.promoted import promoted_tokens
from pytest_sae_transfer.metrics.weights import folded_unembed

PROPS = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def brute_force(W_dec: np.ndarray, W_U: np.ndarray, ids, n):
    logits = W_dec.astype(np.float32) @ W_U.astype(np.float32)
    out = {}
    for i in sorted(set(ids)):
        row = logits[i]
        order = sorted(range(row.size), key=lambda t: (-row[t], t))[:n]
        out[i] = [(t, float(row[t])) for t in order]
    return out


@PROPS
@given(
    st.integers(1, 9), st.integers(1, 4), st.integers(1, 12), st.integers(1, 14),
    st.booleans(), st.integers(0, 10_000), st.sampled_from([1, 5, 64, 1 << 24]),
)
def test_matches_brute_force(d_sae, d_model, d_vocab, n, ties, seed, chunk):
    rng = np.random.default_rng(seed)
    if ties:  # small integers: many exactly equal logit weights
        W_dec = rng.integers(-1, 2, (d_sae, d_model)).astype(np.float32)
        W_U = rng.integers(-1, 2, (d_model, d_vocab)).astype(np.float32)
    else:
        W_dec = rng.standard_normal((d_sae, d_model)).astype(np.float32)
        W_U = rng.standard_normal((d_model, d_vocab)).astype(np.float32)
    ids = list(rng.integers(0, d_sae, size=rng.integers(1, d_sae + 2)))
    got = promoted_tokens(torch.from_numpy(W_dec), torch.from_numpy(W_U), ids, n=n, chunk_elems=chunk)
    want = brute_force(W_dec, W_U, ids, min(n, d_vocab))
    assert list(got) == list(want)
    for i in want:
        assert [t for t, _ in got[i]] == [t for t, _ in want[i]]
        np.testing.assert_allclose([v for _, v in got[i]], [v for _, v in want[i]], rtol=1e-5, atol=1e-6)


def test_zoo_unembedding_with_the_final_norm_folded():
    """On a real model: the folded W_U differs from the raw one, and the result follows the folded one."""
    from pytest_sae_transfer import zoo

    model = zoo.load_model("toy-base")
    sae = zoo.load_sae("toy-res")
    W_U = folded_unembed(model)
    assert not torch.allclose(W_U, model.W_U)
    ids = [3, 311, 1000]
    got = promoted_tokens(sae.W_dec, W_U, ids, n=5)
    want = brute_force(sae.W_dec.detach().numpy(), W_U.numpy(), ids, 5)
    for i in ids:
        assert [t for t, _ in got[i]] == [t for t, _ in want[i]]


def test_nan_row_stays_visible_and_bad_ids_are_refused():
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("nan"), 0.0]])
    W_U = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = promoted_tokens(W_dec, W_U, [2, 1, 0], n=2)
    assert all(t == j and np.isnan(v) for j, (t, v) in enumerate(got[2]))  # a broken decoder row shows as NaN
    assert got[1] == [(0, 0.0), (1, 0.0)]
    assert got[0] == [(2, 3.0), (1, 2.0)]
    with pytest.raises(IndexError, match=r"\[3\] are outside \[0, 3\)"):
        promoted_tokens(W_dec, W_U, [0, 3])
    with pytest.raises(ValueError, match="d_model"):
        promoted_tokens(W_dec, W_U[:1], [0])
