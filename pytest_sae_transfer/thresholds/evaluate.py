"""Checks evaluated on a report: one :class:`~pytest_sae_transfer.report.CheckResult` per
(check, bound), with the message a failing gate item shows."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
from typing import TYPE_CHECKING, Any, Mapping

from ..report import CheckResult
from .sources import type_name
from .vocabulary import (
    BOUND_KEYS,
    DERIVED_RTOL,
    MISSING_MODES,
    CheckSpec,
    Profile,
    family_of,
)
from .watch_checks import evaluate_watchlist, evaluated_tokens, planned_watch_checks
from .wording import bound_text, context, fmt, fmt_operand, fmt_vs, relation, within

if TYPE_CHECKING:  # pragma: no cover
    from ..report import TransferReport

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})

_ABSENT = object()










def _check_id(metric_key: str, op: str, bound: float) -> str:
    sep = "" if op in ("<=", ">=") else ":"
    return f"{metric_key}{sep}{op}{bound_text(bound)}"


def _classify(raw: Any) -> tuple[str, float | None, str]:
    """('ok' | 'missing' | 'undefined' | 'bad', the number, why) for a metric value from a report.

    'missing': the key is not in the report at all. 'undefined': it is there, but null or
    NaN (the engine writes null for a value that is undefined on the run's data)."""
    if raw is _ABSENT:
        return "missing", None, "is missing from the report"
    if raw is None:
        return "undefined", None, "is null"
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real):  # numpy scalars are Real
        kind = "a list" if isinstance(raw, (list, tuple)) else f"not a number ({type_name(raw)})"
        return "bad", None, f"is {kind}, not a scalar"
    value = float(raw)
    if math.isnan(value):
        return "undefined", None, "is NaN"
    if math.isinf(value):
        return "bad", value, f"is not finite ({value})"
    return "ok", value, ""


def _ci_of(cis: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """The metric's ci95 as two finite floats, or None when absent or malformed."""
    raw = cis.get(metric) if cis else None
    if raw is None or isinstance(raw, (str, bytes, Mapping)):
        return None
    try:
        lo, hi = raw
    except (TypeError, ValueError):
        return None
    if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in (lo, hi)):
        return None
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return (lo, hi)


#: op -> the bound key that wrote it (for messages).
_OP_TEXT = {op: key for key, op in BOUND_KEYS.items()}

#: Relative ops: (quantity, True for an upper bound, which end of the paired interval or None).
_RELATIVE = {
    "increase<=": ("increase", True, None),
    "decrease<=": ("decrease", True, None),
    "ratio<=": ("ratio", True, None),
    "ratio>=": ("ratio", False, None),
    "increase_ci_high<=": ("increase", True, "high"),
    "decrease_ci_high<=": ("decrease", True, "high"),
    "ratio_ci_high<=": ("ratio", True, "high"),
    "ratio_ci_low>=": ("ratio", False, "low"),
}

_QUANTITY_TEXT = {"increase": "increase over base", "decrease": "decrease from base", "ratio": "ratio to base"}








def ratio_to_base(value: float, base: float) -> float | None:
    """finetune / base; 1 when both are 0 (nothing changed), None when only the base is 0."""
    if base == 0:
        return 1.0 if value == 0 else None
    return value / base


def _paired_interval(
    quantity: str, delta_ci: tuple[float, float] | None, ratio_ci: tuple[float, float] | None
) -> tuple[float, float] | None:
    """The paired interval of the checked quantity: increase, decrease (the negated delta) or ratio."""
    if quantity == "increase":
        return delta_ci
    if quantity == "decrease":
        return (-delta_ci[1], -delta_ci[0]) if delta_ci is not None else None
    return ratio_ci


_BASE_NOTE = (
    "; this is the SAE's own quality on the base model, not a change made by the finetune "
    "(transfer verdicts on a weak SAE mean little)"
)


def _undecided(point: float | None, end: float, bound: float, upper: bool, n_tokens: float | None) -> str:
    """When the point value is within the bound but the interval's end is not, the sample is too
    small to decide: say so, and how many tokens would narrow the interval enough (its half-width
    shrinks as one over the square root of the tokens)."""
    if point is None or not within(point, bound, upper) or point == bound:
        return ""
    text = f"; the point value is within {fmt(bound)}, but the interval is too wide to decide"
    if n_tokens:
        needed = n_tokens * ((end - point) / (bound - point)) ** 2
        text += f" on {int(n_tokens):,} tokens: about {int(math.ceil(needed / 1000.0)) * 1000:,} would (--sae-tokens)"
    return text


@dataclasses.dataclass
class _Bound:
    """One bound of one check being evaluated: what every branch of the evaluation shares."""

    spec: CheckSpec
    bound_key: str
    bound: float
    missing: str
    status: str  # of the value: "ok" | "missing" | "undefined" | "bad"
    value: float | None
    why: str
    base_value: float | None

    @property
    def op(self) -> str:
        return BOUND_KEYS[self.bound_key]

    @property
    def expect(self) -> str:
        return f"{_OP_TEXT[self.op]} {fmt(self.bound)}"

    def result(self, passed: bool, val: float | None, message: str, interval: tuple[float, float] | None,
               severity: str | None = None) -> CheckResult:
        spec = self.spec
        if not passed and spec.scope == "base" and family_of(spec.metric) != "run":
            message += _BASE_NOTE
        return CheckResult(
            id=_check_id(spec.key, self.op, self.bound), metric=spec.key, op=self.op, bound=self.bound, value=val,
            passed=passed, severity=severity or spec.severity, base_value=self.base_value, ci95=interval, message=message,
        )

    def not_there(self, kind: str, message: str, interval: tuple[float, float] | None = None) -> CheckResult | None:
        """A value (or the base's, or an interval) the check needs is not there."""
        if self.missing == "skip":
            return None
        if kind == "undefined" and self.spec.if_undefined == "warn" and self.spec.severity == "fail":
            return self.result(
                False, None, f"{message}: undefined on this run, so a warning instead of a failure "
                f"(if_undefined = \"warn\"; {self.expect} not checked)", interval, severity="warn",
            )
        return self.result(False, None, f"{message}; cannot check {self.expect}", interval)

    def value_problem(self, interval: tuple[float, float] | None) -> CheckResult | None:
        """The result when the value itself is missing, undefined or not a number; else None."""
        if self.status in ("missing", "undefined"):
            return self.not_there(self.status, f"{self.spec.key} {self.why}")
        if self.status == "bad":
            return self.result(False, self.value, f"{self.spec.key} {self.why}; fails {self.expect}", interval)
        return None


def _evaluate_bound(
    spec: CheckSpec,
    bound_key: str,
    bound: float,
    raw: Any,
    base_raw: Any,
    ci: tuple[float, float] | None,
    delta_ci: tuple[float, float] | None,
    ratio_ci: tuple[float, float] | None,
    missing: str,
    n_tokens: float | None = None,
) -> CheckResult | None:
    status, value, why = _classify(raw)
    base_value: float | None = None
    if spec.scope == "finetune" and base_raw is not _ABSENT:
        b_status, b_val, _ = _classify(base_raw)
        if b_status == "ok":
            base_value = b_val
    b = _Bound(spec, bound_key, bound, missing, status, value, why, base_value)
    if b.op in ("ci_low>=", "ci_high<="):
        return _interval_end(b, ci)
    if b.op in ("<=", ">="):
        return _point(b, ci) if b.status == "ok" else b.value_problem(ci)
    return _relative(b, base_raw, delta_ci, ratio_ci, n_tokens)


def _interval_end(b: _Bound, ci: tuple[float, float] | None) -> CheckResult | None:
    """A bound on an end of the metric's own interval."""
    mkey = b.spec.key
    if ci is None:
        if b.status in ("missing", "undefined"):
            return b.not_there(b.status, f"{mkey} {b.why}")
        return b.not_there("missing", f"{mkey} has no ci95 in the report")
    upper = b.op == "ci_high<="
    end = ci[1] if upper else ci[0]
    ok = within(end, b.bound, upper)
    v, bnd = fmt_vs(end, b.bound)
    label = "ci95 high" if upper else "ci95 low"
    point = f"value {fmt(b.value)}" if b.status == "ok" else ""
    return b.result(ok, end, f"{mkey} {label} = {v} {relation(ok, upper)} {_OP_TEXT[b.op]} {bnd}{context(b.base_value, ci, point)}", ci)


def _point(b: _Bound, ci: tuple[float, float] | None) -> CheckResult:
    """A plain min/max bound on the value."""
    assert b.value is not None
    upper = b.op == "<="
    ok = within(b.value, b.bound, upper)
    v, bnd = fmt_vs(b.value, b.bound)
    return b.result(ok, b.value, f"{b.spec.key} = {v} {relation(ok, upper)} {_OP_TEXT[b.op]} {bnd}{context(b.base_value, ci)}", ci)


def _relative(b: _Bound, base_raw: Any, delta_ci: tuple[float, float] | None, ratio_ci: tuple[float, float] | None,
              n_tokens: float | None) -> CheckResult | None:
    """A bound on the finetune relative to the base (finetune scope only, enforced at load time):
    the increase, decrease or ratio, or an end of its paired interval."""
    quantity, upper, end_name = _RELATIVE[b.op]
    interval = _paired_interval(quantity, delta_ci, ratio_ci)
    b_status, b_val, b_why = _classify(base_raw)
    derived, how = _derived(quantity, b.value, b_val) if b.status == "ok" and b_status == "ok" else (None, "")
    if end_name is not None:
        return _paired_end(b, quantity, upper, end_name, interval, derived, (b_status, b_why), n_tokens)
    problem = b.value_problem(interval)
    if problem is not None or b.status != "ok":
        return problem
    mkey, metric = b.spec.key, b.spec.metric
    if b_status in ("missing", "undefined"):
        return b.not_there(b_status, f"base.{metric} {b_why}")
    if b_status == "bad":
        return b.result(False, None, f"base.{metric} {b_why}; fails {mkey} {b.expect}", interval)
    assert b.value is not None and b_val is not None
    if derived is None:  # a ratio to a base of 0
        return b.result(
            False, None, f"{mkey} ratio to base is undefined: base value is 0 (finetune {fmt(b.value)}); fails {b.expect}", interval,
        )
    scale = max(abs(derived), abs(b.bound)) if quantity == "ratio" else max(abs(b.value), abs(b_val), abs(b.bound))
    ok = within(derived, b.bound, upper, DERIVED_RTOL * scale)
    v, bnd = fmt_vs(derived, b.bound)
    return b.result(
        ok, derived,
        f"{mkey} {_QUANTITY_TEXT[quantity]} = {v} ({how}) {relation(ok, upper)} {_OP_TEXT[b.op]} {bnd}"
        + context(None, interval, "", "paired ci95"),
        interval,
    )


def _derived(quantity: str, value: Any, base: Any) -> tuple[float | None, str]:
    """(finetune − base, base − finetune or finetune / base; how it was computed, for the message)."""
    if quantity == "increase":
        return value - base, f"{fmt(value)} - base {fmt_operand(base)}"
    if quantity == "decrease":
        return base - value, f"base {fmt(base)} - {fmt_operand(value)}"
    how = f"{fmt(value)} / base {fmt(base)}" + (": both 0, no change" if value == 0 and base == 0 else "")
    return ratio_to_base(value, base), how


def _paired_end(b: _Bound, quantity: str, upper: bool, end_name: str, interval: tuple[float, float] | None,
                derived: float | None, base_status: tuple[str, str], n_tokens: float | None) -> CheckResult | None:
    """A bound on an end of the paired interval of the increase, decrease or ratio."""
    mkey, label = b.spec.key, f"{b.spec.key} {_QUANTITY_TEXT[quantity]}"
    if interval is None:
        if b.status in ("missing", "undefined"):
            return b.not_there(b.status, f"{mkey} {b.why}")
        if base_status[0] in ("missing", "undefined"):
            return b.not_there(base_status[0], f"base.{b.spec.metric} {base_status[1]}")
        source = "delta_ci95" if quantity != "ratio" else "ratio_ci95"
        return b.not_there(
            "missing",
            f"{label} has no paired interval in the report (no {source} for {b.spec.metric}: "
            "a report from an older version, or one run without the bootstrap)",
        )
    end = interval[1] if end_name == "high" else interval[0]
    ok = within(end, b.bound, upper)
    v, bnd = fmt_vs(end, b.bound)
    point = f"point {fmt(derived)}" if derived is not None else ""
    return b.result(
        ok, end,
        f"{label}, paired ci95 {end_name} = {v} {relation(ok, upper)} {_OP_TEXT[b.op]} {bnd}"
        + context(None, interval, point, "paired ci95") + ("" if ok else _undecided(derived, end, b.bound, upper, n_tokens)),
        interval,
    )


def evaluate_pair(
    profile: Profile,
    base_metrics: Mapping[str, Any],
    finetune_metrics: Mapping[str, Any],
    paired: Mapping[str, Any],
    base_ci: Mapping[str, Any] = _EMPTY,
    finetune_ci: Mapping[str, Any] = _EMPTY,
    paired_ci: Mapping[str, Any] = _EMPTY,
    missing: str = "fail",
    *,
    delta_ci: Mapping[str, Any] = _EMPTY,
    ratio_ci: Mapping[str, Any] = _EMPTY,
) -> list[CheckResult]:
    """Evaluate every bound of ``profile`` on one base/finetune pair given as plain mappings.

    One :class:`CheckResult` per (check, bound), in profile order. With
    ``missing="skip"`` a bound whose inputs are absent, null or NaN is left out
    instead of failing (use it for partial inputs such as published numbers).
    ``delta_ci`` and ``ratio_ci`` map a metric key to the paired interval of
    finetune − base and finetune / base (``FinetuneResult.delta_ci95``/``ratio_ci95``);
    the relative bounds quote them and their ``_ci_`` variants check their ends.
    """
    if missing not in MISSING_MODES:
        raise ValueError(f"missing must be one of {MISSING_MODES}, got {missing!r}")
    values = {"base": base_metrics or _EMPTY, "finetune": finetune_metrics or _EMPTY, "paired": paired or _EMPTY}
    cis = {"base": base_ci or _EMPTY, "finetune": finetune_ci or _EMPTY, "paired": paired_ci or _EMPTY}
    out: list[CheckResult] = []
    n_tokens = _classify(values["finetune"].get("n_tokens", _ABSENT))[1]
    for spec in profile.checks:
        raw = values[spec.scope].get(spec.metric, _ABSENT)
        base_raw = values["base"].get(spec.metric, _ABSENT) if spec.scope == "finetune" else _ABSENT
        ci = _ci_of(cis[spec.scope], spec.metric)
        d_ci = _ci_of(delta_ci or _EMPTY, spec.metric) if spec.scope == "finetune" else None
        r_ci = _ci_of(ratio_ci or _EMPTY, spec.metric) if spec.scope == "finetune" else None
        for bound_key, bound in spec.bounds:
            res = _evaluate_bound(spec, bound_key, bound, raw, base_raw, ci, d_ci, r_ci, missing, n_tokens)
            if res is not None:
                out.append(res)
    return out


def evaluate_checks(profile: Profile, report: "TransferReport", missing: str = "fail") -> None:
    """Fill ``report.finetunes[i].checks`` (replacing what was there) from ``profile``."""
    base = report.base
    for ft in report.finetunes:
        ft.checks = evaluate_pair(
            profile,
            base.metrics,
            ft.metrics,
            ft.paired,
            base_ci=base.ci95,
            finetune_ci=ft.ci95,
            paired_ci=ft.paired_ci95,
            missing=missing,
            delta_ci=getattr(ft, "delta_ci95", None) or _EMPTY,
            ratio_ci=getattr(ft, "ratio_ci95", None) or _EMPTY,
        )
        if profile.features is not None and profile.features.features:
            vectors = report.features.vectors.get(ft.model, {}) if report.features is not None else {}
            ft.checks += evaluate_watchlist(profile.features, vectors, evaluated_tokens(base.metrics), evaluated_tokens(ft.metrics))


def planned_checks(profile: Profile) -> list[tuple[str, str, str]]:
    """(check id, "scope.metric", severity) for every bound of every check, before any value exists.

    The ids are those :func:`evaluate_pair` gives its results, in the same order, so gate
    items can be collected from the profile alone. The severity is the check's own; a
    check with ``if_undefined = "warn"`` whose value turns out null is reported with
    severity ``"warn"`` in its result.
    """
    planned = []
    for spec in profile.checks:
        for bound_key, bound in spec.bounds:
            planned.append((_check_id(spec.key, BOUND_KEYS[bound_key], bound), spec.key, spec.severity))
    return planned + planned_watch_checks(profile.features)

