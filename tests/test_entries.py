"""Features read as their nonzero entries give the dense path's numbers.

For sparse SAEs the engine lists each batch's nonzero features once and takes the
per-model statistics, the top-k candidates and the paired sums from that list. Checked
here: the list against numpy, each consumer against its dense path on random batches
(negative values, -0.0, NaN tokens, excluded tokens, ties), and a whole engine run with the
entries against the same run kept dense.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_tokens, tiny_pair, tiny_sae
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_properties import close_results, metrics_part, vectors_close

from pytest_sae_transfer.engine import EngineOptions, run_transfer_many
from pytest_sae_transfer.metrics import entries as entries_module
from pytest_sae_transfer.metrics.entries import DensityGate, feature_entries
from pytest_sae_transfer.metrics.model import ModelAccumulator, ModelBatch, rows_finite
from pytest_sae_transfer.metrics.paired import PairedAccumulator
from pytest_sae_transfer.metrics.topk import TopKAccumulator

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@st.composite
def batches(draw) -> dict[str, Any]:
    """Two models' [B, T, D] features and activations on the same tokens: sparse or not,
    with negatives, signed zeros, ties, NaN tokens and excluded tokens."""
    B, T, D, d_in = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 4))
    alphabet = st.sampled_from([0.0, 0.0, 0.0, -0.0, -1.5, 0.25, 1.0, 1.0, 3.0, 1e-6])
    n = B * T * D
    fa = np.array(draw(st.lists(alphabet, min_size=n, max_size=n)), dtype=np.float32).reshape(B, T, D)
    fb = np.array(draw(st.lists(alphabet, min_size=n, max_size=n)), dtype=np.float32).reshape(B, T, D)
    included = np.array(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T)), dtype=bool).reshape(B, T)
    for f in (fa, fb):  # a token whose features are not finite: counted, never summed
        for bt in draw(st.lists(st.integers(0, B * T - 1), max_size=2)):
            f.reshape(B * T, D)[bt, draw(st.integers(0, D - 1))] = draw(st.sampled_from([np.nan, np.inf]))
    gen = np.random.default_rng(draw(st.integers(0, 99)))
    xa = gen.normal(size=(B, T, d_in)).astype(np.float32)
    xb = (xa + 0.3 * gen.normal(size=(B, T, d_in))).astype(np.float32)
    return {"fa": fa, "fb": fb, "included": included, "xa": xa, "xb": xb}


def model_batch(feats: np.ndarray, x: np.ndarray, included: np.ndarray, sparse: bool) -> ModelBatch:
    x_t = torch.as_tensor(x)
    return ModelBatch(x=x_t, x_hat=x_t * 0.9, feats=torch.as_tensor(feats), included=torch.as_tensor(included),
                      outlier=torch.zeros(included.shape, dtype=torch.bool), sparse=sparse)


@PROPS
@given(batches())
def test_entries_are_the_nonzero_features_of_the_kept_tokens_in_row_major_order(case):
    feats, keep = case["fa"], case["included"]
    B, T, D = feats.shape
    e = feature_entries(torch.as_tensor(feats), torch.as_tensor(keep))
    flat = feats.reshape(B * T, D)
    rows, cols = np.nonzero((flat != 0) & keep.reshape(-1, 1))
    np.testing.assert_array_equal(e.rows.numpy(), rows)
    np.testing.assert_array_equal(e.cols.numpy(), cols)
    np.testing.assert_array_equal(e.values.numpy(), flat[rows, cols])
    np.testing.assert_array_equal(e.flat().numpy(), rows * D + cols)
    sub = keep.reshape(-1) & (np.arange(B * T) % 2 == 0)
    r = e.restricted(torch.as_tensor(sub))
    np.testing.assert_array_equal(r.rows.numpy(), rows[sub[rows]])
    np.testing.assert_array_equal(r.values.numpy(), flat[rows, cols][sub[rows]])


@PROPS
@given(batches())
def test_model_statistics_from_entries_equal_the_dense_ones(case):
    acc = ModelAccumulator(case["xa"].shape[2], case["fa"].shape[2])
    dense = acc.measure(model_batch(case["fa"], case["xa"], case["included"], sparse=False))
    sparse = acc.measure(model_batch(case["fa"], case["xa"], case["included"], sparse=True))
    # counts are integers and the histogram sees the same values in the same order: exact
    assert torch.equal(dense.stats, sparse.stats)
    assert torch.equal(dense.fire, sparse.fire)
    assert torch.equal(dense.act_hist, sparse.act_hist)
    assert dense.zero_acts == sparse.zero_acts
    assert torch.equal(dense.evaluated, sparse.evaluated)


@PROPS
@given(batches(), st.integers(1, 4), st.sampled_from([0, 1, 2]))
def test_topk_candidates_from_entries_equal_the_dense_ones(case, k, offset):
    fa = torch.as_tensor(case["fa"])
    b = model_batch(case["fa"], case["xa"], case["included"], sparse=True)
    evaluated = b.included & b.finite_mask()
    B = fa.shape[0]
    # (where the table was filled, where the batch goes): after it (strict comparison, ties
    # to the table's earlier tokens), then before it (ties to the batch's earlier tokens)
    for fill_at, at in ((0, B + offset), (B + 5, offset)):
        acc_d, acc_s = TopKAccumulator(fa.shape[2], k), TopKAccumulator(fa.shape[2], k)
        for acc in (acc_d, acc_s):  # a table partly filled before the batch
            acc.update(fa.flip(0), evaluated.flip(0), fill_at)
        dense = acc_d.candidates(fa, evaluated, at)
        sparse = acc_s.candidates_from_entries(b.entries(), at, fa.shape[1])
        for key in ("cols", "values", "gidx"):
            assert torch.equal(getattr(dense, key), getattr(sparse, key)), key
        assert (dense.end, dense.context_size) == (sparse.end, sparse.context_size)
        acc_d.merge(dense)
        acc_s.merge(sparse)
        for x, y in zip(acc_d.result().to_arrays().values(), acc_s.result().to_arrays().values()):
            np.testing.assert_array_equal(x, y)


@PROPS
@given(batches())
def test_paired_sums_from_entries_equal_the_dense_ones(case):
    a = model_batch(case["fa"], case["xa"], case["included"], sparse=True)
    b = model_batch(case["fb"], case["xb"], case["included"], sparse=True)
    mask = a.included & a.finite_mask() & b.finite_mask()
    pair = PairedAccumulator(case["fa"].shape[2], case["fa"].shape[1])
    dense = pair.measure(a.x, b.x, a.feats, b.feats, mask)
    sparse = pair.measure(a.x, b.x, a.feats, b.feats, mask, (a.entries(), b.entries()))
    assert dense.n == sparse.n
    # the same float64 terms, summed in another order
    torch.testing.assert_close(sparse.sums, dense.sums, rtol=1e-12, atol=1e-12)
    for key in ("pos", "context", "cos_hist", "euc_hist"):
        assert torch.equal(getattr(dense, key), getattr(sparse, key)), key


@PROPS
@given(st.lists(st.sampled_from([0.0, 1.0, -2.5, 3e38, -3e38, np.nan, np.inf, -np.inf]), min_size=1, max_size=40),
       st.integers(1, 5))
def test_rows_finite_is_isfinite_all_even_where_the_row_sum_overflows(values, width):
    n = len(values) // width * width or width
    arr = torch.tensor((values * width)[:n], dtype=torch.float32).reshape(-1, width)
    assert torch.equal(rows_finite(arr), torch.isfinite(arr).all(-1))


def test_the_density_gate_starts_dense_and_stays_dense_once_an_sae_is_dense():
    gate = DensityGate(max_density=0.25)
    assert not gate.sparse("a")  # nothing seen yet
    gate.observe("a", 10, 100)
    assert gate.sparse("a")
    gate.observe("a", 30, 100)  # one model's batch above the bound
    gate.observe("a", 1, 100)
    assert not gate.sparse("a")
    gate.observe("b", 0, 0)  # no evaluated token: density 0
    assert gate.sparse("b")


@pytest.mark.parametrize("mode", ["fused", "sequential"])
def test_an_engine_run_on_entries_equals_the_same_run_kept_dense(mode, monkeypatch, tmp_path):
    base, ft = tiny_pair(seed=3, d_model=16, n_layers=2, d_vocab=64, n_ctx=16, noise=0.1)
    saes = {"topk": tiny_sae(d_in=16, d_sae=48, hook_name="blocks.0.hook_resid_post", seed=1, architecture="topk", k=4),
            "standard": tiny_sae(d_in=16, d_sae=40, hook_name="blocks.1.hook_resid_post", seed=2)}
    toks = random_tokens(9, 16, d_vocab=64, seed=3)
    options = EngineOptions(special_token_ids=(0, 1, 2), batch_size=2, n_bootstrap=50, seed=0,
                            sequential=mode == "sequential", spill_dir=str(tmp_path))
    made: list[int] = []
    real = entries_module.feature_entries

    def counting(feats, keep):
        made.append(1)
        return real(feats, keep)

    runs = {}
    for bound in (1.0, -1.0):  # every SAE on entries after its first batch; never
        made.clear()
        monkeypatch.setattr(entries_module, "SPARSE_MAX_DENSITY", bound)
        monkeypatch.setattr("pytest_sae_transfer.metrics.model.feature_entries", counting)
        monkeypatch.setattr("pytest_sae_transfer.engine.sweep.feature_entries", counting)
        runs[bound] = run_transfer_many(base, {"ft": ft}, saes, toks, options).outputs
        # 5 batches a sweep, the first read densely, then entries per (model, SAE) and batch;
        # sequential: the base's sweep, then the finetune's (its first batch dense again: the
        # gate had seen only the base)
        expected = 2 * 2 * 4 if mode == "fused" else 2 * 4 + 2 * 2 * 4
        assert len(made) == (expected if bound > 0 else 0)
    for key in saes:
        sparse, dense = runs[1.0][key].report, runs[-1.0][key].report
        close_results(metrics_part(dense), metrics_part(sparse), rel=1e-9, abs_=1e-12)
        for name in dense.features.vectors:
            vectors_close(dense.features.vectors[name], sparse.features.vectors[name], rel=1e-9, abs_=1e-12)
        assert dense.features.topk and set(dense.features.topk) == set(sparse.features.topk)
        for model, parts in dense.features.topk.items():  # the top-k tables: exactly
            for part, arr in parts.items():
                np.testing.assert_array_equal(np.asarray(arr), np.asarray(sparse.features.topk[model][part]), err_msg=f"{model} {part}")
