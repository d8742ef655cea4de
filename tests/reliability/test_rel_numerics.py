"""Numerical faults: NaN/Inf is counted, fails the default gate, and nothing is dropped silently."""

from __future__ import annotations

import math
from typing import Any

import torch
from rel_runner import plugin_args


def test_overflowing_finetune_fails_the_nonfinite_check(fx: dict[str, Any], run_plugin: Any, canonical: Any) -> None:
    """A local checkpoint with a few huge (3e38) embedding rows: LayerNorm's variance overflows
    float32, NaN reaches the hook. Through the plugin, with the bundled default profile."""
    run = run_plugin(*plugin_args(fx, finetunes=("ft_nan",), sae_thresholds="default"))
    assert run.ret == 1, run.text
    assert "Traceback" not in run.text and "INTERNALERROR" not in run.text
    failed = [line for line in run.text.splitlines() if line.startswith("FAILED ")]
    assert any("::finetune.nonfinite_fraction<=0" in line for line in failed), run.text

    report = run.report()
    ft = report["finetunes"][0]
    m = ft["metrics"]
    assert 0 < m["nonfinite_fraction"] < 1, m
    assert m["n_nonfinite"] == round(m["nonfinite_fraction"] * m["n_tokens"]) > 0
    # Nothing dropped: every included token is still counted, the same tokens as the base's
    # and as the healthy run's.
    base_tokens = canonical.report()["base"]["metrics"]["n_tokens"]
    assert m["n_tokens"] == report["base"]["metrics"]["n_tokens"] == base_tokens
    assert report["base"]["metrics"]["nonfinite_fraction"] == 0.0
    check = next(c for c in ft["checks"] if c["id"] == "finetune.nonfinite_fraction<=0")
    assert check["passed"] is False and check["value"] == m["nonfinite_fraction"]
    assert ft["passed"] is False and report["passed"] is False
    # the paired metrics use only tokens finite in both models, and say how many
    assert ft["paired"]["n_tokens"] == m["n_tokens"] - m["n_nonfinite"]
    # NaN spreads through attention into the losses of finite tokens: counted and noted
    if m.get("n_nonfinite_loss"):
        assert any("n_nonfinite_loss" in note for note in ft["notes"]), ft["notes"]


def test_nonfinite_logits_are_counted_and_noted() -> None:
    """Overflow after the hook (huge unembedding columns): the activations are finite, so
    SPEC's nonfinite_fraction (activation or reconstruction) stays 0, but every position
    whose loss is NaN is counted in n_nonfinite_loss, no token leaves n_tokens, and the
    result carries a note saying the loss means left those positions out."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from helpers import random_tokens, tiny_pair, tiny_sae

    from pytest_sae_transfer.engine import EngineOptions, evaluate_transfer

    base, ft = tiny_pair(seed=3, n_layers=2)
    with torch.no_grad():
        ft.unembed.W_U[:, 5:9] = 3e38
    sae = tiny_sae(hook_name="blocks.1.hook_resid_post")
    toks = random_tokens(8, 16, seed=3)
    report = evaluate_transfer(base, {"ft": ft}, sae, toks, EngineOptions(batch_size=4, n_bootstrap=0, special_token_ids=(0,)))
    m = report.finetune("ft").metrics
    n_included = int((toks != 0).sum())
    assert m["nonfinite_fraction"] == 0.0
    assert 0 < m["n_nonfinite_loss"] <= n_included
    assert m["n_tokens"] == report.base.metrics["n_tokens"] == n_included
    assert any("n_nonfinite_loss" in note for note in report.finetune("ft").notes)
    assert report.base.metrics.get("n_nonfinite_loss", 0) == 0 and not report.base.notes
    # and no NaN/Inf number leaks into the report: a loss mean over nothing is null, and fails its check
    for key in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_delta", "kl_div_spliced"):
        assert m[key] is None or math.isfinite(m[key]), (key, m[key])
    # The overflow is gateable: the fraction is reported, and the default profile fails on it.
    assert m["nonfinite_loss_fraction"] == m["n_nonfinite_loss"] / m["n_tokens"] > 0
    from pytest_sae_transfer.thresholds import evaluate_checks, load_profile

    evaluate_checks(load_profile("default"), report)
    check = next(c for c in report.finetune("ft").checks if c.id == "finetune.nonfinite_loss_fraction<=0")
    assert check.passed is False and report.finetune("ft").passed is False
