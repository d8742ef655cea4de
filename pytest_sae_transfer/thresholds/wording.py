"""How checks put numbers into words: values and bounds formatted so that unequal numbers
look unequal, bounds in check ids, and the "(base ..., ci95 [...])" context of a message.
Shared by the profile checks and the watched-feature checks."""

from __future__ import annotations

import math
from typing import Any


def fmt(x: Any) -> str:
    """A value in a message: 4 significant digits; ints as they are; anything else as its repr."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return repr(x)
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def fmt_operand(x: float) -> str:
    """A right-hand operand: negative numbers in parentheses, "0.97 - (-10.27)"."""
    return f"({fmt(x)})" if x < 0 else fmt(x)


def fmt_vs(value: float, bound: float) -> tuple[str, str]:
    """Value and bound with enough digits that unequal numbers look unequal (0.79996 is not "0.8")."""
    for prec in (4, 6, 9, 12, 17):
        a, b = f"{value:.{prec}g}", f"{bound:.{prec}g}"
        if a != b or value == bound:
            return a, b
    return repr(value), repr(bound)  # pragma: no cover


def bound_text(bound: float) -> str:
    """A bound as a check id writes it: the shortest exact decimal, no trailing ".0"."""
    text = repr(float(bound))
    return text[:-2] if text.endswith(".0") else text


def context(base: float | None, ci: tuple[float, float] | None, extra: str = "", ci_label: str = "ci95") -> str:
    """The parenthesised context of a message: extra words, the base's value, an interval."""
    parts = []
    if extra:
        parts.append(extra)
    if base is not None:
        parts.append(f"base {fmt(base)}")
    if ci is not None:
        parts.append(f"{ci_label} [{fmt(ci[0])}, {fmt(ci[1])}]")
    return f" ({', '.join(parts)})" if parts else ""


def within(value: float, bound: float, upper: bool, tol: float = 0.0) -> bool:
    return value <= bound + tol if upper else value >= bound - tol


def relation(ok: bool, upper: bool) -> str:
    """The comparison a message shows: what held, or what broke it."""
    return ("<=" if ok else ">") if upper else (">=" if ok else "<")
