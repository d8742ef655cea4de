"""``result.feature(i)`` and ``assert_feature_transfers`` on a hand-built report."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_sae_transfer import zoo
from pytest_sae_transfer.assertions import assert_feature_transfers
from pytest_sae_transfer.metrics.topk import TopKTable
from pytest_sae_transfer.report import FeatureArrays, FinetuneResult, ModelResult, PairResult, TransferReport
from pytest_sae_transfer.report.feature_section import build_features_section

D = 6


def _table(entries: dict[int, list[tuple[float, int, int]]], k: int = 3) -> TopKTable:
    values = np.zeros((D, k), np.float32)
    contexts = np.full((D, k), -1, np.int64)
    positions = np.full((D, k), -1, np.int64)
    for f, rows in entries.items():
        for j, (v, c, p) in enumerate(rows):
            values[f, j], contexts[f, j], positions[f, j] = v, c, p
    return TopKTable(values, contexts, positions)


@pytest.fixture(scope="module")
def tok():
    return zoo.load_tokenizer()


def _report(tok, with_vectors: bool = True, with_section: bool = True) -> TransferReport:
    code = "def parse(self, line):\n    return [x for x in line]\nclass Foo:\n    pass\n\ndef other(a, b):\n    return a + b"
    text_ids = tok(code, add_special_tokens=False)["input_ids"]  # 37 tokens
    tokens = np.array([[tok.bos_token_id] + text_ids[:15], [tok.bos_token_id] + text_ids[15:30]])
    def_pos = 1  # 'def' right after BOS
    vectors = {
        "density_base": np.array([1e-3, 2e-3, 1e-3, 0.0, 1e-3, 1e-3]),
        "density_finetune": np.array([1e-3, 2e-3, 0.0, 1e-3, 1e-3, 1e-3]),
        "activation_similarity": np.array([0.95, 0.3, np.nan, np.nan, 0.9, 0.9]),
        "logit_similarity": np.array([0.99, 0.97, np.nan, np.nan, 0.99, 0.99]),
        "dead_activation_error": np.array([np.nan, np.nan, 4.0, 3.0, np.nan, np.nan]),
    }
    top = {
        "base": _table({1: [(3.5, 0, def_pos), (1.0, 1, 4)], 0: [(2.0, 0, 5)], 2: [(1.5, 1, 2)]}),
        "finetune": _table({1: [(2.5, 1, 3)], 0: [(2.1, 0, 5)], 3: [(0.7, 0, 2)]}),
    }
    rankings = {"lowest_activation_similarity": {"ids": [1], "n_candidates": 4, "n_unknown": 0, "n_undefined": 0}}
    promoted = {"base": {1: [(569, 0.8)], 0: [(10, 0.5)]}, "finetune": {1: [(90, 0.7)], 0: [(10, 0.4)]}}
    section = build_features_section(vectors, rankings, top, tokens, tok, promoted,
                                     watched=[(0, "steady"), (2, "def keyword")], window=(3, 2))
    n = 65_536
    base = ModelResult("toy-base", {"n_tokens": n, "n_nonfinite": 0})
    ft = FinetuneResult("toy-code", {"n_tokens": n, "n_nonfinite": 0})
    if with_section:
        ft.features = section  # what the engine integration attaches to each finetune
    arrays = FeatureArrays(vectors={"toy-code": vectors}) if with_vectors else None
    return TransferReport(config={}, base=base, finetunes=[ft], features=arrays)


def test_feature_view_numbers_contexts_and_promoted_tokens(tok):
    result = PairResult(_report(tok), "toy-code")
    f = result.feature(1)
    assert f.id == 1 and f.label is None
    assert f.activation_similarity == pytest.approx(0.3) and f.density_base == pytest.approx(2e-3)
    assert f.top_contexts("base")[0] == "<bos>[[def]] parse(…"
    assert len(f.top_contexts("base")) == 2 and len(f.top_contexts("finetune")) == 1
    assert [c["value"] for c in f.contexts("base")] == pytest.approx([3.5, 1.0])
    assert f.promoted_tokens("base") == [(tok.decode([569]), pytest.approx(0.8))]
    assert result.feature(2).label == "def keyword"
    assert result.feature(2).top_contexts("finetune") == []  # dead on the finetune
    assert result.feature(np.int64(0)).label == "steady"


def test_unrecorded_features_and_bad_ids_say_why(tok):
    result = PairResult(_report(tok), "toy-code")
    with pytest.raises(LookupError, match=r"feature 4: contexts are recorded for .* \(3 features: 0, 1, 2\); watch it .*--sae-features 4"):
        result.feature(4).top_contexts()
    assert result.feature(4).activation_similarity == pytest.approx(0.9)  # numbers exist for every feature
    with pytest.raises(IndexError, match=r"outside the SAE's 6 features"):
        result.feature(6)
    with pytest.raises(TypeError):
        result.feature("1")
    with pytest.raises(ValueError, match="'base', 'finetune'"):
        result.feature(1).top_contexts("ft")
    bare = PairResult(_report(tok, with_section=False), "toy-code")
    with pytest.raises(LookupError, match="no feature section"):
        bare.feature(1).top_contexts()


def test_card_numbers_serve_without_the_sidecar(tok):
    result = PairResult(_report(tok, with_vectors=False), "toy-code")
    assert result.feature(1).activation_similarity == pytest.approx(0.3)
    assert result.feature(5).activation_similarity is None  # not listed: no card, no sidecar


def test_assert_feature_transfers_passes_and_fails_with_contexts(tok):
    result = PairResult(_report(tok), "toy-code")
    assert_feature_transfers(result, 0)
    assert_feature_transfers(result, 0, min_activation_similarity=0.9, max_density_ratio=2, min_logit_similarity=0.98)
    with pytest.raises(AssertionError) as err:
        assert_feature_transfers(result, 1)
    msg = str(err.value)
    assert "feature 1 of 'toy-code' vs base 'toy-base': 1 of 2 bounds failed" in msg
    assert "expected: activation_similarity>=0.8; stays_alive" in msg
    assert "activation similarity = 0.3 < min 0.8 (density base 0.002, finetune 0.002)" in msg
    assert "top contexts on the base:" in msg and "<bos>[[def]] parse" in msg
    with pytest.raises(AssertionError, match="turned dead"):
        assert_feature_transfers(result, 2, min_activation_similarity=None)
    with pytest.raises(AssertionError, match="cannot judge feature\\[3\\] activation similarity: it is dead on the base"):
        assert_feature_transfers(result, 3)
    with pytest.raises(AssertionError, match="outside the SAE's 6 features"):
        assert_feature_transfers(result, 9)
    with pytest.raises(AssertionError, match="not recorded"):  # fails, and says the contexts were not kept
        assert_feature_transfers(result, 4, min_activation_similarity=0.95)


def test_assert_feature_transfers_without_sidecar_uses_the_card(tok):
    result = PairResult(_report(tok, with_vectors=False), "toy-code")
    assert_feature_transfers(result, 0)
    with pytest.raises(AssertionError, match="0.3 < min 0.8"):
        assert_feature_transfers(result, 1)
    with pytest.raises(AssertionError, match="densities are missing"):
        assert_feature_transfers(result, 5)
