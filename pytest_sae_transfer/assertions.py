"""Helper assertions for custom transferability tests.

Each one hides its own frame from the traceback and fails with a message that
shows what was obtained and what was expected::

    from pytest_sae_transfer.assertions import assert_metric, assert_features_similar

    def test_code_features_survive(transfer_result):
        assert_features_similar(transfer_result, [12, 40, 311], min_similarity=0.9)
        assert_metric(transfer_result, "finetune.ce_loss_delta", max=0.5)
        assert_feature_transfers(transfer_result, 311, min_activation_similarity=0.8)

A feature's top contexts read as text: ``transfer_result.feature(311).top_contexts("finetune")``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

__all__ = [
    "assert_metric",
    "assert_close_to_base",
    "assert_features_similar",
    "assert_feature_transfers",
    "assert_transfers",
    "assert_no_nonfinite",
]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def _number(result: Any, metric: str) -> float:
    __tracebackhide__ = True
    qualified = metric if "." in metric else f"finetune.{metric}"
    value = result.value(qualified)
    if value is None or isinstance(value, (list, tuple)) or (isinstance(value, float) and math.isnan(value)):
        raise AssertionError(f"{qualified} of {result.name!r} is {_fmt(value)}: there is no number to check")
    return float(value)


def assert_metric(
    result: Any,
    metric: str,
    *,
    min: float | None = None,  # noqa: A002 - mirrors the profile keys
    max: float | None = None,  # noqa: A002
    min_ci_low: float | None = None,
    max_ci_high: float | None = None,
) -> None:
    """Bound a metric of a PairResult by name: 'finetune.l0', 'base.l0', 'paired.resid_cosine_mean'
    (a bare name means the finetune's). CI bounds use the metric's bootstrap interval."""
    __tracebackhide__ = True
    qualified = metric if "." in metric else f"finetune.{metric}"
    value = _number(result, qualified)
    problems = []
    if min is not None and not value >= min:
        problems.append(f">= {_fmt(min)}")
    if max is not None and not value <= max:
        problems.append(f"<= {_fmt(max)}")
    ci = result.ci95(qualified)
    if (min_ci_low is not None or max_ci_high is not None) and ci is None:
        raise AssertionError(f"{qualified} of {result.name!r} has no ci95 (run with --sae-bootstrap > 0)")
    if min_ci_low is not None and not ci[0] >= min_ci_low:
        problems.append(f"ci95 low >= {_fmt(min_ci_low)} (ci95 is [{_fmt(ci[0])}, {_fmt(ci[1])}])")
    if max_ci_high is not None and not ci[1] <= max_ci_high:
        problems.append(f"ci95 high <= {_fmt(max_ci_high)} (ci95 is [{_fmt(ci[0])}, {_fmt(ci[1])}])")
    if problems:
        base = ""
        if qualified.startswith("finetune."):
            base_value = result.base[qualified.split(".", 1)[1]]
            base = f"; base {result.base_name!r} has {_fmt(base_value)}"
        raise AssertionError(
            f"{qualified} of {result.name!r}\n  obtained: {_fmt(value)}\n  expected: {' and '.join(problems)}{base}"
        )


def assert_close_to_base(
    result: Any,
    metric: str,
    *,
    max_increase: float | None = None,
    max_decrease: float | None = None,
    max_ratio: float | None = None,
) -> None:
    """Bound how far the finetune's value moved from the base model's on the same tokens."""
    __tracebackhide__ = True
    key = metric.split(".", 1)[1] if metric.startswith("finetune.") else metric
    ft = _number(result, f"finetune.{key}")
    base = _number(result, f"base.{key}")
    problems = []
    if max_increase is not None and not ft - base <= max_increase:
        problems.append(f"increase {_fmt(ft - base)} <= {_fmt(max_increase)}")
    if max_decrease is not None and not base - ft <= max_decrease:
        problems.append(f"decrease {_fmt(base - ft)} <= {_fmt(max_decrease)}")
    if max_ratio is not None and not (base != 0 and ft / base <= max_ratio):
        problems.append(f"ratio {_fmt(ft / base) if base else 'undefined'} <= {_fmt(max_ratio)}")
    if problems:
        raise AssertionError(
            f"{key}: finetune {result.name!r} vs base {result.base_name!r}\n"
            f"  obtained: finetune {_fmt(ft)}, base {_fmt(base)}\n  expected: {'; '.join(problems)}"
        )


def assert_features_similar(
    result: Any,
    features: Iterable[int] | None = None,
    *,
    min_similarity: float = 0.9,
    kind: str = "activation",
    min_fraction: float = 1.0,
) -> None:
    """These features keep their activation (or logit) similarity on the finetune.

    ``features`` are SAE feature indices (default: every regular feature). A
    feature whose similarity is undefined (not regular in both models, or zero
    variance) counts as failing, so a feature that died cannot pass silently.
    At least ``min_fraction`` of the features must reach ``min_similarity``.
    """
    __tracebackhide__ = True
    import numpy as np

    if kind not in ("activation", "logit"):
        raise ValueError(f"kind must be 'activation' or 'logit'; got {kind!r}")
    sims = np.asarray(result.features[f"{kind}_similarity"], dtype=float)
    if features is None:
        idx = np.flatnonzero(np.isfinite(sims))
    else:
        idx = np.asarray(list(features), dtype=int)
        bad = idx[(idx < 0) | (idx >= sims.size)]
        if bad.size:
            raise AssertionError(f"feature indices {bad.tolist()} are outside the SAE's {sims.size} features")
    if idx.size == 0:
        raise AssertionError(f"no features to check: {result.name!r} has no regular features with a defined {kind} similarity")
    values = sims[idx]
    ok = np.isfinite(values) & (values >= min_similarity)
    fraction = float(ok.mean())
    if fraction < min_fraction:
        failing = [(int(i), None if not np.isfinite(v) else round(float(v), 4)) for i, v, good in zip(idx, values, ok) if not good]
        shown = ", ".join(f"#{i}: {'undefined' if v is None else v}" for i, v in failing[:12])
        more = f" (+{len(failing) - 12} more)" if len(failing) > 12 else ""
        raise AssertionError(
            f"{kind} similarity of {result.name!r} vs base {result.base_name!r}\n"
            f"  obtained: {fraction:.1%} of {idx.size} features >= {_fmt(min_similarity)}; below: {shown}{more}\n"
            f"  expected: at least {min_fraction:.1%}"
        )


def assert_transfers(result: Any) -> None:
    """Every fail-severity check of the active threshold profile holds."""
    __tracebackhide__ = True
    failed = [c for c in result.checks if not c.passed and c.severity == "fail"]
    if failed:
        lines = "\n".join(f"  {c.id}: {c.message}" for c in failed)
        raise AssertionError(f"SAE does not transfer to {result.name!r}: {len(failed)} of {len(result.checks)} checks failed\n{lines}")


def assert_no_nonfinite(result: Any, scopes: Sequence[str] = ("base", "finetune")) -> None:
    """No NaN or Inf in the activations, reconstructions or losses of these models."""
    __tracebackhide__ = True
    for scope in scopes:
        value = _number(result, f"{scope}.nonfinite_fraction")
        if value > 0:
            raise AssertionError(f"{scope}.nonfinite_fraction of {result.name!r}\n  obtained: {_fmt(value)}\n  expected: 0")


def assert_feature_transfers(
    result: Any,
    feature_id: int,
    *,
    min_activation_similarity: float | None = 0.8,
    min_logit_similarity: float | None = None,
    max_density_ratio: float | None = None,
    min_density_ratio: float | None = None,
    must_stay_alive: bool = True,
    min_firings: int = 10,
) -> None:
    """One feature still works on the finetune: the same bounds, and the same "cannot judge"
    rules, as a profile's ``[features.<id>]`` watch (a dead feature, or one that fired fewer
    than ``min_firings`` times, fails rather than passing unjudged). The message shows what
    was obtained, the bounds, and the feature's top contexts on both models where recorded."""
    __tracebackhide__ = True
    from .thresholds.watch_checks import evaluate_feature, evaluated_tokens

    try:
        view = result.feature(feature_id)
    except IndexError as exc:
        raise AssertionError(str(exc)) from None
    bounds = [
        (key, value)
        for key, value in (
            ("min_activation_similarity", min_activation_similarity),
            ("min_logit_similarity", min_logit_similarity),
            ("max_density_ratio", max_density_ratio),
            ("min_density_ratio", min_density_ratio),
            ("must_stay_alive", must_stay_alive),
        )
        if value is not None and value is not False
    ]
    if not bounds:
        raise ValueError("assert_feature_transfers needs at least one bound")
    vectors = result.features.as_dict() if hasattr(result.features, "as_dict") else dict(result.features)
    if not vectors and view.card is not None:  # no sidecar: the numbers on the feature's card
        vectors = {key: {view.id: view.card.get(key)} for key in view._NUMBERS}
    checks = evaluate_feature(
        view.id, view.label, bounds, vectors,
        evaluated_tokens(result.base.as_dict()), evaluated_tokens(result.metrics.as_dict()), min_firings=min_firings,
    )
    failed = [c for c in checks if not c.passed]
    if failed:
        expected = "; ".join(f"{c.id.split('].', 1)[1]}" for c in checks)
        lines = "\n".join(f"    {c.message}" for c in failed)
        raise AssertionError(
            f"{view.name} of {result.name!r} vs base {result.base_name!r}: {len(failed)} of {len(checks)} bounds failed\n"
            f"  expected: {expected}\n  obtained:\n{lines}\n{view.describe()}"
        )

