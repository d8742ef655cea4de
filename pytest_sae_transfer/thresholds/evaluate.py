"""Checks evaluated on a report: one :class:`~pytest_sae_transfer.report.CheckResult` per
(check, bound), with the message a failing gate item shows."""

from __future__ import annotations

import math
import numbers
import types
from typing import TYPE_CHECKING, Any, Mapping

from ..report import CheckResult
from .parse import type_name
from .watch_checks import evaluate_watchlist, evaluated_tokens, planned_watch_checks
from .vocabulary import BOUND_KEYS, DERIVED_RTOL, MISSING_MODES, CheckSpec, Profile, family_of

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


def _context(base: float | None, ci: tuple[float, float] | None, extra: str = "", ci_label: str = "ci95") -> str:
    parts = []
    if extra:
        parts.append(extra)
    if base is not None:
        parts.append(f"base {_fmt(base)}")
    if ci is not None:
        parts.append(f"{ci_label} [{_fmt(ci[0])}, {_fmt(ci[1])}]")
    return f" ({', '.join(parts)})" if parts else ""


def _within(value: float, bound: float, upper: bool, tol: float = 0.0) -> bool:
    return value <= bound + tol if upper else value >= bound - tol


def _relation(ok: bool, upper: bool) -> str:
    return ("<=" if ok else ">") if upper else (">=" if ok else "<")


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

    def result(
        passed: bool, val: float | None, message: str, interval: tuple[float, float] | None, severity: str | None = None
    ) -> CheckResult:
        if not passed and spec.scope == "base" and family_of(spec.metric) != "run":
            message += _BASE_NOTE
        return CheckResult(
            id=cid,
            metric=mkey,
            op=op,
            bound=bound,
            value=val,
            passed=passed,
            severity=severity or spec.severity,
            base_value=base_value,
            ci95=interval,
            message=message,
        )

    expect = f"{_OP_TEXT[op]} {_fmt(bound)}"

    def not_there(kind: str, message: str, interval: tuple[float, float] | None = None) -> CheckResult | None:
        """A value (or the base's, or an interval) the check needs is not there."""
        if missing == "skip":
            return None
        if kind == "undefined" and spec.if_undefined == "warn" and spec.severity == "fail":
            return result(
                False, None, f"{message}: undefined on this run, so a warning instead of a failure "
                f"(if_undefined = \"warn\"; {expect} not checked)", interval, severity="warn",
            )
        return result(False, None, f"{message}; cannot check {expect}", interval)

    # Bounds on an end of the metric's own interval.
    if op in ("ci_low>=", "ci_high<="):
        if ci is None:
            if status in ("missing", "undefined"):
                return not_there(status, f"{mkey} {why}")
            return not_there("missing", f"{mkey} has no ci95 in the report")
        upper = op == "ci_high<="
        end = ci[1] if upper else ci[0]
        ok = _within(end, bound, upper)
        v, b = _fmt_vs(end, bound)
        label = "ci95 high" if upper else "ci95 low"
        point = f"value {_fmt(value)}" if status == "ok" else ""
        return result(
            ok, end, f"{mkey} {label} = {v} {_relation(ok, upper)} {_OP_TEXT[op]} {b}{_context(base_value, ci, point)}", ci
        )

    if op in ("<=", ">="):
        if status in ("missing", "undefined"):
            return not_there(status, f"{mkey} {why}")
        if status == "bad":
            return result(False, value, f"{mkey} {why}; fails {expect}", ci)
        assert value is not None
        upper = op == "<="
        ok = _within(value, bound, upper)
        v, b = _fmt_vs(value, bound)
        return result(ok, value, f"{mkey} = {v} {_relation(ok, upper)} {_OP_TEXT[op]} {b}{_context(base_value, ci)}", ci)

    # Relative bounds (finetune scope only, enforced at load time).
    quantity, upper, end_name = _RELATIVE[op]
    interval = _paired_interval(quantity, delta_ci, ratio_ci)
    label = f"{mkey} {_QUANTITY_TEXT[quantity]}"
    b_status, b_val, b_why = _classify(base_raw)

    derived: float | None = None
    how = ""
    if status == "ok" and b_status == "ok":
        assert value is not None and b_val is not None
        if quantity == "increase":
            derived = value - b_val
            how = f"{_fmt(value)} - base {_fmt_operand(b_val)}"
        elif quantity == "decrease":
            derived = b_val - value
            how = f"base {_fmt(b_val)} - {_fmt_operand(value)}"
        else:
            derived = ratio_to_base(value, b_val)
            how = f"{_fmt(value)} / base {_fmt(b_val)}"
            if value == 0 and b_val == 0:
                how += ": both 0, no change"

    if end_name is not None:  # an end of the paired interval
        if interval is None:
            if status in ("missing", "undefined"):
                return not_there(status, f"{mkey} {why}")
            if b_status in ("missing", "undefined"):
                return not_there(b_status, f"base.{spec.metric} {b_why}")
            source = "delta_ci95" if quantity != "ratio" else "ratio_ci95"
            return not_there(
                "missing",
                f"{label} has no paired interval in the report (no {source} for {spec.metric}: "
                "a report from an older version, or one run without the bootstrap)",
            )
        end = interval[1] if end_name == "high" else interval[0]
        ok = _within(end, bound, upper)
        v, b = _fmt_vs(end, bound)
        point = f"point {_fmt(derived)}" if derived is not None else ""
        return result(
            ok, end,
            f"{label}, paired ci95 {end_name} = {v} {_relation(ok, upper)} {_OP_TEXT[op]} {b}"
            + _context(None, interval, point, "paired ci95"),
            interval,
        )

    if status in ("missing", "undefined"):
        return not_there(status, f"{mkey} {why}")
    if status == "bad":
        return result(False, value, f"{mkey} {why}; fails {expect}", interval)
    if b_status in ("missing", "undefined"):
        return not_there(b_status, f"base.{spec.metric} {b_why}")
    if b_status == "bad":
        return result(False, None, f"base.{spec.metric} {b_why}; fails {mkey} {expect}", interval)
    assert value is not None and b_val is not None
    if derived is None:  # a ratio to a base of 0
        return result(
            False, None,
            f"{mkey} ratio to base is undefined: base value is 0 (finetune {_fmt(value)}); fails {expect}", interval,
        )
    if quantity == "ratio":
        scale = max(abs(derived), abs(bound))
    else:
        scale = max(abs(value), abs(b_val), abs(bound))
    ok = _within(derived, bound, upper, DERIVED_RTOL * scale)
    v, b = _fmt_vs(derived, bound)
    return result(
        ok, derived,
        f"{label} = {v} ({how}) {_relation(ok, upper)} {_OP_TEXT[op]} {b}" + _context(None, interval, "", "paired ci95"),
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
    for spec in profile.checks:
        raw = values[spec.scope].get(spec.metric, _ABSENT)
        base_raw = values["base"].get(spec.metric, _ABSENT) if spec.scope == "finetune" else _ABSENT
        ci = _ci_of(cis[spec.scope], spec.metric)
        d_ci = _ci_of(delta_ci or _EMPTY, spec.metric) if spec.scope == "finetune" else None
        r_ci = _ci_of(ratio_ci or _EMPTY, spec.metric) if spec.scope == "finetune" else None
        for bound_key, bound in spec.bounds:
            res = _evaluate_bound(spec, bound_key, bound, raw, base_raw, ci, d_ci, r_ci, missing)
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

