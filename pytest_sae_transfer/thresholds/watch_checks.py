"""Watched features evaluated on one finetune: one :class:`~pytest_sae_transfer.report.CheckResult`
per (feature, bound), ids like ``feature[311 'def keyword'].activation_similarity>=0.8``,
and the same ids planned from the profile alone for the gate's items (see
:mod:`.watchlist` for the table's format and the never-a-silent-pass rules)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from ..report import CheckResult
from .watchlist import (
    DEFAULT_MIN_FIRINGS,
    WATCH_BOUNDS,
    Watchlist,
    _is_checked,
    check_ids_in_range,
)
from .wording import bound_text, fmt_vs


def _fmt(x: float | None) -> str:
    if x is None:
        return "null"
    if x == 0:
        return "0"
    return f"{x:.4g}"






def feature_name(feature_id: int, label: str | None) -> str:
    """``feature[311 'def keyword']``, or ``feature[311]`` without a label."""
    if label:
        quoted = label.replace("\\", "\\\\").replace("'", "\\'")
        return f"feature[{feature_id} '{quoted}']"
    return f"feature[{feature_id}]"


def _check_id(name: str, bound_key: str, bound: Any) -> str:
    quantity, op = WATCH_BOUNDS[bound_key]
    if op == "alive":
        return f"{name}.{quantity}"
    return f"{name}.{quantity}{op}{bound_text(bound)}"


def _metric(feature_id: int, bound_key: str) -> str:
    """The CheckResult's metric: what its value is (stays_alive's value is the finetune density)."""
    quantity = "density_finetune" if bound_key == "must_stay_alive" else WATCH_BOUNDS[bound_key][0]
    return f"feature[{feature_id}].{quantity}"


def planned_watch_checks(watch: Watchlist | None) -> list[tuple[str, str, str]]:
    """(check id, metric, severity) of every watch check, from the profile alone (no values):
    the same ids :func:`evaluate_watchlist` gives its results, so gate items can be collected
    before any model loads."""
    if watch is None:
        return []
    out = []
    for f, bounds, severity in watch.resolved():
        name = feature_name(f.id, f.label)
        for key, value in bounds:
            if _is_checked(key, value):
                out.append((_check_id(name, key, value), _metric(f.id, key), severity))
    return out


def _value(vectors: Mapping[str, Any], key: str, feature_id: int) -> float | None:
    arr = vectors.get(key)
    if arr is None:
        return None
    try:
        v = float(arr[feature_id])
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return v if math.isfinite(v) else None


@dataclasses.dataclass(frozen=True)
class _Watched:
    """One watched feature's numbers on one finetune, as every bound's check reads them."""

    name: str
    dens_b: float | None
    dens_f: float | None
    fired_b: int | None
    fired_f: int | None
    min_firings: int

    @property
    def density_txt(self) -> str:
        return f"density base {_fmt(self.dens_b)}, finetune {_fmt(self.dens_f)}"

    def why_not_judged(self, kind: str, value: float | None) -> str | None:
        """Why this feature's similarity cannot be judged, or None when it can."""
        if self.dens_b is None or self.dens_f is None:
            return "its densities are missing from the run (no per-feature vectors, or no evaluated tokens)"
        if kind == "activation":
            # A correlation over a handful of firings says nothing, whatever its value.
            if self.dens_b == 0:
                return "it is dead on the base: it never fired there"
            if self.dens_f == 0:
                return "it turned dead: it never fired on the finetune"
            if self.fired_b is None or self.fired_f is None:
                return "the run's token counts are missing, so its firings cannot be counted"
            few = [(m, n) for m, n in (("base", self.fired_b), ("finetune", self.fired_f)) if n < self.min_firings]
            if few:
                said = " and ".join(f"{n} time{'' if n == 1 else 's'} on the {m}" for m, n in few)
                return f"it fired only {said}, fewer than min_firings = {self.min_firings}"
        if value is not None:
            return None
        for m, d in (("base", self.dens_b), ("finetune", self.dens_f)):
            if d == 0:
                return f"it is dead on the {m}, and the run records {kind} similarity for regular features only"
            lg = math.log10(d + 1e-10)
            if not -5.0 <= lg <= -1.0:
                return (
                    f"it is not a regular feature (log10 density {lg:.2f} on the {m} is outside [-5, -1]), "
                    f"and the run records {kind} similarity for regular features only"
                )
        if kind == "activation":
            return "its activation similarity is undefined (no variance on one model)"
        return "the run recorded no logit similarity for it"


def _firings(density: float | None, n: float | None) -> int | None:
    if density is None or n is None or not math.isfinite(float(n)):
        return None
    return int(round(density * float(n)))


def evaluate_feature(
    feature_id: int,
    label: str | None,
    bounds: Sequence[tuple[str, Any]],
    vectors: Mapping[str, Any],
    n_tokens_base: float | None,
    n_tokens_finetune: float | None,
    severity: str = "fail",
    min_firings: int = DEFAULT_MIN_FIRINGS,
) -> list[CheckResult]:
    """One :class:`CheckResult` per bound of one feature, from the run's per-feature vectors.

    ``vectors`` holds FEATURE_VECTOR_KEYS arrays (densities, similarities);
    ``n_tokens_*`` are the models' numbers of evaluated tokens (for firing counts).
    """
    dens_b = _value(vectors, "density_base", feature_id)
    dens_f = _value(vectors, "density_finetune", feature_id)
    f = _Watched(feature_name(feature_id, label), dens_b, dens_f, _firings(dens_b, n_tokens_base),
                 _firings(dens_f, n_tokens_finetune), min_firings)
    out: list[CheckResult] = []
    for key, bound in bounds:
        if not _is_checked(key, bound):
            continue
        quantity, op = WATCH_BOUNDS[key]
        base = CheckResult(id=_check_id(f.name, key, bound), metric=_metric(feature_id, key), op=op, bound=bound,
                           value=None, passed=False, severity=severity)
        if key == "must_stay_alive":
            out.append(_stays_alive(f, base))
        elif quantity == "density_ratio":
            out.append(_density_ratio(f, base, bound, op))
        else:
            out.append(_similarity(f, base, bound, "activation" if quantity == "activation_similarity" else "logit",
                                   _value(vectors, quantity, feature_id)))
    return out


def _stays_alive(f: _Watched, base: CheckResult) -> CheckResult:
    check = dataclasses.replace(base, op=">", bound=0.0)
    if f.dens_b is None or f.dens_f is None:
        return dataclasses.replace(check, message=f"cannot judge whether {f.name} stays alive: its densities are missing from the run")
    if f.dens_b == 0:
        return dataclasses.replace(check, value=f.dens_f, message=(
            f"cannot judge whether {f.name} stays alive: it is dead on the base (it never fired there), so there is "
            f"nothing to stay alive ({f.density_txt})"))
    ok = f.dens_f > 0
    verdict = "stays alive" if ok else "turned dead: it never fired on the finetune"
    return dataclasses.replace(check, value=f.dens_f, passed=ok, message=f"{f.name} {verdict} ({f.density_txt})")


def _density_ratio(f: _Watched, base: CheckResult, bound: float, op: str) -> CheckResult:
    if f.dens_b is None or f.dens_f is None or f.dens_b == 0:
        why = "it is dead on the base, so the ratio is undefined" if f.dens_b == 0 else "its densities are missing from the run"
        return dataclasses.replace(base, message=f"cannot judge {f.name} density ratio: {why} ({f.density_txt})")
    ratio = f.dens_f / f.dens_b
    ok = ratio <= bound if op == "<=" else ratio >= bound
    rel = ("<=" if ok else ">") if op == "<=" else (">=" if ok else "<")
    v, b = fmt_vs(ratio, bound)
    message = f"{f.name} density ratio finetune/base = {v} {rel} {'max' if op == '<=' else 'min'} {b} ({f.density_txt})"
    return dataclasses.replace(base, value=ratio, passed=ok, message=message)


def _similarity(f: _Watched, base: CheckResult, bound: float, kind: str, value: float | None) -> CheckResult:
    why = f.why_not_judged(kind, value)
    if why is not None or value is None:
        return dataclasses.replace(base, message=f"cannot judge {f.name} {kind} similarity: {why} ({f.density_txt})")
    ok = value >= bound
    v, b = fmt_vs(value, bound)
    message = f"{f.name} {kind} similarity = {v} {'>=' if ok else '<'} min {b} ({f.density_txt})"
    return dataclasses.replace(base, value=value, passed=ok, message=message)


def evaluated_tokens(metrics: Mapping[str, Any]) -> float | None:
    """The tokens a model's densities were measured on: its included tokens less the
    non-finite ones (``n_tokens - n_nonfinite`` of its metrics), or None if unknown."""
    n = metrics.get("n_tokens")
    if n is None or isinstance(n, bool):
        return None
    try:
        return float(n) - float(metrics.get("n_nonfinite") or 0)
    except (TypeError, ValueError):
        return None


def evaluate_watchlist(
    watch: Watchlist | None,
    vectors: Mapping[str, Any],
    n_tokens_base: float | None,
    n_tokens_finetune: float | None,
) -> list[CheckResult]:
    """Every watch check on one finetune, in watchlist order; ids as :func:`planned_watch_checks`.

    Raises :class:`ProfileError` for a watched id outside the SAE (the vectors' length).
    """
    if watch is None or not watch.features:
        return []
    lengths = {len(v) for v in vectors.values() if v is not None and hasattr(v, "__len__")}
    if lengths:
        check_ids_in_range(watch, min(lengths))
    out: list[CheckResult] = []
    for f, bounds, severity in watch.resolved():
        out.extend(evaluate_feature(f.id, f.label, bounds, vectors, n_tokens_base, n_tokens_finetune, severity, watch.min_firings))
    return out
