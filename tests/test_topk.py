"""The streaming top-k table against a brute-force [tokens x d_sae] computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_sae_transfer.metrics.topk import TopKAccumulator, TopKTable

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def brute_force(feats: np.ndarray, included: np.ndarray, k: int) -> TopKTable:
    """Every (feature, token) pair at once: sort each feature's positive included values by
    (value descending, global token index ascending) and keep the first k."""
    C, T, D = feats.shape
    flat = feats.reshape(C * T, D).astype(np.float32)
    inc = included.reshape(C * T)
    values = np.zeros((D, k), dtype=np.float32)
    contexts = np.full((D, k), -1, dtype=np.int64)
    positions = np.full((D, k), -1, dtype=np.int64)
    for f in range(D):
        col = flat[:, f]
        tokens = [g for g in range(C * T) if inc[g] and col[g] > 0]
        tokens.sort(key=lambda g: (-float(col[g]), g))
        for j, g in enumerate(tokens[:k]):
            values[f, j] = col[g]
            contexts[f, j] = g // T
            positions[f, j] = g % T
    return TopKTable(values, contexts, positions)


def streamed(feats: np.ndarray, included: np.ndarray, k: int, cuts: list[int], dtype=torch.float32, chunk_elems=None) -> TopKTable:
    acc = TopKAccumulator(feats.shape[2], k, chunk_elems=chunk_elems)
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < feats.shape[0])), feats.shape[0]]
    for lo, hi in zip(bounds, bounds[1:]):
        acc.update(torch.as_tensor(feats[lo:hi]).to(dtype), torch.as_tensor(included[lo:hi]), lo)
    return acc.result()


def assert_same(a: TopKTable, b: TopKTable) -> None:
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.contexts, b.contexts)
    np.testing.assert_array_equal(a.positions, b.positions)


@st.composite
def runs(draw):
    C = draw(st.integers(1, 6))
    T = draw(st.integers(1, 5))
    D = draw(st.integers(1, 7))
    k = draw(st.integers(1, 6))
    # A small value alphabet makes exact ties common; zeros and negatives never count;
    # a few features stay silent or fire fewer than k times.
    tie_heavy = draw(st.booleans())
    if tie_heavy:
        alphabet = st.sampled_from([0.0, 0.0, -1.0, 0.5, 1.0, 1.0, 2.0, 3.0])
    else:
        alphabet = st.floats(-2.0, 4.0, allow_nan=False, width=32)
    feats = np.array(draw(st.lists(alphabet, min_size=C * T * D, max_size=C * T * D)), dtype=np.float32).reshape(C, T, D)
    silent = draw(st.lists(st.integers(0, D - 1), max_size=2))
    feats[:, :, silent] = 0.0
    included = np.array(draw(st.lists(st.booleans(), min_size=C * T, max_size=C * T)), dtype=bool).reshape(C, T)
    cuts = draw(st.lists(st.integers(1, max(1, C - 1)), max_size=4))
    chunk = draw(st.sampled_from([None, 1, 3, 8, 13]))  # entries compared per chunk
    return feats, included, k, cuts, chunk


@PROPS
@given(runs())
def test_matches_brute_force_for_any_batch_split(run):
    feats, included, k, cuts, chunk = run
    expected = brute_force(feats, included, k)
    assert_same(streamed(feats, included, k, cuts, chunk_elems=chunk), expected)
    assert_same(streamed(feats, included, k, []), expected)  # one batch
    assert_same(streamed(feats, included, k, list(range(1, feats.shape[0]))), expected)  # one context a batch


@PROPS
@given(runs(), st.randoms(use_true_random=False))
def test_batch_order_does_not_matter(run, rnd):
    """Batches fed out of order (as a resumed or parallel run could) give the same table."""
    feats, included, k, cuts, chunk = run
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < feats.shape[0])), feats.shape[0]]
    pieces = list(zip(bounds, bounds[1:]))
    rnd.shuffle(pieces)
    acc = TopKAccumulator(feats.shape[2], k, chunk_elems=chunk)
    for lo, hi in pieces:
        acc.update(torch.from_numpy(feats[lo:hi]), torch.from_numpy(included[lo:hi]), lo)
    assert_same(acc.result(), brute_force(feats, included, k))


def test_all_equal_values_keep_the_earliest_tokens():
    """torch.topk would return an arbitrary subset here; the table must keep the first k tokens."""
    feats = np.ones((8, 16, 3), dtype=np.float32)
    included = np.ones((8, 16), dtype=bool)
    for cuts in ([], [1, 2, 3, 4, 5, 6, 7], [3], [5, 6]):
        table = streamed(feats, included, 10, cuts)
        np.testing.assert_array_equal(table.contexts, np.zeros((3, 10)))
        np.testing.assert_array_equal(table.positions, np.tile(np.arange(10), (3, 1)))


def test_rows_report_fewer_than_k_and_unused_slots():
    feats = np.zeros((2, 4, 3), dtype=np.float32)
    feats[1, 2, 0] = 5.0
    feats[0, 3, 0] = 5.0
    feats[0, 1, 1] = -3.0  # negative: never an activation
    feats[1, 0, 2] = 7.0   # on an excluded token
    included = np.ones((2, 4), dtype=bool)
    included[1, 0] = False
    table = streamed(feats, included, 4, [1])
    assert table.counts().tolist() == [2, 0, 0]
    assert table.entries(0) == [(5.0, 0, 3), (5.0, 1, 2)]
    assert table.entries(1) == [] and table.entries(2) == []
    assert table.contexts[0, 2:].tolist() == [-1, -1] and table.values[0, 2:].tolist() == [0.0, 0.0]
    with pytest.raises(IndexError):
        table.entries(3)


def test_nan_and_inf():
    """NaN never enters (such tokens are counted as non-finite elsewhere); +inf is the top value."""
    feats = np.zeros((1, 3, 1), dtype=np.float32)
    feats[0, :, 0] = [np.nan, np.inf, 1.0]
    table = streamed(feats, np.ones((1, 3), dtype=bool), 3, [])
    assert table.entries(0) == [(float("inf"), 0, 1), (1.0, 0, 2)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_rank_their_float32_values(dtype):
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(5, 6, 9, generator=gen).to(dtype)
    included = torch.rand(5, 6, generator=gen) > 0.3
    as32 = feats.float().numpy()
    expected = brute_force(as32, included.numpy(), 4)
    for cuts in ([], [2], [1, 3, 4]):
        source = feats.numpy() if dtype == torch.float64 else as32  # bf16/fp16 values are exact in float32
        assert_same(streamed(source, included.numpy(), 4, cuts, dtype), expected)


def test_memory_is_flat_in_the_number_of_tokens():
    acc = TopKAccumulator(64, 5)
    gen = torch.Generator().manual_seed(0)
    for i in range(20):
        acc.update(torch.rand(4, 8, 64, generator=gen), torch.ones(4, 8, dtype=torch.bool), 4 * i)
        assert acc._values.shape == (64, 5) and acc._gidx.shape == (64, 5)
    table = acc.result()
    assert table.counts().tolist() == [5] * 64
    assert (np.diff(table.values, axis=1) <= 0).all()


def test_bad_inputs_are_refused():
    acc = TopKAccumulator(4, 2)
    with pytest.raises(ValueError, match=r"\[B, T, 4\]"):
        acc.update(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="included"):
        acc.update(torch.zeros(1, 2, 4), torch.ones(2, 2, dtype=torch.bool), 0)
    acc.update(torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="context size changed"):
        acc.update(torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool), 1)
    with pytest.raises(ValueError):
        TopKAccumulator(4, 0)


def test_table_round_trips_through_arrays():
    feats = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    table = streamed(feats, np.ones((3, 4), dtype=bool), 3, [1])
    again = TopKTable.from_arrays(table.to_arrays())
    assert_same(table, again)
    with pytest.raises(ValueError, match="shape"):
        TopKTable.from_arrays({"values": table.values, "contexts": table.contexts[:, :2], "positions": table.positions})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(1)
    feats = (torch.rand(16, 32, 300, generator=gen) * 4).round() / 4  # many ties
    included = torch.rand(16, 32, generator=gen) > 0.1
    expected = brute_force(feats.numpy(), included.numpy(), 10)
    acc = TopKAccumulator(300, 10)
    for lo in range(0, 16, 3):
        acc.update(feats[lo : lo + 3].cuda(), included[lo : lo + 3].cuda(), lo)
    assert_same(acc.result(), expected)


def test_tables_round_trip_through_the_sidecar(tmp_path):
    from pytest_sae_transfer.report import FeatureArrays

    feats = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)
    tables = {"base": streamed(feats, np.ones((3, 4), dtype=bool), 3, []),
              "ft::odd name": streamed(feats * 2, np.ones((3, 4), dtype=bool), 3, [1])}
    arrays = FeatureArrays(vectors={"ft::odd name": {"density_base": np.ones(5)}},
                           topk={name: t.to_arrays() for name, t in tables.items()})
    arrays.save(tmp_path / "r.features.npz")
    back = FeatureArrays.load(tmp_path / "r.features.npz")
    assert set(back.topk) == set(tables) and set(back.vectors) == {"ft::odd name"}
    for name, table in tables.items():
        assert_same(TopKTable.from_arrays(back.topk[name]), table)
