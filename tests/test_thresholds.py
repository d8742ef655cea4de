"""Threshold profiles: loading, validation errors, evaluation and calibration (no torch)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
from helpers import read_one_sae
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_sae_transfer.metrics.keys import CHECKABLE_PAIRED_KEYS
from pytest_sae_transfer.report import (
    MODEL_METRIC_KEYS,
    CheckResult,
    FinetuneResult,
    ModelResult,
    TransferReport,
)
from pytest_sae_transfer.thresholds import (
    BOUND_KEYS,
    CheckSpec,
    Profile,
    ProfileError,
    available_profiles,
    evaluate_checks,
    evaluate_pair,
    family_of,
    load_profile,
    profile_for_release,
)
from pytest_sae_transfer.thresholds.vocabulary import RELATIVE_BOUNDS

# The published pairs (the calibration of the bundled profiles) are in test_calibration.py.


_metric = st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False)
_fraction = st.floats(min_value=0, max_value=1, allow_nan=False)

#: Paired values of a finetune identical to its base.
IDENTITY_PAIRED = {"resid_cosine_mean": 1.0, "activation_similarity_mean": 1.0, "density_log10_pearson": 1.0, "density_log10_pearson_resolved": 1.0,
                   "dead_shift_fraction": 0.0, "dense_shift_fraction": 0.0, "feature_transfer_rate": 1.0,
                   "logit_similarity_mean": 1.0}


@settings(max_examples=150, deadline=None)
@given(
    values=st.fixed_dictionaries({k: _metric for k in MODEL_METRIC_KEYS}),
    fractions=st.fixed_dictionaries({k: _fraction for k in ("dead_fraction", "dense_fraction")}),
    name=st.sampled_from(available_profiles()),
)
def test_an_unchanged_finetune_passes_every_bundled_profile_whatever_the_base(values, fractions, name):
    """Whatever the SAE's numbers on the base (good, useless or absurd), a finetune with the
    same numbers (every difference 0, every ratio 1, every paired interval a point) fails no
    check; only the base's own warnings may fire."""
    base = dict(values, **fractions, nonfinite_fraction=0.0, nonfinite_loss_fraction=0.0)
    base["l0"] = abs(base["l0"])
    # The SAE's quality is arbitrary; the sample is one a gate can judge (its size is checked apart).
    base["n_tokens"] = 1000 + abs(base["n_tokens"]) * 1000
    delta = {k: [0.0, 0.0] for k in MODEL_METRIC_KEYS}
    ratio = {k: [1.0, 1.0] for k in MODEL_METRIC_KEYS}
    results = evaluate_pair(load_profile(name), base, dict(base), IDENTITY_PAIRED, delta_ci=delta, ratio_ci=ratio)
    assert len(results) == sum(len(c.bounds) for c in load_profile(name).checks)
    failed = [r.message for r in results if not r.passed and r.severity == "fail"]
    assert not failed, failed
    assert not [r.id for r in results if not r.passed and not r.metric.startswith("base.")]


# --------------------------------------------------------------------------- bundled profiles


def test_bundled_profiles_all_load():
    names = available_profiles()
    assert {"default", "gemma-2b-res-jb", "mistral-7b-res-wg", "toy-res"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.description.strip()
        assert profile.path and Path(profile.path).name == f"{name}.toml"
        assert profile.checks
        for spec in profile.checks:
            assert spec.bounds and spec.severity in ("fail", "warn")
        if name != "default":
            assert profile.extends == "default"


def test_default_profile_judges_transfer_not_the_sae():
    """The design of the default gate, check by check: a failing check on what the SAE does
    is relative to the base; absolute failing bounds only on the run itself; the base SAE's
    quality and the residual-stream prior are warnings."""
    profile = load_profile("default")
    keys = {c.key for c in profile.checks}
    assert {
        "finetune.ce_loss_delta", "finetune.kl_div_spliced", "finetune.explained_variance",
        "finetune.r2_pooled", "finetune.l0", "paired.feature_transfer_rate", "paired.dense_shift_fraction",
        "paired.dead_shift_fraction", "paired.activation_similarity_mean", "paired.density_log10_pearson_resolved",
        "finetune.nonfinite_fraction", "base.nonfinite_fraction", "base.ce_loss_recovered", "paired.resid_cosine_mean",
    } <= keys
    for spec in profile.checks:
        family = family_of(spec.key)
        bounds = {k for k, _ in spec.bounds}
        if family == "run" and spec.metric == "n_tokens":  # enough evidence to judge at all
            assert spec.severity == "fail" and bounds == {"min"} and spec.scope == "finetune", spec
        elif family == "run":
            assert spec.severity == "fail" and bounds == {"max"}, spec
            assert dict(spec.bounds)["max"] == 0.0
        elif spec.scope == "base":
            assert spec.severity == "warn", f"{spec.key}: the SAE's own quality must never fail a finetune"
        elif spec.scope == "finetune":
            assert spec.severity == "fail" and bounds <= RELATIVE_BOUNDS, f"{spec.key}: absolute bound {bounds}"
        elif family == "residual":
            assert spec.severity == "warn", spec
    # both directions of the L0 ratio, and an interval twin for every relative point bound
    l0 = dict(profile.check("finetune.l0").bounds)
    assert l0["min_ratio_to_base"] < 1 < l0["max_ratio_to_base"]
    assert l0["min_ratio_ci_low"] < l0["min_ratio_to_base"] and l0["max_ratio_ci_high"] > l0["max_ratio_to_base"]
    twins = {"max_increase_over_base": "max_increase_ci_high", "max_decrease_from_base": "max_decrease_ci_high",
             "max_ratio_to_base": "max_ratio_ci_high", "min_ratio_to_base": "min_ratio_ci_low"}
    for spec in profile.checks:
        b = dict(spec.bounds)
        for point, twin in twins.items():
            if point in b:
                assert twin in b, (spec.key, twin)
                assert (b[twin] > b[point]) if twin.startswith("max") else (b[twin] < b[point]), (spec.key, twin)
    for key in ("paired.feature_transfer_rate", "paired.activation_similarity_mean", "paired.density_log10_pearson_resolved"):
        assert profile.check(key).if_undefined == "warn", key
    assert profile.check("paired.logit_similarity_mean").severity == "warn"
    assert dict(profile.settings) == {}


def test_release_profiles_keep_only_what_is_release_specific():
    default = load_profile("default")
    for name in ("gemma-2b-res-jb", "mistral-7b-res-wg"):
        assert load_profile(name).settings["outlier_norm"] == "auto"
    assert "outlier_norm" not in load_profile("toy-res").settings
    for name in ("gemma-2b-res-jb", "mistral-7b-res-wg", "toy-res"):
        assert load_profile(name).checks == default.checks, f"{name} should add no checks of its own"


def test_profile_for_release():
    assert profile_for_release("gemma-2b-res-jb") == "gemma-2b-res-jb"
    assert profile_for_release("mistral-7b-res-wg") == "mistral-7b-res-wg"
    assert profile_for_release("toy-res") == "toy-res"
    assert profile_for_release("gpt2-small-res-jb") == "default"
    assert profile_for_release(None) == "default"
    assert profile_for_release("") == "default"
    assert profile_for_release("../default") == "default"


def test_load_by_path_and_unknown_name(tmp_path):
    bundled = load_profile("default")
    by_path = load_profile(bundled.path)
    assert by_path.checks == bundled.checks
    assert load_profile(Path(bundled.path)).checks == bundled.checks
    with pytest.raises(ProfileError, match="did you mean 'default'"):
        load_profile("defualt")
    with pytest.raises(ProfileError, match="not found"):
        load_profile(str(tmp_path / "nope.toml"))
    with pytest.raises(ProfileError, match="use the name 'default'"):
        load_profile(str(tmp_path / "default.toml"))


# --------------------------------------------------------------------------- extends / override


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_extends_overrides_whole_tables_and_merges_settings(tmp_path):
    _write(
        tmp_path,
        "parent.toml",
        """
[profile]
description = "parent"
outlier_norm = 100
exclude_special_tokens = true

[finetune.ce_loss_delta]
max = 0.5
max_increase_over_base = 0.3

[finetune.l0]
max_ratio_to_base = 1.5

[paired.resid_cosine_mean]
min = 0.8
""",
    )
    child = _write(
        tmp_path,
        "child.toml",
        """
[profile]
extends = "parent.toml"
outlier_norm = "auto"

[finetune.ce_loss_delta]
max = 1.0

[paired.resid_cosine_mean]
enabled = false

[paired.activation_similarity_mean]
min = 0.7
severity = "warn"
""",
    )
    profile = load_profile(str(child))
    assert profile.name == "child" and profile.extends == "parent"
    assert profile.description == "parent"  # inherited when the child has none
    assert dict(profile.settings) == {"outlier_norm": "auto", "exclude_special_tokens": True}
    # parent order kept, overridden in place, dropped check gone, new check appended
    assert [c.key for c in profile.checks] == [
        "finetune.ce_loss_delta",
        "finetune.l0",
        "paired.activation_similarity_mean",
    ]
    # The child's table replaces the parent's as a whole: the increase bound is gone.
    assert profile.check("finetune.ce_loss_delta").bounds == (("max", 1.0),)
    assert profile.check("finetune.ce_loss_delta").source.endswith("child.toml")
    assert profile.check("finetune.l0").source.endswith("parent.toml")
    assert profile.check("paired.activation_similarity_mean").severity == "warn"


def test_extends_bundled_and_chain(tmp_path):
    _write(tmp_path, "mid.toml", '[profile]\nextends = "default"\ndescription = "mid"\n[finetune.l0]\nmax = 200\n')
    leaf = _write(tmp_path, "leaf.toml", '[profile]\nextends = "./mid.toml"\noutlier_norm = "off"\n')
    profile = load_profile(leaf)
    default = load_profile("default")
    assert profile.description == "mid"
    assert profile.settings["outlier_norm"] is None
    assert profile.check("finetune.l0").bounds == (("max", 200.0),)
    assert len(profile.checks) == len(default.checks)
    # A user file may be called default.toml and still extend the bundled default.
    own_default = _write(tmp_path, "default.toml", '[profile]\nextends = "default"\n')
    assert load_profile(own_default).checks == default.checks


def test_spec_example_loads(tmp_path):
    """The example in SPEC.md, "Threshold profiles (TOML)", is a valid profile."""
    text = """
[profile]
extends = "default"
description = "gate for finetunes of the toy zoo"

[finetune.ce_loss_delta]
max = 0.5
max_increase_over_base = 0.3

[finetune.explained_variance]
min = 0.5
min_ci_low = 0.45

[paired.activation_similarity_mean]
min = 0.8
severity = "warn"
"""
    profile = load_profile(_write(tmp_path, "spec_example.toml", text))
    assert profile.description == "gate for finetunes of the toy zoo"
    assert profile.check("finetune.explained_variance").bounds == (("min", 0.5), ("min_ci_low", 0.45))
    assert profile.check("paired.activation_similarity_mean").severity == "warn"
    assert profile.check("paired.density_log10_pearson_resolved") == load_profile("default").check("paired.density_log10_pearson_resolved")


def test_extends_cycles(tmp_path):
    _write(tmp_path, "a.toml", '[profile]\nextends = "b.toml"\n[finetune.l0]\nmax = 1\n')
    _write(tmp_path, "b.toml", '[profile]\nextends = "c.toml"\n')
    _write(tmp_path, "c.toml", '[profile]\nextends = "a.toml"\n')
    with pytest.raises(ProfileError) as err:
        load_profile(tmp_path / "a.toml")
    msg = str(err.value)
    assert "cycle" in msg and "extends" in msg and "c.toml" in msg and "a.toml" in msg

    _write(tmp_path, "self.toml", '[profile]\nextends = "self.toml"\n')
    with pytest.raises(ProfileError, match="cycle"):
        load_profile(tmp_path / "self.toml")


# --------------------------------------------------------------------------- bad files

BAD_FILES = [
    # (label, toml text, substrings the message must contain)
    ("syntax", "[finetune.l0]\nmax = \n", ["TOML syntax error", "line 2", "column"]),
    ("duplicate table", "[finetune.l0]\nmax = 1\n[finetune.l0]\nmin = 0\n", ["TOML syntax error", "line 3"]),
    ("unknown scope", "[fintune.ce_loss_delta]\nmax = 0.5\n", ["[fintune.ce_loss_delta]", "did you mean 'finetune'"]),
    ("unknown top-level key", "[profiles]\nextends = 'default'\n", ["profiles", "did you mean 'profile'"]),
    ("metric without scope", "[ce_loss_delta]\nmax = 0.5\n", ["ce_loss_delta", "[finetune.ce_loss_delta]"]),
    ("unknown metric", "[finetune.ce_loss_detla]\nmax = 0.5\n", ["ce_loss_detla", "did you mean 'ce_loss_delta'"]),
    ("metric of other scope", "[finetune.resid_cosine_mean]\nmin = 0.8\n", ["resid_cosine_mean", "[paired.resid_cosine_mean]"]),
    ("paired metric typo", "[paired.density_log10_pearsn]\nmin = 0.8\n", ["density_log10_pearsn", "did you mean 'density_log10_pearson'"]),
    ("bad operator", "[finetune.ce_loss_delta]\nmaximum = 0.5\n", ["maximum", "did you mean 'max'"]),
    ("bad operator 2", "[finetune.l0]\nmax_ratio_to_bse = 1.5\n", ["max_ratio_to_bse", "did you mean 'max_ratio_to_base'"]),
    ("string bound", '[finetune.ce_loss_delta]\nmax = "0.5"\n', ["'max'", "must be a number", "'0.5'"]),
    ("bool bound", "[finetune.ce_loss_delta]\nmax = true\n", ["'max'", "must be a number", "boolean"]),
    ("array bound", "[finetune.ce_loss_delta]\nmax = [0.5]\n", ["'max'", "must be a number"]),
    ("nan bound", "[finetune.ce_loss_delta]\nmax = nan\n", ["'max'", "finite"]),
    ("inf bound", "[finetune.ce_loss_delta]\nmin = -inf\n", ["'min'", "finite"]),
    ("relative bound on paired", "[paired.resid_cosine_mean]\nmax_decrease_from_base = 0.1\n", ["max_decrease_from_base", "finetune", "did you mean 'min'"]),
    ("relative bound on base", "[base.l0]\nmax_ratio_to_base = 1.5\n", ["max_ratio_to_base", "did you mean [finetune.l0]"]),
    ("bad severity", '[finetune.l0]\nmax = 100\nseverity = "warning"\n', ["severity", "did you mean 'warn'"]),
    ("bad severity type", "[finetune.l0]\nmax = 100\nseverity = 1\n", ["severity", "got int 1", "'fail'", "'warn'"]),
    ("unknown extends", '[profile]\nextends = "defualt"\n', ["extends", "defualt", "did you mean 'default'"]),
    ("extends not a string", "[profile]\nextends = 3\n", ["extends", "string"]),
    ("description not a string", "[profile]\ndescription = 3\n", ["description", "string"]),
    ("profile not a table", "profile = 'default'\n", ["profile", "table"]),
    ("missing extends file", '[profile]\nextends = "nothere.toml"\n', ["extends", "nothere.toml", "not found"]),
    ("unknown setting", "[profile]\noutlier_nrom = 200\n", ["outlier_nrom", "did you mean 'outlier_norm'"]),
    ("bad outlier_norm", '[profile]\noutlier_norm = "atuo"\n', ["outlier_norm", "did you mean 'auto'"]),
    ("negative outlier_norm", "[profile]\noutlier_norm = -3\n", ["outlier_norm", "positive"]),
    ("bool outlier_norm", "[profile]\noutlier_norm = true\n", ["outlier_norm", "boolean"]),
    ("bad exclude_special_tokens", '[profile]\nexclude_special_tokens = "yes"\n', ["exclude_special_tokens", "true or false"]),
    ("list metric", "[paired.weight_deviation]\nmax = 0.1\n", ["weight_deviation", "list", "scalar"]),
    ("by-position metric", "[paired.resid_cosine_by_position]\nmin = 0.1\n", ["resid_cosine_by_position", "list"]),
    ("check not a table", "[finetune]\nce_loss_delta = 0.5\n", ["ce_loss_delta", "table"]),
    ("scope not a table", "finetune = 1\n", ["finetune", "table"]),
    ("empty check", "[finetune.l0]\n", ["finetune.l0", "no bound"]),
    ("min above max", "[finetune.l0]\nmin = 5\nmax = 1\n", ["finetune.l0", "min", "never pass"]),
    ("interval bound typo", "[finetune.ce_loss_delta]\nmax_increse_ci_high = 0.4\n", ["max_increse_ci_high", "did you mean 'max_increase_ci_high'"]),
    ("ratio bound typo", "[finetune.l0]\nmin_ratio_to_bas = 0.7\n", ["min_ratio_to_bas", "did you mean 'min_ratio_to_base'"]),
    ("interval twin on paired", "[paired.feature_transfer_rate]\nmin_ratio_ci_low = 0.5\n", ["min_ratio_ci_low", "finetune", "did you mean 'min'"]),
    ("ratio floor on paired", "[paired.feature_transfer_rate]\nmin_ratio_to_base = 0.5\n", ["min_ratio_to_base", "did you mean 'min'"]),
    ("interval twin on base", "[base.kl_div_spliced]\nmax_increase_ci_high = 0.5\n", ["max_increase_ci_high", "did you mean [finetune.kl_div_spliced]"]),
    ("ratio floor above ceiling", "[finetune.l0]\nmin_ratio_to_base = 2\nmax_ratio_to_base = 1.5\n", ["min_ratio_to_base", "never pass"]),
    ("interval ratio floor above ceiling", "[finetune.l0]\nmin_ratio_ci_low = 2\nmax_ratio_ci_high = 1.5\n", ["min_ratio_ci_low", "never pass"]),
    ("interval bound not a number", '[finetune.l0]\nmax_ratio_ci_high = "1.6"\n', ["'max_ratio_ci_high'", "must be a number"]),
    ("if_undefined value", '[paired.feature_transfer_rate]\nmin = 0.5\nif_undefined = "skip"\n', ["if_undefined", "'fail'", "'warn'"]),
    ("if_undefined typo", '[paired.feature_transfer_rate]\nmin = 0.5\nif_undefind = "warn"\n', ["if_undefind", "did you mean 'if_undefined'"]),
    ("if_undefined type", "[paired.feature_transfer_rate]\nmin = 0.5\nif_undefined = true\n", ["if_undefined", "boolean"]),
    ("new paired metric typo", "[paired.feature_transfer_rat]\nmin = 0.5\n", ["feature_transfer_rat", "did you mean 'feature_transfer_rate'"]),
    ("new paired metric without scope", "[dense_shift_fraction]\nmax = 0.1\n", ["[paired.dense_shift_fraction]"]),
]


@pytest.mark.parametrize("label,text,expected", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_raise_profile_error(tmp_path, label, text, expected):
    path = _write(tmp_path, "bad_profile.toml", text)
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    msg = str(err.value)
    assert "bad_profile.toml" in msg, msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_bad_file_reached_through_extends_names_that_file(tmp_path):
    _write(tmp_path, "broken.toml", "[finetune.ce_loss_detla]\nmax = 0.5\n")
    child = _write(tmp_path, "ok.toml", '[profile]\nextends = "broken.toml"\n')
    with pytest.raises(ProfileError, match=r"broken\.toml.*did you mean 'ce_loss_delta'"):
        load_profile(child)


def test_threshold_file_is_data_not_code(tmp_path):
    marker = tmp_path / "pwned"
    text = f'[profile]\ndescription = "__import__(\'pathlib\').Path(\'{marker}\').touch()"\n[finetune.l0]\nmax = 1\n'
    profile = load_profile(_write(tmp_path, "data.toml", text))
    assert "__import__" in profile.description
    assert not marker.exists()


# --------------------------------------------------------------------------- bounds


def _profile(*specs: CheckSpec) -> Profile:
    return Profile(name="t", path=None, description="", checks=tuple(specs), settings={})


def _one(bound_key: str, bound: float, *, scope: str = "finetune", metric: str = "l0", severity: str = "fail"):
    return _profile(CheckSpec(scope=scope, metric=metric, bounds=((bound_key, bound),), severity=severity))


def _eval(profile, ft=None, base=None, paired=None, ft_ci=None, base_ci=None, paired_ci=None, missing="fail"):
    return evaluate_pair(
        profile,
        base or {},
        ft or {},
        paired or {},
        base_ci=base_ci or {},
        finetune_ci=ft_ci or {},
        paired_ci=paired_ci or {},
        missing=missing,
    )


@pytest.mark.parametrize(
    "bound_key,bound,ft,base,ci,passed,value",
    [
        ("max", 0.5, 0.5, None, None, True, 0.5),
        ("max", 0.5, 0.5000001, None, None, False, 0.5000001),
        ("max", 0.5, 0.4999999, None, None, True, 0.4999999),
        ("max", 0.0, 0.0, None, None, True, 0.0),
        ("max", 0.0, 1e-300, None, None, False, 1e-300),
        ("min", 0.4, 0.4, None, None, True, 0.4),
        ("min", 0.4, 0.3999999, None, None, False, 0.3999999),
        ("min", -1.0, -0.5, None, None, True, -0.5),
        ("max_increase_over_base", 0.3, 0.8, 0.5, None, True, 0.8 - 0.5),  # 0.30000000000000004
        ("max_increase_over_base", 0.3, 0.8001, 0.5, None, False, 0.8001 - 0.5),
        ("max_increase_over_base", 0.3, 0.1, 0.5, None, True, 0.1 - 0.5),
        ("max_decrease_from_base", 0.2, 0.48, 0.68, None, True, 0.68 - 0.48),
        ("max_decrease_from_base", 0.2, 0.4799, 0.68, None, False, 0.68 - 0.4799),
        ("max_decrease_from_base", 0.2, 0.9, 0.68, None, True, 0.68 - 0.9),
        ("max_ratio_to_base", 1.5, 90.0, 60.0, None, True, 1.5),
        ("max_ratio_to_base", 1.5, 90.01, 60.0, None, False, 90.01 / 60.0),
        ("max_ratio_to_base", 1.1, 3.3, 3.0, None, True, 3.3 / 3.0),  # 1.0999999999999999
        ("min_ci_low", 0.45, 0.6, None, (0.45, 0.7), True, 0.45),
        ("min_ci_low", 0.45, 0.6, None, (0.4499, 0.7), False, 0.4499),
        ("max_ci_high", 0.6, 0.5, None, (0.4, 0.6), True, 0.6),
        ("max_ci_high", 0.6, 0.5, None, (0.4, 0.6001), False, 0.6001),
    ],
)
def test_bound_kinds_at_and_around_the_boundary(bound_key, bound, ft, base, ci, passed, value):
    profile = _one(bound_key, bound)
    results = _eval(
        profile,
        ft={"l0": ft},
        base={"l0": base} if base is not None else {},
        ft_ci={"l0": list(ci)} if ci else {},
    )
    assert len(results) == 1
    r = results[0]
    assert r.passed is passed, r.message
    assert r.value == pytest.approx(value, rel=1e-12, abs=1e-300)
    assert r.op == BOUND_KEYS[bound_key]
    assert r.bound == bound
    assert r.base_value == base
    assert r.ci95 == (tuple(ci) if ci else None)
    assert r.metric == "finetune.l0"
    assert "\n" not in r.message


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(value=finite, bound=finite)
def test_property_max_and_min(value, bound):
    (r,) = _eval(_one("max", bound), ft={"l0": value})
    assert r.passed is (value <= bound)
    (r,) = _eval(_one("min", bound, scope="paired", metric="resid_cosine_mean"), paired={"resid_cosine_mean": value})
    assert r.passed is (value >= bound)


@settings(max_examples=300, deadline=None)
@given(lo=finite, width=st.floats(min_value=0, max_value=1e6), bound=finite)
def test_property_ci_bounds(lo, width, bound):
    ci = [lo, lo + width]
    (r,) = _eval(_one("min_ci_low", bound), ft_ci={"l0": ci})
    assert r.passed is (ci[0] >= bound) and r.value == ci[0]
    (r,) = _eval(_one("max_ci_high", bound, scope="base"), base_ci={"l0": ci})
    assert r.passed is (ci[1] <= bound) and r.value == ci[1]
    (r,) = _eval(
        _one("max_ci_high", bound, scope="paired", metric="resid_cosine_mean"), paired_ci={"resid_cosine_mean": ci}
    )
    assert r.passed is (ci[1] <= bound)


@settings(max_examples=300, deadline=None)
@given(ft=finite, base=finite, bound=finite)
def test_property_relative_bounds(ft, base, bound):
    tol = 1e-9 * max(abs(ft), abs(base), abs(bound))
    (r,) = _eval(_one("max_increase_over_base", bound), ft={"l0": ft}, base={"l0": base})
    inc = ft - base
    if abs(inc - bound) > tol:
        assert r.passed is (inc < bound)
    assert r.value == inc and r.base_value == base

    (r,) = _eval(_one("max_decrease_from_base", bound), ft={"l0": ft}, base={"l0": base})
    dec = base - ft
    if abs(dec - bound) > tol:
        assert r.passed is (dec < bound)

    for key, upper in (("max_ratio_to_base", True), ("min_ratio_to_base", False)):
        (r,) = _eval(_one(key, bound), ft={"l0": ft}, base={"l0": base})
        if base == 0 and ft != 0:
            assert r.passed is False and "undefined" in r.message and r.value is None
            continue
        ratio = 1.0 if base == 0 else ft / base  # 0 / 0: the values are equal, nothing changed
        assert r.value == ratio
        if abs(ratio - bound) > 1e-9 * max(abs(ratio), abs(bound)):
            assert r.passed is ((ratio < bound) if upper else (ratio > bound))


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(min_value=0.01, max_value=100),
    cents=st.integers(min_value=0, max_value=1000),
)
def test_property_decimal_boundaries_pass(base, cents):
    """A finetune exactly `bound` above the base passes, whatever the binary rounding."""
    bound = cents / 100
    (r,) = _eval(_one("max_increase_over_base", bound), ft={"l0": base + bound}, base={"l0": base})
    assert r.passed, r.message
    (r,) = _eval(_one("max_decrease_from_base", bound), ft={"l0": base - bound}, base={"l0": base})
    assert r.passed, r.message
    (r,) = _eval(_one("max_ratio_to_base", bound + 0.01), ft={"l0": base * (bound + 0.01)}, base={"l0": base})
    assert r.passed, r.message


def test_ids_ops_and_messages():
    profile = _profile(
        CheckSpec("finetune", "ce_loss_delta", (("max", 0.5), ("max_increase_over_base", 0.3), ("max_ci_high", 0.6))),
        CheckSpec("finetune", "l0", (("max_ratio_to_base", 1.5),)),
        CheckSpec("finetune", "explained_variance", (("min", 0.4), ("min_ci_low", 0.45))),
        CheckSpec("finetune", "r2_pooled", (("max_decrease_from_base", 0.2),)),
        CheckSpec("paired", "resid_cosine_mean", (("min", 0.9),)),
        CheckSpec("finetune", "nonfinite_fraction", (("max", 0.0),)),
    )
    results = _eval(
        profile,
        base={"ce_loss_delta": 0.51, "l0": 50, "explained_variance": 0.9, "r2_pooled": 0.9},
        ft={"ce_loss_delta": 4.21, "l0": 80, "explained_variance": 0.5, "r2_pooled": -10.27, "nonfinite_fraction": 0.0},
        paired={"resid_cosine_mean": 0.95},
        ft_ci={"ce_loss_delta": [4.0, 4.4], "explained_variance": [0.42, 0.55]},
    )
    by_id = {r.id: r for r in results}
    assert list(by_id) == [
        "finetune.ce_loss_delta<=0.5",
        "finetune.ce_loss_delta:increase<=0.3",
        "finetune.ce_loss_delta:ci_high<=0.6",
        "finetune.l0:ratio<=1.5",
        "finetune.explained_variance>=0.4",
        "finetune.explained_variance:ci_low>=0.45",
        "finetune.r2_pooled:decrease<=0.2",
        "paired.resid_cosine_mean>=0.9",
        "finetune.nonfinite_fraction<=0",
    ]
    assert by_id["finetune.ce_loss_delta<=0.5"].message == (
        "finetune.ce_loss_delta = 4.21 > max 0.5 (base 0.51, ci95 [4, 4.4])"
    )
    inc = by_id["finetune.ce_loss_delta:increase<=0.3"]
    assert inc.value == pytest.approx(3.7) and not inc.passed
    assert "3.7" in inc.message and "> max_increase_over_base 0.3" in inc.message
    ci_hi = by_id["finetune.ce_loss_delta:ci_high<=0.6"]
    assert ci_hi.value == 4.4 and ci_hi.ci95 == (4.0, 4.4) and "4.4 > max_ci_high 0.6" in ci_hi.message
    ratio = by_id["finetune.l0:ratio<=1.5"]
    assert ratio.value == pytest.approx(1.6) and ratio.op == "ratio<=" and ratio.base_value == 50
    ev_low = by_id["finetune.explained_variance:ci_low>=0.45"]
    assert ev_low.value == 0.42 and not ev_low.passed and "0.42 < min_ci_low 0.45" in ev_low.message
    assert by_id["finetune.explained_variance>=0.4"].passed
    dec = by_id["finetune.r2_pooled:decrease<=0.2"]
    assert dec.value == pytest.approx(11.17) and "(-10.27)" in dec.message
    assert by_id["paired.resid_cosine_mean>=0.9"].passed and by_id["paired.resid_cosine_mean>=0.9"].base_value is None
    assert by_id["finetune.nonfinite_fraction<=0"].passed


@pytest.mark.parametrize(
    "bound_key,bound,delta,ratio,passed,value",
    [
        ("max_increase_ci_high", 0.4, (0.1, 0.4), None, True, 0.4),
        ("max_increase_ci_high", 0.4, (0.1, 0.4001), None, False, 0.4001),
        ("max_decrease_ci_high", 0.3, (-0.3, -0.1), None, True, 0.3),  # decrease interval [0.1, 0.3]
        ("max_decrease_ci_high", 0.3, (-0.3001, -0.1), None, False, 0.3001),
        ("max_ratio_ci_high", 1.6, None, (1.2, 1.6), True, 1.6),
        ("max_ratio_ci_high", 1.6, None, (1.2, 1.6001), False, 1.6001),
        ("min_ratio_ci_low", 0.62, None, (0.62, 0.9), True, 0.62),
        ("min_ratio_ci_low", 0.62, None, (0.6199, 0.9), False, 0.6199),
    ],
)
def test_interval_twins_check_the_paired_interval_end(bound_key, bound, delta, ratio, passed, value):
    profile = _one(bound_key, bound)
    (r,) = evaluate_pair(
        profile, {"l0": 50.0}, {"l0": 60.0}, {},
        finetune_ci={"l0": [59.0, 61.0]},  # the finetune's own interval: never the one checked here
        delta_ci={"l0": list(delta)} if delta else {}, ratio_ci={"l0": list(ratio)} if ratio else {},
    )
    assert r.passed is passed, r.message
    assert r.value == pytest.approx(value, rel=1e-12)
    assert r.op == BOUND_KEYS[bound_key] and r.base_value == 50.0
    checked = delta if delta else ratio
    expected_ci = (-checked[1], -checked[0]) if bound_key == "max_decrease_ci_high" else checked
    assert r.ci95 == pytest.approx(expected_ci)
    assert "paired ci95" in r.message and "[59, 61]" not in r.message
    assert r.id == f"finetune.l0:{BOUND_KEYS[bound_key]}{bound:g}"


@settings(max_examples=200, deadline=None)
@given(lo=finite, width=st.floats(min_value=0, max_value=1e6), bound=finite)
def test_property_interval_twins(lo, width, bound):
    ci = [lo, lo + width]
    (r,) = evaluate_pair(_one("max_increase_ci_high", bound), {}, {}, {}, delta_ci={"l0": ci})
    assert r.passed is (ci[1] <= bound) and r.value == ci[1]
    (r,) = evaluate_pair(_one("max_decrease_ci_high", bound), {}, {}, {}, delta_ci={"l0": ci})
    assert r.passed is (-ci[0] <= bound) and r.value == -ci[0]
    (r,) = evaluate_pair(_one("max_ratio_ci_high", bound), {}, {}, {}, ratio_ci={"l0": ci})
    assert r.passed is (ci[1] <= bound)
    (r,) = evaluate_pair(_one("min_ratio_ci_low", bound), {}, {}, {}, ratio_ci={"l0": ci})
    assert r.passed is (ci[0] >= bound)


def test_relative_checks_quote_the_paired_interval_of_what_they_check():
    """An increase is shown with the interval of the increase, not of the finetune's value."""
    profile = _profile(
        CheckSpec("finetune", "ce_loss_delta", (("max", 0.5), ("max_increase_over_base", 0.3))),
        CheckSpec("finetune", "explained_variance", (("max_decrease_from_base", 0.25),)),
        CheckSpec("finetune", "l0", (("max_ratio_to_base", 1.5), ("min_ratio_to_base", 0.66))),
    )
    results = evaluate_pair(
        profile,
        {"ce_loss_delta": 0.07, "explained_variance": 0.83, "l0": 49.0},
        {"ce_loss_delta": 0.27, "explained_variance": 0.46, "l0": 91.0},
        {},
        finetune_ci={"ce_loss_delta": [0.257, 0.292], "explained_variance": [0.44, 0.47], "l0": [89.0, 93.0]},
        delta_ci={"ce_loss_delta": [0.19, 0.21], "explained_variance": [-0.39, -0.36]},
        ratio_ci={"l0": [1.8, 1.9]},
    )
    by_id = {r.id: r for r in results}
    absolute = by_id["finetune.ce_loss_delta<=0.5"]
    assert absolute.ci95 == (0.257, 0.292) and "ci95 [0.257, 0.292]" in absolute.message
    inc = by_id["finetune.ce_loss_delta:increase<=0.3"]
    assert inc.ci95 == (0.19, 0.21) and inc.message.endswith("(paired ci95 [0.19, 0.21])")
    assert "0.257" not in inc.message and "0.292" not in inc.message
    dec = by_id["finetune.explained_variance:decrease<=0.25"]
    assert dec.ci95 == (0.36, 0.39) and not dec.passed and "paired ci95 [0.36, 0.39]" in dec.message
    assert "0.44" not in dec.message
    hi, lo = by_id["finetune.l0:ratio<=1.5"], by_id["finetune.l0:ratio>=0.66"]
    assert hi.ci95 == lo.ci95 == (1.8, 1.9) and not hi.passed and lo.passed
    assert "ratio to base = 1.857 (91 / base 49) > max_ratio_to_base 1.5" in hi.message
    assert "ratio to base = 1.857 (91 / base 49) >= min_ratio_to_base 0.66" in lo.message
    assert "[89, 93]" not in hi.message + lo.message
    # without paired intervals, a relative result carries none (rather than the wrong one)
    (r,) = evaluate_pair(_one("max_ratio_to_base", 1.5), {"l0": 49.0}, {"l0": 91.0}, {}, finetune_ci={"l0": [89.0, 93.0]})
    assert r.ci95 is None and "ci95" not in r.message


def test_zero_over_zero_is_no_change():
    """A dead SAE stays dead on an unchanged model: L0 0 / 0 is a ratio of 1, not a failure."""
    for key in ("max_ratio_to_base", "min_ratio_to_base"):
        (r,) = _eval(_one(key, 1.5 if key.startswith("max") else 0.66), ft={"l0": 0.0}, base={"l0": 0.0})
        assert r.passed and r.value == 1.0 and "both 0" in r.message
    (r,) = _eval(_one("min_ratio_to_base", 0.66), ft={"l0": 3.0}, base={"l0": 0.0})
    assert not r.passed and "undefined" in r.message


def test_if_undefined_warn_turns_a_null_value_into_a_warning():
    spec = CheckSpec("paired", "feature_transfer_rate", (("min", 0.5),), if_undefined="warn")
    for raw, word in ((None, "null"), (float("nan"), "NaN")):
        (r,) = evaluate_pair(_profile(spec), {}, {}, {"feature_transfer_rate": raw})
        assert not r.passed and r.severity == "warn" and r.value is None
        assert word in r.message and "undefined on this run" in r.message
        assert evaluate_pair(_profile(spec), {}, {}, {"feature_transfer_rate": raw}, missing="skip") == []
    # absent from the report is not "undefined": it fails
    (r,) = evaluate_pair(_profile(spec), {}, {}, {})
    assert not r.passed and r.severity == "fail" and "missing" in r.message
    # a value is judged as usual
    (r,) = evaluate_pair(_profile(spec), {}, {}, {"feature_transfer_rate": 0.2})
    assert not r.passed and r.severity == "fail"
    # the default (if_undefined = "fail") keeps failing on null
    plain = dataclasses.replace(spec, if_undefined="fail")
    (r,) = evaluate_pair(_profile(plain), {}, {}, {"feature_transfer_rate": None})
    assert not r.passed and r.severity == "fail"
    # relative bounds: a null base value warns too, as does a missing paired interval of a null value
    rel = CheckSpec("finetune", "kl_div_spliced", (("max_increase_over_base", 0.6), ("max_increase_ci_high", 0.8)),
                    if_undefined="warn")
    results = evaluate_pair(_profile(rel), {"kl_div_spliced": None}, {"kl_div_spliced": 0.3}, {})
    assert [r.severity for r in results] == ["warn", "warn"] and not any(r.passed for r in results)
    assert "base.kl_div_spliced is null" in results[0].message


def test_failed_base_checks_say_it_is_the_sae_not_the_finetune():
    spec = CheckSpec("base", "ce_loss_recovered", (("min", 0.9),), severity="warn")
    (r,) = evaluate_pair(_profile(spec), {"ce_loss_recovered": 0.62}, {}, {})
    assert not r.passed and "the SAE's own quality on the base model" in r.message
    (r,) = evaluate_pair(_profile(spec), {"ce_loss_recovered": 0.97}, {}, {})
    assert r.passed and "own quality" not in r.message
    run = CheckSpec("base", "nonfinite_fraction", (("max", 0.0),))
    (r,) = evaluate_pair(_profile(run), {"nonfinite_fraction": 0.1}, {}, {})
    assert not r.passed and "own quality" not in r.message  # a broken run, not a weak SAE


def test_message_shows_difference_near_the_bound():
    (r,) = _eval(_one("max", 0.5), ft={"l0": 0.50000001})
    assert not r.passed
    left, right = r.message.split(" > max ")
    assert left.split(" = ")[1] != right.split(" ")[0]


# --------------------------------------------------------------------------- missing values


@pytest.mark.parametrize(
    "metrics,word",
    [({}, "missing"), ({"l0": None}, "null"), ({"l0": float("nan")}, "NaN")],
)
def test_missing_null_nan_fail_or_skip(metrics, word):
    profile = _one("max", 100)
    (r,) = _eval(profile, ft=metrics)
    assert not r.passed and r.value is None and word in r.message and "finetune.l0" in r.message
    assert _eval(profile, ft=metrics, missing="skip") == []


def test_missing_base_for_relative_bound():
    profile = _one("max_ratio_to_base", 1.5)
    (r,) = _eval(profile, ft={"l0": 10})
    assert not r.passed and "base.l0" in r.message and "missing" in r.message
    assert _eval(profile, ft={"l0": 10}, missing="skip") == []
    (r,) = _eval(profile, ft={"l0": 10}, base={"l0": float("nan")})
    assert not r.passed and "NaN" in r.message


def test_missing_ci():
    profile = _one("min_ci_low", 0.1)
    (r,) = _eval(profile, ft={"l0": 1.0})
    assert not r.passed and "ci95" in r.message
    assert _eval(profile, ft={"l0": 1.0}, missing="skip") == []
    (r,) = _eval(profile, ft={"l0": 1.0}, ft_ci={"l0": [None, 2.0]})
    assert not r.passed


def test_always_failing_values_even_in_skip_mode():
    for missing in ("fail", "skip"):
        (r,) = _eval(_one("min", 0.0), ft={"l0": float("inf")}, missing=missing)
        assert not r.passed and "not finite" in r.message
        (r,) = _eval(_one("max", 1.0), ft={"l0": [0.1, 0.2]}, missing=missing)
        assert not r.passed and "list" in r.message
        (r,) = _eval(_one("max", 1.0), ft={"l0": "0.5"}, missing=missing)
        assert not r.passed and "not a number" in r.message
        (r,) = _eval(_one("max_ratio_to_base", 1.5), ft={"l0": 3.0}, base={"l0": 0}, missing=missing)
        assert not r.passed and "undefined" in r.message


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    (r,) = _eval(_one("max", 1.0), ft={"l0": np.float32(0.5)}, ft_ci={})
    assert r.passed and isinstance(r.value, float)
    (r,) = _eval(_one("max_ci_high", 1.0), ft_ci={"l0": np.array([0.1, 0.9])})
    assert r.passed and r.ci95 == (pytest.approx(0.1), pytest.approx(0.9))


def test_bad_missing_mode():
    with pytest.raises(ValueError, match="missing"):
        _eval(_one("max", 1.0), ft={"l0": 0.5}, missing="ignore")


# --------------------------------------------------------------------------- reports


def _report(ft_metrics: dict, paired: dict, ft_ci=None, name="ft") -> TransferReport:
    base = ModelResult(
        model="base",
        metrics={"l0": 50.0, "ce_loss_delta": 0.1, "nonfinite_fraction": 0.0},
        ci95={"ce_loss_delta": [0.08, 0.12]},
    )
    ft = FinetuneResult(model=name, metrics=ft_metrics, ci95=ft_ci or {}, paired=paired)
    return TransferReport(config={}, base=base, finetunes=[ft])


def test_evaluate_checks_fills_report_and_passed(tmp_path):
    path = _write(
        tmp_path,
        "gate.toml",
        """
[base.nonfinite_fraction]
max = 0

[finetune.ce_loss_delta]
max = 0.5
max_increase_over_base = 0.3
max_ci_high = 0.6

[finetune.l0]
max_ratio_to_base = 1.5

[paired.resid_cosine_mean]
min = 0.9

[paired.logit_similarity_mean]
min = 0.98
severity = "warn"
""",
    )
    profile = load_profile(path)
    good = {"l0": 60.0, "ce_loss_delta": 0.2, "nonfinite_fraction": 0.0}
    paired_good = {"resid_cosine_mean": 0.95, "logit_similarity_mean": 0.9}  # warning fails
    report = _report(good, paired_good, ft_ci={"ce_loss_delta": [0.15, 0.25]})
    report.finetunes.append(
        FinetuneResult(
            model="bad",
            metrics={"l0": 100.0, "ce_loss_delta": 0.2},
            ci95={"ce_loss_delta": [0.1, 0.3]},
            paired={"resid_cosine_mean": 0.95, "logit_similarity_mean": 0.99},
        )
    )
    report.finetunes[0].checks = [CheckResult("stale", "x", "<=", 0, 1, False)]
    evaluate_checks(profile, report)

    ok, bad = report.finetunes
    assert [c.id for c in ok.checks] == [
        "base.nonfinite_fraction<=0",
        "finetune.ce_loss_delta<=0.5",
        "finetune.ce_loss_delta:increase<=0.3",
        "finetune.ce_loss_delta:ci_high<=0.6",
        "finetune.l0:ratio<=1.5",
        "paired.resid_cosine_mean>=0.9",
        "paired.logit_similarity_mean>=0.98",
    ]
    warn = ok.checks[-1]
    assert warn.severity == "warn" and not warn.passed
    assert ok.passed is True  # a failed warning does not fail the finetune
    assert [c.id for c in bad.checks if not c.passed] == ["finetune.l0:ratio<=1.5"]
    assert bad.passed is False
    assert report.passed is False
    assert bad.checks[1].base_value == 0.1 and bad.checks[1].ci95 == (0.1, 0.3)

    # The filled report round-trips through JSON (no NaN, tuples as lists).
    out = report.write_json(tmp_path / "report.json")
    again = TransferReport.read_json(out)
    assert [c.to_json() for c in again.finetunes[1].checks] == [c.to_json() for c in bad.checks]
    assert read_one_sae(out)["finetunes"][1]["passed"] is False


def test_evaluate_checks_missing_modes_on_report():
    profile = load_profile("default")
    report = _report({"l0": 60.0}, {})
    evaluate_checks(profile, report)  # missing="fail": nearly everything is missing
    ft = report.finetunes[0]
    assert ft.passed is False
    assert all(c.value is None for c in ft.checks if not c.passed and c.metric != "finetune.l0")
    # without paired intervals the interval twins cannot be checked, and say why
    twin = next(c for c in ft.checks if c.id == "finetune.l0:ratio_ci_high<=1.6")
    assert not twin.passed and "no paired interval" in twin.message and "ratio_ci95" in twin.message
    evaluate_checks(profile, report, missing="skip")
    assert [c.id for c in ft.checks] == ["base.nonfinite_fraction<=0", "finetune.l0:ratio<=1.5", "finetune.l0:ratio>=0.66"]
    # (the evidence check, finetune.n_tokens>=1000, has no input here: skipped too)
    assert ft.passed is True
    # the paired intervals on the result are read by evaluate_checks
    ft.ratio_ci95 = {"l0": [1.1, 1.3]}
    evaluate_checks(profile, report, missing="skip")
    assert "finetune.l0:ratio_ci_high<=1.6" in [c.id for c in ft.checks]
    ratio = next(c for c in ft.checks if c.id == "finetune.l0:ratio<=1.5")
    assert ratio.ci95 == (1.1, 1.3) and "paired ci95 [1.1, 1.3]" in ratio.message


def test_default_gate_on_a_full_report_with_nonfinite():
    """Every default check has an input in a complete report; a non-finite token fails the gate."""
    profile = load_profile("default")
    base = {k: 0.0 for k in MODEL_METRIC_KEYS}
    base.update(l0=50.0, ce_loss_delta=0.1, ce_loss_recovered=0.95, kl_div_spliced=0.2, explained_variance=0.8,
                r2_pooled=0.85, dense_fraction=0.01, n_tokens=32000)
    ft = dict(base, l0=55.0, ce_loss_delta=0.15, ce_loss_recovered=0.93, kl_div_spliced=0.3, explained_variance=0.75,
              r2_pooled=0.8)
    paired = {k: 0.0 for k in CHECKABLE_PAIRED_KEYS}
    paired.update(
        resid_cosine_mean=0.97,
        activation_similarity_mean=0.9,
        density_log10_pearson=0.95,
        density_log10_pearson_resolved=0.95,
        dead_shift_fraction=0.01,
        dense_shift_fraction=0.02,
        feature_transfer_rate=0.9,
        logit_similarity_mean=0.999,
        weight_deviation=[0.01, 0.02],
        resid_cosine_by_position=[0.9, None],
    )
    ci = {"ce_loss_delta": [0.12, 0.18], "explained_variance": [0.7, 0.8], "l0": [54.0, 56.0]}
    delta = {k: [ft[k] - base[k] - 0.02, ft[k] - base[k] + 0.02] for k in MODEL_METRIC_KEYS}
    ratio = {"l0": [1.05, 1.15]}
    results = evaluate_pair(profile, base, ft, paired, finetune_ci=ci, delta_ci=delta, ratio_ci=ratio)
    assert results and all(r.passed for r in results), [r.message for r in results if not r.passed]
    assert len(results) == sum(len(c.bounds) for c in profile.checks)

    results = evaluate_pair(profile, base, dict(ft, nonfinite_fraction=1e-6), paired, finetune_ci=ci, delta_ci=delta,
                            ratio_ci=ratio)
    assert [r.id for r in results if not r.passed] == ["finetune.nonfinite_fraction<=0"]


def test_check_ids_are_unique_and_readable_in_bundled_profiles():
    pattern = re.compile(r"^(base|finetune|paired)\.[a-z0-9_]+(:[a-z_]+)?(<=|>=)-?[0-9.e+-]+$")
    for name in available_profiles():
        profile = load_profile(name)
        results = evaluate_pair(profile, {}, {}, {})
        ids = [r.id for r in results]
        assert len(ids) == len(set(ids))
        assert all(pattern.match(i) for i in ids), ids
        assert not any(math.isnan(r.bound) for r in results)


def test_planned_checks_are_what_evaluate_pair_returns():
    """Gate items are collected from planned_checks; each must find its result, in order."""
    from pytest_sae_transfer.thresholds import planned_checks

    for name in available_profiles():
        profile = load_profile(name)
        planned = planned_checks(profile)
        for missing_values in ({}, {"l0": 50.0, "ce_loss_delta": 0.1}):
            results = evaluate_pair(profile, missing_values, missing_values, {})
            assert [(r.id, r.metric) for r in results] == [(cid, metric) for cid, metric, _ in planned]
        assert [sev for _, _, sev in planned] == [s.severity for s in profile.checks for _ in s.bounds]


def test_an_interval_too_wide_to_decide_says_how_many_tokens_would():
    """The point value is within the bound but the paired interval is not: the check fails as
    undecided, and estimates the tokens that would narrow the interval enough (its half-width
    shrinks as 1/sqrt(tokens))."""
    spec = CheckSpec("finetune", "ce_loss_delta", (("max_increase_ci_high", 0.4),))
    base, ft = {"ce_loss_delta": 0.1}, {"ce_loss_delta": 0.3, "n_tokens": 8000}
    (r,) = evaluate_pair(_profile(spec), base, ft, {}, delta_ci={"ce_loss_delta": [0.1, 0.5]})
    assert not r.passed
    # the point (0.2) is 0.2 below the bound; the interval's end (0.5) 0.3 above the point:
    # 8000 x (0.3 / 0.2)^2 = 18,000 tokens
    assert "too wide to decide on 8,000 tokens: about 18,000 would" in r.message, r.message
    (r,) = evaluate_pair(_profile(spec), base, ft, {}, delta_ci={"ce_loss_delta": [0.1, 0.35]})
    assert r.passed and "too wide" not in r.message
    # a point value past the bound is a plain failure, not a question of evidence
    (r,) = evaluate_pair(_profile(spec), base, dict(ft, ce_loss_delta=0.6), {}, delta_ci={"ce_loss_delta": [0.4, 0.6]})
    assert not r.passed and "too wide" not in r.message
