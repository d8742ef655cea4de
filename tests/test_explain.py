"""A verdict in words: why a finetune failed, grouped by what broke, warnings apart."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_sae_transfer.report import FinetuneResult
from pytest_sae_transfer.thresholds import (
    FAMILIES,
    METRIC_FAMILY,
    evaluate_pair,
    explain_finetune,
    explain_verdict,
    family_of,
    load_profile,
)
from pytest_sae_transfer.metrics.keys import CHECKABLE_PAIRED_KEYS, MODEL_METRIC_KEYS

# Numbers like the quick start's (toy-base, toy-code): what the default gate sees.
BASE = {"l0": 48.95, "ce_loss_delta": 0.074, "ce_loss_recovered": 0.978, "kl_div_spliced": 0.144,
        "explained_variance": 0.833, "r2_pooled": 0.854, "dense_fraction": 0.005, "nonfinite_fraction": 0.0,
        "nonfinite_loss_fraction": 0.0}
CODE = {"l0": 91.36, "ce_loss_delta": 0.274, "ce_loss_recovered": 0.922, "kl_div_spliced": 0.429,
        "explained_variance": 0.458, "r2_pooled": 0.610, "dense_fraction": 0.323, "nonfinite_fraction": 0.0,
        "nonfinite_loss_fraction": 0.0}
CODE_PAIRED = {"feature_transfer_rate": 0.06, "activation_similarity_mean": 0.504, "density_log10_pearson": 0.588, "density_log10_pearson_resolved": 0.588,
               "dead_shift_fraction": 0.0, "dense_shift_fraction": 0.318, "logit_similarity_mean": 0.804,
               "resid_cosine_mean": 0.7227}


def _checks(base=BASE, ft=CODE, paired=CODE_PAIRED, profile="default"):
    return evaluate_pair(load_profile(profile), base, ft, paired, missing="skip")


def test_every_metric_has_a_family():
    for key in MODEL_METRIC_KEYS + CHECKABLE_PAIRED_KEYS:
        assert METRIC_FAMILY.get(key) in FAMILIES, key
    assert family_of("finetune.l0") == "sparsity" and family_of("paired.feature_transfer_rate") == "features"
    assert family_of("paired.resid_cosine_mean") == "residual" and family_of("base.nonfinite_fraction") == "run"
    assert family_of("finetune.something_new") == "other"


def test_a_failure_in_one_line_grouped_by_what_broke():
    text = explain_verdict(_checks(), "toy-base", "toy-code")
    assert text.status == "FAIL"
    assert text.families == ("reconstruction", "sparsity", "features")
    assert text.lines[0] == (
        "FAIL: on toy-code the SAE explains 0.37 less variance than on toy-base (reconstruction), fires 1.87x as "
        "many features per token as on toy-base (sparsity) and keeps only 6% of the features regular on toy-base "
        "(features)"
    )
    assert text.lines[1] == (
        "also: it keeps its features' activations at a mean correlation of only 0.50 with toy-base, keeps its feature "
        "densities at a correlation of only 0.59 with toy-base and sees 32% of its features turn dense or stop being "
        "dense (features) (6 of 20 checks failed)"
    )
    # the warnings are apart: the residual prior and logit similarity, not the SAE's quality
    assert not text.sae_warnings
    assert any("residual stream of toy-code moved away from toy-base's (cosine 0.72" in w for w in text.prior_warnings)
    assert any("logit similarity 0.80" in w for w in text.prior_warnings)
    assert all("residual" not in line and "logit" not in line for line in text.lines)


def test_the_loss_family_leads_when_it_broke():
    ft = dict(CODE, ce_loss_delta=0.074 + 0.45)
    text = explain_verdict(_checks(ft=ft), "toy-base", "toy-code")
    assert text.families[0] == "loss"
    assert text.lines[0].startswith("FAIL: on toy-code the SAE loses 0.45 nats more than on toy-base (loss), explains 0.37 less variance (reconstruction)")


def test_interval_ends_are_not_repeated_after_their_point_failure():
    checks = evaluate_pair(load_profile("default"), BASE, CODE, CODE_PAIRED, delta_ci={"explained_variance": [-0.39, -0.36]},
                           ratio_ci={"l0": [1.83, 1.9]}, missing="skip")
    failed = [c.id for c in checks if not c.passed and c.severity == "fail"]
    assert "finetune.l0:ratio_ci_high<=1.6" in failed and "finetune.explained_variance:decrease_ci_high<=0.3" in failed
    text = explain_verdict(checks, "toy-base", "toy-code")
    assert "95% interval" not in " ".join(text.lines)
    assert text.lines[1].endswith(f"({len(failed)} of {len(checks)} checks failed)")


def test_an_interval_end_is_said_to_be_one():
    checks = evaluate_pair(load_profile("default"), BASE, dict(BASE, ce_loss_delta=0.1), {},
                           delta_ci={"ce_loss_delta": [-0.1, 0.55]}, missing="skip")
    text = explain_verdict(checks, "b", "f")
    assert text.lines == ("FAIL: on f the SAE loses 0.55 nats more than on b at the upper end of its 95% interval (loss)",)


def test_a_pass_with_a_weak_sae_warns_about_the_sae():
    weak = dict(BASE, ce_loss_recovered=0.62, explained_variance=0.31, ce_loss_delta=0.6)
    same = {"feature_transfer_rate": 1.0, "activation_similarity_mean": 1.0, "density_log10_pearson": 1.0, "density_log10_pearson_resolved": 1.0,
            "dead_shift_fraction": 0.0, "dense_shift_fraction": 0.0, "logit_similarity_mean": 1.0, "resid_cosine_mean": 1.0}
    checks = _checks(base=weak, ft=dict(weak), paired=same)
    result = FinetuneResult(model="toy-base-copy", metrics=dict(weak), checks=checks)
    assert result.passed is True
    text = explain_verdict(checks, "toy-base", "toy-base-copy")
    assert text.status == "PASS"
    assert text.lines[0].startswith("PASS: the SAE works on toy-base-copy as on toy-base (all ") and "2 warnings" in text.lines[0]
    assert text.sae_warnings == (
        "the SAE is weak on toy-base itself: it recovers only 0.62 of the loss and explains only 0.31 of the variance; "
        "transfer verdicts on it mean little",
    )
    assert not text.prior_warnings and text.warnings == text.sae_warnings


def test_undefined_feature_statistics_warn_apart():
    paired = dict(CODE_PAIRED, feature_transfer_rate=None, activation_similarity_mean=None, resid_cosine_mean=0.99,
                  logit_similarity_mean=0.99, density_log10_pearson=0.9, density_log10_pearson_resolved=0.9, dense_shift_fraction=0.0)
    checks = evaluate_pair(load_profile("default"), BASE, dict(BASE), paired)
    text = explain_verdict([c for c in checks if c.metric.startswith("paired.")], "b", "f")
    assert text.status == "PASS"
    assert [w.split(" ")[0] for w in text.prior_warnings] == ["paired.feature_transfer_rate", "paired.activation_similarity_mean"]
    assert all("undefined on this run" in w for w in text.prior_warnings)


def test_checks_it_has_no_words_for_are_quoted_by_id():
    from pytest_sae_transfer.report import CheckResult

    odd = CheckResult(id="finetune.mse<=3", metric="finetune.mse", op="<=", bound=3.0, value=4.5, passed=False)
    text = explain_verdict([odd], "b", "f")
    assert text.lines == ("FAIL: on f the SAE fails finetune.mse<=3 (4.50) (reconstruction)",)
    missing = CheckResult(id="finetune.l0:ratio<=1.5", metric="finetune.l0", op="ratio<=", bound=1.5, value=None, passed=False)
    assert explain_verdict([missing], "b", "f").lines == ("FAIL: on f the SAE has no usable value for finetune.l0 (sparsity)",)
    assert explain_verdict([], "b", "f").status == "NO CHECKS"


def test_explain_finetune_reads_the_names_from_the_report():
    from pytest_sae_transfer.report import ModelResult, TransferReport

    ft = FinetuneResult(model="toy-code", metrics=CODE, paired=CODE_PAIRED, checks=_checks())
    report = TransferReport(config={}, base=ModelResult(model="toy-base", metrics=BASE), finetunes=[ft])
    assert explain_finetune(report, ft) == explain_verdict(ft.checks, "toy-base", "toy-code")


value = st.one_of(st.none(), st.floats(min_value=-5, max_value=200, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(
    base=st.fixed_dictionaries({k: value for k in BASE}),
    ft=st.fixed_dictionaries({k: value for k in CODE}),
    paired=st.fixed_dictionaries({k: value for k in CODE_PAIRED}),
)
def test_property_the_explanation_agrees_with_the_verdict(base, ft, paired):
    checks = evaluate_pair(load_profile("default"), base, ft, paired)
    verdict = FinetuneResult(model="f", metrics=ft, checks=checks).passed
    text = explain_verdict(checks, "b", "f")
    assert text.status == ("PASS" if verdict else "FAIL")
    assert 1 <= len(text.lines) <= 2 and all("\n" not in line for line in text.lines)
    failed = [c for c in checks if not c.passed and c.severity == "fail"]
    expected = [f for f in FAMILIES + ("other",) if any(family_of(c.metric) == f for c in failed)]
    assert list(text.families) == expected
    for fam in expected:
        assert f"({fam})" in text.lines[0]
    warned = [c for c in checks if not c.passed and c.severity != "fail"]
    assert bool(text.warnings) == bool(warned)
