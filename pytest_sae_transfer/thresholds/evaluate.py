"""Checks evaluated on a report: one :class:`~pytest_sae_transfer.report.CheckResult` per
(check, bound), with the message a failing gate item shows."""

from __future__ import annotations

import math
import numbers
import types
from typing import TYPE_CHECKING, Any, Mapping

from ..report import CheckResult
from .parse import type_name
from .vocabulary import BOUND_KEYS, DERIVED_RTOL, MISSING_MODES, CheckSpec, Profile

if TYPE_CHECKING:  # pragma: no cover
    from ..report import TransferReport

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})

_ABSENT = object()


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return repr(x)
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _fmt_operand(x: float) -> str:
    """A right-hand operand: negative numbers in parentheses, "0.97 - (-10.27)"."""
    return f"({_fmt(x)})" if x < 0 else _fmt(x)


def _fmt_vs(value: float, bound: float) -> tuple[str, str]:
    """Format value and bound with enough digits that unequal numbers look unequal."""
    for prec in (4, 6, 9, 12, 17):
        a, b = f"{value:.{prec}g}", f"{bound:.{prec}g}"
        if a != b or value == bound:
            return a, b
    return repr(value), repr(bound)  # pragma: no cover


def _fmt_bound_id(bound: float) -> str:
    text = repr(float(bound))
    return text[:-2] if text.endswith(".0") else text


def _check_id(metric_key: str, op: str, bound: float) -> str:
    sep = "" if op in ("<=", ">=") else ":"
    return f"{metric_key}{sep}{op}{_fmt_bound_id(bound)}"


def _classify(raw: Any) -> tuple[str, float | None, str]:
    """('ok' | 'missing' | 'bad', the number, why) for a metric value from a report."""
    if raw is _ABSENT:
        return "missing", None, "is missing from the report"
    if raw is None:
        return "missing", None, "is null"
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real):  # numpy scalars are Real
        kind = "a list" if isinstance(raw, (list, tuple)) else f"not a number ({type_name(raw)})"
        return "bad", None, f"is {kind}, not a scalar"
    value = float(raw)
    if math.isnan(value):
        return "missing", None, "is NaN"
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


_OP_TEXT = {
    "<=": "max",
    ">=": "min",
    "increase<=": "max_increase_over_base",
    "decrease<=": "max_decrease_from_base",
    "ratio<=": "max_ratio_to_base",
    "ci_low>=": "min_ci_low",
    "ci_high<=": "max_ci_high",
}


def _context(base: float | None, ci: tuple[float, float] | None, extra: str = "") -> str:
    parts = []
    if extra:
        parts.append(extra)
    if base is not None:
        parts.append(f"base {_fmt(base)}")
    if ci is not None:
        parts.append(f"ci95 [{_fmt(ci[0])}, {_fmt(ci[1])}]")
    return f" ({', '.join(parts)})" if parts else ""


def _within(value: float, bound: float, upper: bool, tol: float = 0.0) -> bool:
    return value <= bound + tol if upper else value >= bound - tol


def _evaluate_bound(
    spec: CheckSpec,
    bound_key: str,
    bound: float,
    raw: Any,
    base_raw: Any,
    ci: tuple[float, float] | None,
    missing: str,
) -> CheckResult | None:
    op = BOUND_KEYS[bound_key]
    mkey = spec.key
    cid = _check_id(mkey, op, bound)
    status, value, why = _classify(raw)
    base_value: float | None = None
    if spec.scope == "finetune" and base_raw is not _ABSENT:
        b_status, b_val, _ = _classify(base_raw)
        if b_status == "ok":
            base_value = b_val

    def result(passed: bool, val: float | None, message: str) -> CheckResult:
        return CheckResult(
            id=cid,
            metric=mkey,
            op=op,
            bound=bound,
            value=val,
            passed=passed,
            severity=spec.severity,
            base_value=base_value,
            ci95=ci,
            message=message,
        )

    expect = f"{_OP_TEXT[op]} {_fmt(bound)}"

    # Interval bounds look only at the ci95, not at the point value.
    if op in ("ci_low>=", "ci_high<="):
        if ci is None:
            if missing == "skip":
                return None
            return result(False, None, f"{mkey} has no ci95 in the report; cannot check {expect}")
        upper = op == "ci_high<="
        end = ci[1] if upper else ci[0]
        ok = _within(end, bound, upper)
        v, b = _fmt_vs(end, bound)
        rel = ("<=" if ok else ">") if upper else (">=" if ok else "<")
        label = "ci95 high" if upper else "ci95 low"
        point = f"value {_fmt(value)}" if status == "ok" else ""
        return result(ok, end, f"{mkey} {label} = {v} {rel} {_OP_TEXT[op]} {b}{_context(base_value, ci, point)}")

    if status == "missing":
        if missing == "skip":
            return None
        return result(False, None, f"{mkey} {why}; cannot check {expect}")
    if status == "bad":
        return result(False, value, f"{mkey} {why}; fails {expect}")
    assert value is not None

    if op in ("<=", ">="):
        upper = op == "<="
        ok = _within(value, bound, upper)
        v, b = _fmt_vs(value, bound)
        rel = ("<=" if ok else ">") if upper else (">=" if ok else "<")
        return result(ok, value, f"{mkey} = {v} {rel} {_OP_TEXT[op]} {b}{_context(base_value, ci)}")

    # Relative bounds (finetune scope only, enforced at load time).
    b_status, b_val, b_why = _classify(base_raw)
    if b_status == "missing":
        if missing == "skip":
            return None
        return result(False, None, f"base.{spec.metric} {b_why}; cannot check {mkey} {expect}")
    if b_status == "bad":
        return result(False, None, f"base.{spec.metric} {b_why}; fails {mkey} {expect}")
    assert b_val is not None
    scale = max(abs(value), abs(b_val), abs(bound))
    if op == "increase<=":
        derived = value - b_val
        how = f"{mkey} increase over base = {{v}} ({_fmt(value)} - base {_fmt_operand(b_val)})"
    elif op == "decrease<=":
        derived = b_val - value
        how = f"{mkey} decrease from base = {{v}} (base {_fmt(b_val)} - {_fmt_operand(value)})"
    else:  # ratio<=
        if b_val == 0:
            return result(
                False, None, f"{mkey} ratio to base is undefined: base value is 0 (finetune {_fmt(value)}); fails {expect}"
            )
        derived = value / b_val
        scale = max(abs(derived), abs(bound))
        how = f"{mkey} ratio to base = {{v}} ({_fmt(value)} / base {_fmt(b_val)})"
    ok = _within(derived, bound, True, DERIVED_RTOL * scale)
    v, b = _fmt_vs(derived, bound)
    rel = "<=" if ok else ">"
    ci_txt = _context(None, ci)
    return result(ok, derived, how.format(v=v) + f" {rel} {_OP_TEXT[op]} {b}{ci_txt}")


def evaluate_pair(
    profile: Profile,
    base_metrics: Mapping[str, Any],
    finetune_metrics: Mapping[str, Any],
    paired: Mapping[str, Any],
    base_ci: Mapping[str, Any] = _EMPTY,
    finetune_ci: Mapping[str, Any] = _EMPTY,
    paired_ci: Mapping[str, Any] = _EMPTY,
    missing: str = "fail",
) -> list[CheckResult]:
    """Evaluate every bound of ``profile`` on one base/finetune pair given as plain mappings.

    One :class:`CheckResult` per (check, bound), in profile order. With
    ``missing="skip"`` a bound whose inputs are absent, null or NaN is left out
    instead of failing (use it for partial inputs such as published numbers).
    """
    if missing not in MISSING_MODES:
        raise ValueError(f"missing must be one of {MISSING_MODES}, got {missing!r}")
    values = {"base": base_metrics or _EMPTY, "finetune": finetune_metrics or _EMPTY, "paired": paired or _EMPTY}
    cis = {"base": base_ci or _EMPTY, "finetune": finetune_ci or _EMPTY, "paired": paired_ci or _EMPTY}
    out: list[CheckResult] = []
    for spec in profile.checks:
        raw = values[spec.scope].get(spec.metric, _ABSENT)
        base_raw = values["base"].get(spec.metric, _ABSENT) if spec.scope == "finetune" else _ABSENT
        ci = _ci_of(cis[spec.scope], spec.metric)
        for bound_key, bound in spec.bounds:
            res = _evaluate_bound(spec, bound_key, bound, raw, base_raw, ci, missing)
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
        )


def planned_checks(profile: Profile) -> list[tuple[str, str, str]]:
    """(check id, "scope.metric", severity) for every bound of every check, before any value exists.

    The ids are those :func:`evaluate_pair` gives its results, so gate items can be
    collected from the profile alone.
    """
    planned = []
    for spec in profile.checks:
        for bound_key, bound in spec.bounds:
            planned.append((_check_id(spec.key, BOUND_KEYS[bound_key], bound), spec.key, spec.severity))
    return planned

