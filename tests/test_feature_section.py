"""The report's per-finetune "features" section, built from real accumulators and the zoo tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pytest_sae_transfer import zoo
from pytest_sae_transfer.metrics.feature_rank import RANKINGS, rank_features
from pytest_sae_transfer.metrics.promoted import promoted_tokens
from pytest_sae_transfer.metrics.topk import TopKAccumulator
from pytest_sae_transfer.report.contexts import SnippetMaker
from pytest_sae_transfer.report.feature_section import build_features_section, listed_ids

D, C, T, K = 12, 6, 16, 3


@pytest.fixture(scope="module")
def inputs():
    tok = zoo.load_tokenizer()
    with open(zoo.dataset_path("toy-eval"), encoding="utf-8") as fh:
        text = " ".join(json.loads(next(fh))["text"] for _ in range(1))
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor(ids[: C * T]).view(C, T)
    gen = torch.Generator().manual_seed(0)
    feats = {side: torch.relu(torch.randn(C, T, D, generator=gen) - 1.0) for side in ("base", "finetune")}
    feats["finetune"][..., 4] = 0.0  # feature 4 turns dead
    feats["base"][..., 5] = 0.0      # feature 5 turns alive
    included = tokens != tok.bos_token_id
    tables = {}
    for side, f in feats.items():
        acc = TopKAccumulator(D, K)
        for lo in range(0, C, 4):
            acc.update(f[lo : lo + 4], included[lo : lo + 4], lo)
        tables[side] = acc.result()
    n = float(included.sum())
    vectors = {
        "density_base": ((feats["base"] > 0) & included[..., None]).sum((0, 1)).double().numpy() / n,
        "density_finetune": ((feats["finetune"] > 0) & included[..., None]).sum((0, 1)).double().numpy() / n,
        "activation_similarity": np.linspace(-0.5, 1.0, D),
        "logit_similarity": np.linspace(0.5, 1.0, D),
        "dead_activation_error": np.full(D, np.nan),
    }
    vectors["activation_similarity"][7] = np.nan
    W_dec = torch.randn(D, 8, generator=gen)
    W_U = {side: torch.randn(8, 50, generator=gen) for side in ("base", "finetune")}
    return tok, tokens, feats, included, tables, vectors, W_dec, W_U


def build(inputs, watched=((3, "three"), (9, None)), n=2, **kw):
    tok, tokens, feats, included, tables, vectors, W_dec, W_U = inputs
    rankings = rank_features(vectors, n=n)
    ids = listed_ids(rankings, watched)
    promoted = {side: promoted_tokens(W_dec, W_U[side], ids, n=4) for side in ("base", "finetune")}
    return build_features_section(vectors, rankings, kw.pop("top_k", tables), tokens, tok, promoted,
                                  watched=watched, window=(5, 2), **kw), rankings, promoted


def test_section_is_plain_json_with_every_listed_and_watched_feature(inputs):
    section, rankings, _ = build(inputs)
    again = json.loads(json.dumps(section, allow_nan=False))
    assert again == section
    assert list(section["lists"]) == list(RANKINGS)
    for name in RANKINGS:
        assert section["lists"][name]["ids"] == rankings[name]["ids"]
        assert section["lists"][name]["n_candidates"] == rankings[name]["n_candidates"]
    assert section["watched"] == [{"id": 3, "label": "three"}, {"id": 9, "label": None}]
    expected_ids = sorted({i for r in rankings.values() for i in r["ids"]} | {3, 9})
    assert [int(k) for k in section["cards"]] == expected_ids
    assert section["d_sae"] == D and section["top_k"] == K and section["window"] == {"left": 5, "right": 2}
    assert 4 in section["lists"]["turned_dead"]["ids"] and 5 in section["lists"]["turned_alive"]["ids"]


def test_cards_carry_the_vectors_the_top_k_and_the_promoted_tokens(inputs):
    tok, tokens, feats, included, tables, vectors, *_ = inputs
    section, rankings, promoted = build(inputs)
    maker = SnippetMaker(tokens, tok, left=5, right=2)
    for key, card in section["cards"].items():
        i = int(key)
        assert card["id"] == i
        for vec in ("density_base", "density_finetune", "logit_similarity"):
            assert card[vec] == pytest.approx(float(vectors[vec][i]))
        sim = vectors["activation_similarity"][i]
        assert card["activation_similarity"] == (None if np.isnan(sim) else pytest.approx(sim))
        assert card["dead_activation_error"] is None
        assert card["watched"] == (i in (3, 9))
        assert card["lists"] == [name for name in RANKINGS if i in rankings[name]["ids"]]
        for side in ("base", "finetune"):
            # Independently: the feature's strongest included tokens, by brute force.
            f = feats[side][..., i].numpy()
            order = sorted(((-float(f[c, p]), c * T + p) for c in range(C) for p in range(T)
                            if included[c, p] and f[c, p] > 0))[:K]
            got = card["top_contexts"][side]
            assert [(g["context"], g["position"]) for g in got] == [divmod(g, T) for _, g in order]
            assert [g["value"] for g in got] == pytest.approx([-v for v, _ in order])
            for g in got:
                assert {k: g[k] for k in ("left", "token", "right")} == {
                    k: maker.snippet(g["context"], g["position"])[k] for k in ("left", "token", "right")}
            assert [(p["token_id"], p["value"]) for p in card["promoted_tokens"][side]] == [
                (t, pytest.approx(v)) for t, v in promoted[side][i]]
            assert all(p["token"] == maker.token_text(p["token_id"]) for p in card["promoted_tokens"][side])
    assert section["cards"]["4"]["top_contexts"]["finetune"] == []  # dead on the finetune: nothing fired
    assert section["cards"]["3"]["label"] == "three"


def test_missing_parts_are_null_not_dropped(inputs):
    tok, tokens, feats, included, tables, vectors, *_ = inputs
    section, _, _ = build(inputs, top_k={"base": tables["base"]})
    card = section["cards"]["3"]
    assert card["top_contexts"]["finetune"] is None and card["top_contexts"]["base"] is not None
    rankings = rank_features(vectors, n=1)
    bare = build_features_section(vectors, rankings, {}, tokens, None, {}, watched=[(2, "x")])
    assert bare["top_k"] is None
    assert bare["cards"]["2"]["promoted_tokens"] == {"base": None, "finetune": None}
    assert bare["cards"]["2"]["top_contexts"] == {"base": None, "finetune": None}


def test_regular_flag_and_density_change(inputs):
    vectors = {"density_base": np.array([1e-3, 0.0, 0.5]), "density_finetune": np.array([1e-2, 1e-3, 0.5]),
               "activation_similarity": np.array([0.5, np.nan, np.nan])}
    section = build_features_section(vectors, {}, {}, torch.zeros(1, 2, dtype=torch.long), None, {},
                                     watched=[(0, None), (1, None), (2, None)])
    c0, c1, c2 = (section["cards"][k] for k in "012")
    assert c0["regular"] and not c1["regular"] and not c2["regular"]
    assert c0["log10_density_change"] == pytest.approx(1.0, abs=1e-6)
    assert c1["log10_density_change"] == pytest.approx(7.0, abs=1e-6)
    assert c0["logit_similarity"] is None  # no such vector given


def test_watched_ids_outside_the_sae_are_refused(inputs):
    tok, tokens, _, _, tables, vectors, *_ = inputs
    with pytest.raises(IndexError, match=r"\[-1, 12\] are outside this SAE's \[0, 12\)"):
        build_features_section(vectors, {}, tables, tokens, tok, {}, watched=[(12, None), (-1, "x"), (3, None)])
