"""Feature-level transfer on the real toy zoo: top-k tables against a brute-force
[tokens x d_sae] computation, the worst features of toy-code with their text, and a
watchlist that passes on toy-prose and fails on toy-code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from feature_zoo import SPECIAL, run_features, zoo_tokens

from pytest_sae_transfer import zoo
from pytest_sae_transfer.metrics.topk import TopKAccumulator
from pytest_sae_transfer.thresholds import load_profile
from pytest_sae_transfer.thresholds.watch_checks import evaluate_watchlist, evaluated_tokens, planned_watch_checks

N_CONTEXTS = 32


@pytest.fixture(scope="module")
def runs():
    return {ft: run_features(ft, n_contexts=N_CONTEXTS, dataset="toy-eval") for ft in ("toy-prose", "toy-code")}


def test_top_k_of_real_features_matches_brute_force_at_every_batch_size():
    from pytest_sae_transfer.engine.runner import ModelRunner, hook_layer
    from pytest_sae_transfer.engine.steps import sae_roundtrip

    model, sae = zoo.load_model("toy-code"), zoo.load_sae("toy-res")
    tokens = zoo_tokens(N_CONTEXTS, 128, "toy-eval")
    layer = hook_layer(sae.cfg.metadata.hook_name, model.cfg.n_layers)
    runner = ModelRunner(model, 1 << 24, True)
    with torch.no_grad():
        feats = torch.cat([sae_roundtrip(sae, runner.capture(tokens[i : i + 8], [layer])[layer])[0] for i in range(0, N_CONTEXTS, 8)])
    included = ~torch.isin(tokens, torch.tensor(SPECIAL))
    C, T, D = feats.shape
    # Brute force over the whole [tokens x d_sae] matrix: per feature, sort its positive
    # included values by (value descending, token index ascending) and keep the first 10.
    flat = feats.reshape(C * T, D).numpy()
    ok = included.reshape(-1).numpy()[:, None] & (flat > 0)
    gidx = np.arange(C * T)
    expected = np.full((D, 10), -1)
    for f in range(D):
        rows = gidx[ok[:, f]]
        order = rows[np.lexsort((rows, -flat[rows, f]))][:10]
        expected[f, : order.size] = order
    assert (expected[:, 0] >= 0).sum() > 900  # most features fire: a real test, not an empty one
    for batch in (1, 5, 16, 32):
        acc = TopKAccumulator(D, 10)
        for lo in range(0, C, batch):
            acc.update(feats[lo : lo + batch], included[lo : lo + batch], lo)
        table = acc.result()
        got = np.where(table.contexts >= 0, table.contexts * T + table.positions, -1)
        np.testing.assert_array_equal(got, expected, err_msg=f"batch size {batch}")
        filled = expected >= 0
        np.testing.assert_array_equal(table.values[filled], flat[expected[filled], np.nonzero(filled)[0]])


def test_toy_code_lists_its_worst_features_with_text(runs):
    section = runs["toy-code"]["section"]
    json.dumps(section, allow_nan=False)
    worst = section["lists"]["lowest_activation_similarity"]
    assert len(worst["ids"]) == 20 and worst["n_candidates"] > 100
    sims = [section["cards"][str(i)]["activation_similarity"] for i in worst["ids"]]
    assert sims == sorted(sims) and sims[0] < 0.3
    for i in worst["ids"]:
        card = section["cards"][str(i)]
        for side in ("base", "finetune"):
            contexts = card["top_contexts"][side]
            assert contexts, (i, side)  # regular on both models: it fired on both
            assert all(c["token"] and (c["left"] or c["right"]) for c in contexts)
            assert [c["value"] for c in contexts] == sorted((c["value"] for c in contexts), reverse=True)
            assert len(card["promoted_tokens"][side]) == 10
    # toy-prose transfers: its worst similarity is far above toy-code's.
    prose = runs["toy-prose"]["section"]["lists"]["lowest_activation_similarity"]
    assert runs["toy-prose"]["section"]["cards"][str(prose["ids"][0])]["activation_similarity"] > sims[0]


WATCH = """
[profile]
extends = "default"

[features]
ids = [289, 556]

[features.defaults]
min_activation_similarity = 0.8
must_stay_alive = true

[features.204]
label = "paragraph break"
min_activation_similarity = 0.8
"""


def test_a_watchlist_passes_on_toy_prose_and_fails_on_toy_code(runs, tmp_path):
    path = tmp_path / "watch.toml"
    path.write_text(WATCH, encoding="utf-8")
    watch = load_profile(str(path)).features
    planned = [p[0] for p in planned_watch_checks(watch)]
    verdicts = {}
    for ft, run in runs.items():
        report = run["report"]
        results = evaluate_watchlist(watch, run["vectors"], evaluated_tokens(report.base.metrics),
                                     evaluated_tokens(report.finetune(ft).metrics))
        assert [r.id for r in results] == planned
        verdicts[ft] = results
    assert all(r.passed for r in verdicts["toy-prose"]), [r.message for r in verdicts["toy-prose"]]
    failed = [r for r in verdicts["toy-code"] if not r.passed]
    assert {r.id for r in failed} == {
        "feature[289].activation_similarity>=0.8", "feature[556].activation_similarity>=0.8",
        "feature[204 'paragraph break'].activation_similarity>=0.8",
    }
    for r in failed:
        assert " < min 0.8 (density base " in r.message and r.value is not None and r.value < 0.8


def test_the_engine_builds_the_section_it_is_tested_against():
    """The engine's own features section (top-k streamed in the pass, rankings, promoted tokens,
    snippets) equals the one built here by hand from the pieces, watched features included."""
    data = run_features("toy-code", watched=((289, "a watched one"), (7, None)), n_contexts=32)
    engine_section = data["report"].finetune("toy-code").features
    assert engine_section == data["section"]
    assert {"289", "7"} <= set(engine_section["cards"])
