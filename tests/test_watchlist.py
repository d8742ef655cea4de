"""Feature watchlists: the [features] table of a profile, command-line ids, and their checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_sae_transfer.errors import InputError
from pytest_sae_transfer.thresholds import ProfileError, load_profile
from pytest_sae_transfer.thresholds.watch_checks import evaluate_watchlist, feature_name, planned_watch_checks
from pytest_sae_transfer.thresholds.watchlist import (
    WATCH_BOUNDS,
    WatchedFeature,
    Watchlist,
    add_watch_ids,
    check_ids_in_range,
    parse_feature_ids,
)

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


EXAMPLE = """
[profile]
extends = "default"

[features]
ids = [12, 40]
file = "watched.txt"
min_firings = 5

[features.defaults]
min_activation_similarity = 0.8
must_stay_alive = true

[features.311]
label = "def keyword"
min_activation_similarity = 0.9
max_density_ratio = 4
min_density_ratio = 0.25
severity = "warn"
"""


@pytest.fixture
def example(tmp_path):
    _write(tmp_path, "watched.txt", "# features our probes read\n\n7 deception\n40  refusal, strict\n311 from the file\n")
    return load_profile(str(_write(tmp_path, "gate.toml", EXAMPLE)))


def test_profile_with_a_features_table(example):
    watch = example.features
    assert watch.ids == [12, 40, 7, 311]
    assert [f.label for f in watch.features] == [None, None, "deception", "def keyword"]
    assert watch.min_firings == 5
    resolved = {f.id: (bounds, sev) for f, bounds, sev in watch.resolved()}
    assert resolved[12] == ((("min_activation_similarity", 0.8), ("must_stay_alive", True)), "fail")
    assert resolved[311] == (
        (("min_activation_similarity", 0.9), ("max_density_ratio", 4.0), ("min_density_ratio", 0.25)), "warn")
    assert example.check("finetune.ce_loss_delta") is not None  # the inherited checks are still there
    assert watch.feature(7).source.endswith("watched.txt:3")


def test_planned_ids_read_well(example):
    planned = planned_watch_checks(example.features)
    ids = [p[0] for p in planned]
    assert ids[:2] == ["feature[12].activation_similarity>=0.8", "feature[12].stays_alive"]
    assert "feature[7 'deception'].activation_similarity>=0.8" in ids
    assert ids[-3:] == [
        "feature[311 'def keyword'].activation_similarity>=0.9",
        "feature[311 'def keyword'].density_ratio<=4",
        "feature[311 'def keyword'].density_ratio>=0.25",
    ]
    assert planned[-1][1:] == ("feature[311].density_ratio", "warn")
    assert len(set(ids)) == len(ids)


def test_inheritance_adds_replaces_and_drops(tmp_path, example):
    _write(tmp_path, "watched.txt", "7\n")
    _write(tmp_path, "parent.toml", EXAMPLE.replace('extends = "default"', ""))
    child = load_profile(str(_write(tmp_path, "child.toml", """
[profile]
extends = "parent.toml"
[features]
ids = [311, 5]         # 311 stays as the parent has it
severity = "warn"
[features.defaults]
min_logit_similarity = 0.5
[features.12]
enabled = false
[features.40]
label = "refusal"
must_stay_alive = true
""")))
    watch = child.features
    assert watch.ids == [40, 7, 311, 5]
    assert watch.feature(311).bounds == (("min_activation_similarity", 0.9), ("max_density_ratio", 4.0),
                                          ("min_density_ratio", 0.25))
    assert watch.feature(40).label == "refusal" and watch.feature(40).bounds == (("must_stay_alive", True),)
    resolved = {f.id: (b, s) for f, b, s in watch.resolved()}
    assert resolved[5] == ((("min_logit_similarity", 0.5),), "warn")  # the child's defaults, as a whole
    assert resolved[311][1] == "warn"
    assert watch.min_firings == 5  # inherited


def test_the_default_profile_watches_nothing_but_has_defaults():
    """Watched ids come from a profile or --sae-features; the default profile only says what
    such a feature must keep (so an id from the command line is never watched unchecked)."""
    watch = load_profile("default").features
    assert watch is not None and watch.features == ()
    assert dict(watch.defaults) == {"min_activation_similarity": 0.8, "must_stay_alive": True}


def test_command_line_ids_merge(example):
    assert parse_feature_ids("12, 40,311") == [12, 40, 311]
    assert parse_feature_ids("") == []
    for bad, part in (("12,,40", "empty item"), ("12,x", "'x' is not a feature id"), ("-3", "'-3'")):
        with pytest.raises(ProfileError, match=part) as err:
            parse_feature_ids(bad)
        assert str(err.value).startswith("--sae-features")
        assert isinstance(err.value, InputError)
    merged = add_watch_ids(example.features, [311, 99, 99, 3])
    assert merged.ids == [12, 40, 7, 311, 99, 3]
    assert merged.feature(311).label == "def keyword"  # kept as the profile has it
    assert merged.feature(99).source == "--sae-features"
    # Added to a profile without defaults, an id would be watched without a check: a usage error.
    bare = add_watch_ids(None, [4])
    with pytest.raises(ProfileError, match=r"--sae-features: watched feature 4 has no bounds.*\[features.defaults\]"):
        planned_watch_checks(bare)


BAD = [
    ("unknown key", "[features]\nidz = [1]\n", ["[features] key 'idz'", "did you mean 'ids'"]),
    ("ids not an array", "[features]\nids = 3\n", ["'ids'", "array"]),
    ("negative id", "[features]\nids = [3, -1]\n", ["item 1", "non-negative"]),
    ("float id", "[features]\nids = [3.0]\n", ["integer", "write 3"]),
    ("string id", "[features]\nids = ['3']\n", ["non-negative integer", "string '3'"]),
    ("bound typo", "[features.311]\nmin_activation_similiarity = 0.8\n", ["[features.311]", "did you mean 'min_activation_similarity'"]),
    ("bound in defaults typo", "[features.defaults]\nmust_stay_alvie = true\n", ["[features.defaults]", "did you mean 'must_stay_alive'"]),
    ("label not allowed in defaults", "[features.defaults]\nlabel = 'x'\n", ["[features.defaults] key 'label'"]),
    ("string bound", "[features.3]\nmin_activation_similarity = '0.8'\n", ["must be a number"]),
    ("similarity out of range", "[features.3]\nmin_logit_similarity = 1.5\n", ["[-1, 1]"]),
    ("ratio not positive", "[features.3]\nmax_density_ratio = 0\n", ["positive"]),
    ("ratios crossed", "[features.3]\nmin_density_ratio = 3\nmax_density_ratio = 2\n", ["never pass"]),
    ("alive not a bool", "[features.3]\nmust_stay_alive = 1\n", ["true or false"]),
    ("bad severity", "[features.3]\nmust_stay_alive = true\nseverity = 'warning'\n", ["did you mean 'warn'"]),
    ("label with ::", "[features.3]\nlabel = 'a::b'\n", ["'::'"]),
    ("empty label", "[features.3]\nlabel = ' '\n", ["label is empty"]),
    ("label shorthand", "[features]\n3 = 'def keyword'\n", ["[features.3]", 'label = "..."']),
    ("negative table id", '[features."-3"]\nmust_stay_alive = true\n', ["non-negative integer id"]),
    ("min_firings zero", "[features]\nmin_firings = 0\n", ["positive integer"]),
    ("missing file", "[features]\nfile = 'nope.txt'\n", ["'nope.txt' not found"]),
    ("features typo", "[feature.3]\nmust_stay_alive = true\n", ["did you mean 'features'"]),
    ("enabled not bool", "[features.3]\nenabled = 'no'\n", ["'enabled'", "true or false"]),
]


@pytest.mark.parametrize("label,text,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_features_tables_are_usage_errors(tmp_path, label, text, expected):
    path = _write(tmp_path, "bad_profile.toml", text)
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    msg = str(err.value)
    assert "bad_profile.toml" in msg, msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_bad_lines_of_a_feature_file_name_the_line(tmp_path):
    _write(tmp_path, "ids.txt", "12\n\n# ok\nthree hundred\n")
    with pytest.raises(ProfileError, match=r"ids\.txt:4: 'three' is not a feature id"):
        load_profile(str(_write(tmp_path, "p.toml", "[features]\nfile = 'ids.txt'\n")))


# ---------------------------------------------------------------------------- evaluation


def _vectors(**kw):
    base = {"density_base": [1e-3] * 8, "density_finetune": [1e-3] * 8, "activation_similarity": [0.9] * 8,
            "logit_similarity": [0.99] * 8, "dead_activation_error": [float("nan")] * 8}
    for key, changes in kw.items():
        for i, v in changes.items():
            base[key][i] = v
    return {k: np.array(v) for k, v in base.items()}


ALL = (("min_activation_similarity", 0.8), ("min_logit_similarity", 0.9), ("max_density_ratio", 4.0),
       ("min_density_ratio", 0.25), ("must_stay_alive", True))


def _watch(*features: WatchedFeature, defaults=ALL, min_firings=10) -> Watchlist:
    return Watchlist(features=features, defaults=defaults, min_firings=min_firings)


def _by_id(results):
    return {r.id: r for r in results}


def test_a_feature_that_transfers_passes_every_bound():
    results = evaluate_watchlist(_watch(WatchedFeature(3, "ok")), _vectors(), 100_000, 100_000)
    assert [r.passed for r in results] == [True] * 5
    assert [r.id for r in results] == [p[0] for p in planned_watch_checks(_watch(WatchedFeature(3, "ok")))]
    assert results[0].message == "feature[3 'ok'] activation similarity = 0.9 >= min 0.8 (density base 0.001, finetune 0.001)"


def test_failures_give_value_bound_and_densities():
    vectors = _vectors(activation_similarity={3: 0.42}, density_finetune={3: 5e-3})
    res = _by_id(evaluate_watchlist(_watch(WatchedFeature(3, "def keyword")), vectors, 100_000, 100_000))
    act = res["feature[3 'def keyword'].activation_similarity>=0.8"]
    assert not act.passed and act.value == pytest.approx(0.42) and act.bound == 0.8 and act.op == ">="
    assert act.message == ("feature[3 'def keyword'] activation similarity = 0.42 < min 0.8 "
                           "(density base 0.001, finetune 0.005)")
    ratio = res["feature[3 'def keyword'].density_ratio<=4"]
    assert not ratio.passed and ratio.value == pytest.approx(5.0)
    assert "density ratio finetune/base = 5 > max 4" in ratio.message
    assert res["feature[3 'def keyword'].density_ratio>=0.25"].passed


def test_near_the_bound_the_message_shows_the_difference():
    vectors = _vectors(activation_similarity={0: 0.79996})
    r = evaluate_watchlist(_watch(WatchedFeature(0)), vectors, 1e6, 1e6)[0]
    assert not r.passed and "0.79996 < min 0.8" in r.message


@pytest.mark.parametrize("changes,n_tokens,bound_key,why", [
    ({"density_base": {2: 0.0}}, 1e5, "min_activation_similarity", "dead on the base"),
    ({"density_base": {2: 0.0}}, 1e5, "must_stay_alive", "dead on the base"),
    ({"density_base": {2: 0.0}}, 1e5, "max_density_ratio", "dead on the base, so the ratio is undefined"),
    ({"density_finetune": {2: 0.0}}, 1e5, "min_activation_similarity", "turned dead"),
    ({"density_finetune": {2: 1e-5}}, 1e5, "min_activation_similarity", "fired only 1 time on the finetune,"),
    ({}, 5_000, "min_activation_similarity", "fired only 5 times on the base and 5 times on the finetune, fewer than min_firings = 10"),
    ({"density_finetune": {2: 0.5}, "activation_similarity": {2: float("nan")}}, 1e5, "min_activation_similarity",
     "not a regular feature (log10 density -0.30 on the finetune is outside [-5, -1])"),
    ({"activation_similarity": {2: float("nan")}}, 1e5, "min_activation_similarity", "undefined"),
    ({"density_finetune": {2: 0.5}, "logit_similarity": {2: float("nan")}}, 1e5, "min_logit_similarity", "regular features only"),
])
def test_cannot_judge_is_a_clear_failure(changes, n_tokens, bound_key, why):
    value = True if bound_key == "must_stay_alive" else (4.0 if "ratio" in bound_key else 0.5)
    watch = _watch(WatchedFeature(2), defaults=((bound_key, value),))
    [r] = evaluate_watchlist(watch, _vectors(**changes), n_tokens, n_tokens)
    assert not r.passed, r
    assert ("cannot judge" in r.message) and why in r.message, r.message
    assert "density base" in r.message or "missing" in r.message


def test_turned_dead_fails_must_stay_alive():
    [r] = evaluate_watchlist(_watch(WatchedFeature(1), defaults=(("must_stay_alive", True),)),
                             _vectors(density_finetune={1: 0.0}), 1e5, 1e5)
    assert not r.passed and r.id == "feature[1].stays_alive" and r.metric == "feature[1].density_finetune"
    assert "turned dead" in r.message and r.value == 0.0


def test_missing_vectors_never_pass():
    for vectors in ({}, {"density_base": np.full(4, np.nan)}, {"density_base": np.ones(4) * 1e-3}):
        results = evaluate_watchlist(_watch(WatchedFeature(1)), vectors, 1e5, 1e5)
        assert len(results) == 5 and not any(r.passed for r in results)
        assert all("cannot judge" in r.message and "missing" in r.message for r in results)


def test_ids_outside_the_sae_are_usage_errors():
    watch = add_watch_ids(_watch(WatchedFeature(3)), [8], "--sae-features")
    with pytest.raises(ProfileError, match=r"outside this SAE's 8 features \[0, 8\): 8 \(from --sae-features\)"):
        evaluate_watchlist(watch, _vectors(), 1e5, 1e5)
    with pytest.raises(ProfileError, match="8 features"):
        check_ids_in_range(watch, 8)
    check_ids_in_range(watch, 9)


def test_must_stay_alive_false_is_no_check_and_labels_are_quoted():
    watch = _watch(WatchedFeature(0, "it's"), defaults=(("must_stay_alive", False), ("min_logit_similarity", 0.5)))
    assert [p[0] for p in planned_watch_checks(watch)] == ["feature[0 'it\\'s'].logit_similarity>=0.5"]
    assert feature_name(5, None) == "feature[5]"


# ---------------------------------------------------------------------------- properties

bound_values = {
    "min_activation_similarity": st.floats(-1, 1), "min_logit_similarity": st.floats(-1, 1),
    "max_density_ratio": st.floats(0.01, 100), "min_density_ratio": st.floats(0.01, 100),
    "must_stay_alive": st.booleans(),
}
densities = st.sampled_from([0.0, 1e-7, 1e-5, 1e-3, 0.05, 0.1, 0.3, float("nan")]) | st.floats(0, 1)
sims = st.sampled_from([float("nan"), -1.0, 0.8, 1.0]) | st.floats(-1, 1)


@PROPS
@given(
    st.lists(st.sampled_from(list(WATCH_BOUNDS)), min_size=1, max_size=5, unique=True).flatmap(
        lambda keys: st.tuples(*[st.tuples(st.just(k), bound_values[k]) for k in keys])),
    densities, densities, sims, sims, st.sampled_from([0, 100, 10_000, 1_000_000]), st.integers(1, 50),
    st.none() | st.text(min_size=1, max_size=5).filter(lambda s: s.strip() and "::" not in s and s.isprintable()),
)
def test_never_a_silent_pass(bounds, d_b, d_f, act, logit, n_tokens, min_firings, label):
    """Planned ids are the evaluated ids; a passing result has a finite value that meets its
    bound, checked here from the definitions; dead, unmeasured or rarely firing features never pass
    a similarity bound."""
    watch = _watch(WatchedFeature(0, label and label.strip()), defaults=tuple(bounds), min_firings=min_firings)
    vectors = {"density_base": np.array([d_b]), "density_finetune": np.array([d_f]),
               "activation_similarity": np.array([act]), "logit_similarity": np.array([logit])}
    if not any(k != "must_stay_alive" or v for k, v in bounds):
        with pytest.raises(ProfileError, match="no bounds"):
            planned_watch_checks(watch)
        return
    results = evaluate_watchlist(watch, vectors, n_tokens, n_tokens)
    assert [r.id for r in results] == [p[0] for p in planned_watch_checks(watch)]
    checked = [(k, v) for k, v in bounds if not (k == "must_stay_alive" and v is False)]
    assert len(results) == len(checked)
    for (key, bound), r in zip(checked, results):
        fb, ff = round(d_b * n_tokens) if math.isfinite(d_b) else None, round(d_f * n_tokens) if math.isfinite(d_f) else None
        if key == "min_activation_similarity":
            expect = (math.isfinite(act) and fb is not None and ff is not None and d_b > 0 and d_f > 0
                      and fb >= min_firings and ff >= min_firings and act >= bound)
        elif key == "min_logit_similarity":
            expect = math.isfinite(logit) and math.isfinite(d_b) and math.isfinite(d_f) and logit >= bound
        elif key == "must_stay_alive":
            expect = math.isfinite(d_b) and math.isfinite(d_f) and d_b > 0 and d_f > 0
        else:
            ok_dens = math.isfinite(d_b) and math.isfinite(d_f) and d_b > 0
            ratio = d_f / d_b if ok_dens else None
            expect = ok_dens and (ratio <= bound if key == "max_density_ratio" else ratio >= bound)
        assert r.passed == expect, (key, bound, r)
        if r.passed:
            assert r.value is not None and math.isfinite(r.value)
        if not r.passed and r.value is None:
            assert "cannot judge" in r.message
