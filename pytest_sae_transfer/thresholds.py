"""Threshold profiles: TOML files of pass/fail checks on a :class:`TransferReport`.

A profile is a TOML file (SPEC.md, "Threshold profiles"). Each table
``[<scope>.<metric>]`` is one check; ``scope`` is ``base``, ``finetune`` or
``paired`` and ``metric`` a key of that scope. A check holds one or more bounds,
and each bound is evaluated as its own :class:`CheckResult`::

    [profile]
    extends = "default"          # a bundled profile name, or a path relative to this file
    description = "my gate"
    outlier_norm = "auto"        # run setting: a positive number, "auto", or "off"

    [finetune.ce_loss_delta]
    max = 0.5                    # value <= 0.5
    max_increase_over_base = 0.3 # finetune - base <= 0.3
    max_ci_high = 0.6            # upper end of the ci95 <= 0.6

    [paired.logit_similarity_mean]
    min = 0.98
    severity = "warn"            # reported, never fails the run

Semantics:

* ``extends`` is resolved recursively (cycles are an error). A child table
  ``[scope.metric]`` replaces the parent's table for the same check *as a whole*
  (bounds are not merged key by key); ``enabled = false`` drops an inherited
  check. Run settings are merged key by key, the child winning.
* A missing, null or NaN metric fails its checks (``missing="fail"``) or is not
  checked at all (``missing="skip"``, for partial inputs such as published
  numbers). An infinite value, a non-scalar value and an undefined ratio
  (base value 0) always fail.
* Derived quantities (increase, decrease, ratio) are compared with a relative
  tolerance of 1e-9 so that e.g. ``0.8 - 0.5 <= 0.3`` passes despite binary
  floating point; plain ``min``/``max``/ci bounds compare exactly.

Threshold files are data: they are parsed with :mod:`tomllib` only.

Packaging note: the top-level ``thresholds/`` folder is installed as the data
directory ``pytest_sae_transfer/thresholds/`` next to this module. It must not get
an ``__init__.py``, or that directory would shadow this module on import.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from .report import MODEL_METRIC_KEYS, PAIRED_METRIC_KEYS, CheckResult

if TYPE_CHECKING:  # pragma: no cover
    from .report import TransferReport

__all__ = [
    "BOUND_KEYS",
    "CheckSpec",
    "Profile",
    "ProfileError",
    "SCOPES",
    "SETTINGS_KEYS",
    "available_profiles",
    "evaluate_checks",
    "evaluate_pair",
    "load_profile",
    "profile_for_release",
]

# --------------------------------------------------------------------------- vocabulary

SCOPES: tuple[str, ...] = ("base", "finetune", "paired")

SCOPE_METRICS: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {"base": MODEL_METRIC_KEYS, "finetune": MODEL_METRIC_KEYS, "paired": PAIRED_METRIC_KEYS}
)

#: Metrics whose value is a list (per position / per block): no scalar bound applies.
LIST_METRICS: frozenset[str] = frozenset(
    {"resid_cosine_by_position", "resid_euclidean_by_position", "weight_deviation"}
)

#: Bound key -> the ``op`` written into CheckResult, in evaluation order.
BOUND_KEYS: Mapping[str, str] = types.MappingProxyType(
    {
        "min": ">=",
        "max": "<=",
        "max_increase_over_base": "increase<=",
        "max_decrease_from_base": "decrease<=",
        "max_ratio_to_base": "ratio<=",
        "min_ci_low": "ci_low>=",
        "max_ci_high": "ci_high<=",
    }
)

#: Bounds relative to the base model's value: only meaningful for ``finetune.*``.
RELATIVE_BOUNDS: frozenset[str] = frozenset(
    {"max_increase_over_base", "max_decrease_from_base", "max_ratio_to_base"}
)

#: Non-bound keys a check table may hold.
CHECK_OPTION_KEYS: tuple[str, ...] = ("severity", "enabled")

SEVERITIES: tuple[str, ...] = ("fail", "warn")

#: Run settings accepted in ``[profile]``.
SETTINGS_KEYS: tuple[str, ...] = ("outlier_norm", "exclude_special_tokens")

PROFILE_KEYS: tuple[str, ...] = ("extends", "description") + SETTINGS_KEYS

MISSING_MODES: tuple[str, ...] = ("fail", "skip")

#: Relative tolerance for derived quantities (increase, decrease, ratio).
DERIVED_RTOL = 1e-9

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})
_ABSENT = object()


# --------------------------------------------------------------------------- data model


class ProfileError(Exception):
    """A threshold profile could not be found, parsed or validated.

    The message names the file and the offending key, and suggests the nearest
    valid name where there is one.
    """


@dataclasses.dataclass(frozen=True)
class CheckSpec:
    """One ``[scope.metric]`` table of a profile: a metric and its bounds."""

    scope: str
    metric: str
    bounds: tuple[tuple[str, float], ...]
    severity: str = "fail"
    source: str = ""  # the file the table came from

    @property
    def key(self) -> str:
        return f"{self.scope}.{self.metric}"


@dataclasses.dataclass(frozen=True)
class Profile:
    """A resolved profile: its own checks merged over those of what it extends."""

    name: str
    path: str | None
    description: str
    checks: tuple[CheckSpec, ...]
    settings: Mapping[str, Any]
    extends: str | None = None  # the direct parent's name, if any

    def check(self, key: str) -> CheckSpec | None:
        """The check for ``"scope.metric"``, or None."""
        for spec in self.checks:
            if spec.key == key:
                return spec
        return None


# --------------------------------------------------------------------------- locating files


def _bundled_dir() -> Path:
    """The folder that holds the bundled profiles.

    The top-level ``thresholds/`` folder is installed as ``pytest_sae_transfer/profiles``
    (see pyproject.toml); a source checkout reads it where it is.
    """
    here = Path(__file__).resolve().parent
    for cand in (here / "profiles", here.parent / "thresholds"):
        if cand.joinpath("default.toml").is_file():
            return cand
    return here / "profiles"


def available_profiles() -> list[str]:
    """Names of the bundled profiles, sorted."""
    root = _bundled_dir()
    try:
        entries = list(root.iterdir())
    except (OSError, FileNotFoundError):
        return []
    return sorted(e.name[: -len(".toml")] for e in entries if e.name.endswith(".toml") and e.is_file())


def profile_for_release(release: str | None) -> str:
    """The bundled profile named after an SAE release if there is one, else ``"default"``."""
    if release:
        name = str(release).strip()
        if name in available_profiles():
            return name
    return "default"


@dataclasses.dataclass(frozen=True)
class _Source:
    ident: Any  # identity for cycle detection
    name: str
    display: str  # what error messages call the file
    handle: Any  # Path or Traversable
    bundled: bool

    def read_bytes(self) -> bytes:
        return self.handle.read_bytes()

    def sibling(self, rel: str) -> Any:
        if isinstance(self.handle, Path):
            return (self.handle.parent / rel).resolve()
        # A bundled Traversable: relative paths stay inside the bundled folder.
        return _bundled_dir().joinpath(rel)


def _bundled_source(name: str) -> _Source | None:
    root = _bundled_dir()
    handle = root.joinpath(f"{name}.toml")
    try:
        if not handle.is_file():
            return None
    except OSError:  # pragma: no cover
        return None
    if not isinstance(handle, Path):
        try:
            handle = Path(os.fspath(handle))  # type: ignore[arg-type]
        except TypeError:
            pass
    display = str(handle)
    return _Source(ident=("bundled", name), name=name, display=display, handle=handle, bundled=True)


def _path_source(path: Path) -> _Source:
    path = Path(path).expanduser()
    resolved = path.resolve()
    return _Source(ident=resolved, name=path.stem, display=str(path), handle=resolved, bundled=False)


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or "/" in text or os.sep in text or (os.altsep or "/") in text


def _suggest(word: str, options: Iterable[str]) -> str:
    options = [o for o in options]
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if match:
        return f"did you mean '{match[0]}'?"
    return "valid: " + ", ".join(f"'{o}'" for o in options)


def _resolve_entry(name_or_path: str | os.PathLike[str]) -> _Source:
    if isinstance(name_or_path, os.PathLike):
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(f"{path}: threshold profile file not found")
        return _path_source(path)
    text = str(name_or_path).strip()
    if not text:
        raise ProfileError("empty threshold profile name; bundled: " + ", ".join(available_profiles()))
    if _looks_like_path(text):
        path = Path(text)
        if not path.is_file():
            hint = ""
            if path.stem in available_profiles():
                hint = f"; for the bundled profile use the name '{path.stem}'"
            raise ProfileError(f"{text}: threshold profile file not found{hint}")
        return _path_source(path)
    src = _bundled_source(text)
    if src is not None:
        return src
    if Path(text).is_file():
        return _path_source(Path(text))
    raise ProfileError(
        f"unknown threshold profile '{text}': {_suggest(text, available_profiles())} "
        "(give a bundled profile name or a path to a .toml file)"
    )


def _resolve_extends(target: Any, child: _Source) -> _Source:
    where = f"{child.display}: [profile] key 'extends'"
    if not isinstance(target, str) or not target.strip():
        raise ProfileError(f"{where}: must be a non-empty string naming a profile, got {target!r}")
    target = target.strip()
    if _looks_like_path(target):
        if Path(target).is_absolute():
            handle: Any = Path(target)
        else:
            handle = child.sibling(target)
        if isinstance(handle, Path):
            if not handle.is_file():
                raise ProfileError(f"{where}: profile file '{target}' not found (looked at {handle})")
            return _path_source(handle)
        if not handle.is_file():
            raise ProfileError(f"{where}: bundled profile file '{target}' not found")
        return _Source(("bundled", handle.name), Path(handle.name).stem, str(handle), handle, True)
    src = _bundled_source(target)
    if src is None:
        raise ProfileError(
            f"{where}: unknown profile '{target}'; {_suggest(target, available_profiles())} "
            "(bundled names, or a path ending in .toml relative to this file)"
        )
    return src


# --------------------------------------------------------------------------- parsing

_LINE_COL = re.compile(r"at line (\d+), column (\d+)")


def _read_toml(src: _Source) -> dict[str, Any]:
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{src.display}: cannot read threshold profile: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{src.display}: not valid UTF-8 TOML: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"{src.display}: TOML syntax error: {exc}"
        m = _LINE_COL.search(str(exc))
        if m:
            lines = text.splitlines()
            lineno = int(m.group(1))
            if 1 <= lineno <= len(lines):
                msg += f"\n    line {lineno}: {lines[lineno - 1].rstrip()}"
        raise ProfileError(msg) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return f"{type(value).__name__} {value!r}"


@dataclasses.dataclass
class _Parsed:
    extends: Any
    description: str | None
    settings: dict[str, Any]
    checks: list[CheckSpec]
    disabled: set[str]


def _parse_settings(table: Mapping[str, Any], src: _Source) -> tuple[Any, str | None, dict[str, Any]]:
    extends = None
    description = None
    settings: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{src.display}: [profile] key '{key}'"
        if key == "extends":
            extends = value
        elif key == "description":
            if not isinstance(value, str):
                raise ProfileError(f"{where}: must be a string, got {_type_name(value)}")
            description = value
        elif key == "outlier_norm":
            if isinstance(value, str):
                word = value.strip().lower()
                if word == "auto":
                    settings[key] = "auto"
                elif word in ("off", "none"):
                    settings[key] = None
                else:
                    raise ProfileError(
                        f"{where}: must be a positive number, \"auto\" or \"off\", got {value!r}; "
                        + _suggest(word, ("auto", "off"))
                    )
            elif _is_number(value) and math.isfinite(value) and value > 0:
                settings[key] = float(value)
            else:
                raise ProfileError(
                    f"{where}: must be a positive finite number, \"auto\" or \"off\", got {_type_name(value)}"
                )
        elif key == "exclude_special_tokens":
            if not isinstance(value, bool):
                raise ProfileError(f"{where}: must be true or false, got {_type_name(value)}")
            settings[key] = value
        else:
            raise ProfileError(f"{where}: unknown profile setting; {_suggest(key, PROFILE_KEYS)}")
    return extends, description, settings


def _parse_check(scope: str, metric: str, table: Any, src: _Source) -> tuple[CheckSpec | None, bool]:
    """Validate one ``[scope.metric]`` table. Returns (spec or None, enabled)."""
    name = f"{scope}.{metric}"
    where = f"{src.display}: [{name}]"
    valid = SCOPE_METRICS[scope]
    if metric not in valid:
        other = [s for s in SCOPES if s != scope and metric in SCOPE_METRICS[s]]
        hint = f"'{metric}' is a {other[0]} metric: did you mean [{other[0]}.{metric}]?" if other else _suggest(metric, valid)
        raise ProfileError(f"{where}: unknown metric '{metric}' for scope '{scope}'; {hint}")
    if metric in LIST_METRICS or metric.endswith("_by_position"):
        raise ProfileError(
            f"{where}: metric '{metric}' is a list (one value per position or block), "
            "not a scalar; scalar bounds cannot check it"
        )
    if not isinstance(table, dict):
        raise ProfileError(
            f"{src.display}: [{scope}] key '{metric}': must be a table of bounds "
            f"(e.g. [{name}] with max = ...), got {_type_name(table)}"
        )
    severity = "fail"
    enabled = True
    bounds: list[tuple[str, float]] = []
    for key, value in table.items():
        kwhere = f"{where} key '{key}'"
        if key == "severity":
            if not isinstance(value, str) or value not in SEVERITIES:
                shown = repr(value) if isinstance(value, str) else _type_name(value)
                raise ProfileError(
                    f"{kwhere}: severity must be \"fail\" or \"warn\", got {shown}; "
                    + _suggest(str(value).lower(), SEVERITIES)
                )
            severity = value
        elif key == "enabled":
            if not isinstance(value, bool):
                raise ProfileError(f"{kwhere}: must be true or false, got {_type_name(value)}")
            enabled = value
        elif key in BOUND_KEYS:
            if key in RELATIVE_BOUNDS and scope != "finetune":
                if metric in MODEL_METRIC_KEYS:
                    hint = f"did you mean [finetune.{metric}]?"
                else:  # a paired metric already compares the two models
                    plain = "min" if key == "max_decrease_from_base" else "max"
                    hint = f"a paired metric already compares base and finetune: did you mean '{plain}'?"
                raise ProfileError(
                    f"{kwhere}: '{key}' compares a finetune with the base, so it is only valid "
                    f"in [finetune.*] checks; {hint}"
                )
            if not _is_number(value):
                raise ProfileError(f"{kwhere}: bound must be a number, got {_type_name(value)}")
            if not math.isfinite(value):
                raise ProfileError(f"{kwhere}: bound must be finite, got {value!r}")
            bounds.append((key, float(value)))
        else:
            raise ProfileError(
                f"{kwhere}: unknown bound key (bad operator); "
                + _suggest(key, tuple(BOUND_KEYS) + CHECK_OPTION_KEYS)
            )
    if not enabled:
        return None, False
    if not bounds:
        raise ProfileError(
            f"{where}: check holds no bound; add one of {', '.join(BOUND_KEYS)} "
            "(or enabled = false to drop an inherited check)"
        )
    b = dict(bounds)
    if "min" in b and "max" in b and b["min"] > b["max"]:
        raise ProfileError(f"{where} key 'min': min {b['min']!r} > max {b['max']!r}, the check can never pass")
    return CheckSpec(scope=scope, metric=metric, bounds=tuple(bounds), severity=severity, source=src.display), True


def _parse(raw: Mapping[str, Any], src: _Source) -> _Parsed:
    extends: Any = None
    description: str | None = None
    settings: dict[str, Any] = {}
    checks: list[CheckSpec] = []
    disabled: set[str] = set()
    all_metrics = set(MODEL_METRIC_KEYS) | set(PAIRED_METRIC_KEYS)
    for top, value in raw.items():
        if top == "profile":
            if not isinstance(value, dict):
                raise ProfileError(f"{src.display}: key 'profile' must be a table [profile], got {_type_name(value)}")
            extends, description, settings = _parse_settings(value, src)
            continue
        if top not in SCOPES:
            if top in all_metrics:
                scope = "paired" if top in PAIRED_METRIC_KEYS else "finetune"
                hint = f"a check table is [<scope>.<metric>]: did you mean [{scope}.{top}]?"
                table = top
            else:
                first = None
                if isinstance(value, dict):
                    first = next((k for k, v in value.items() if isinstance(v, dict)), None)
                table = f"{top}.{first}" if first is not None else top
                match = difflib.get_close_matches(top, SCOPES + ("profile",), n=1, cutoff=0.6)
                if match and first is not None and match[0] in SCOPES:
                    hint = f"did you mean '{match[0]}' ([{match[0]}.{first}])?"
                else:
                    hint = _suggest(top, SCOPES + ("profile",))
            raise ProfileError(f"{src.display}: [{table}]: unknown scope '{top}'; {hint}")
        if not isinstance(value, dict):
            raise ProfileError(
                f"{src.display}: key '{top}' must be a table of checks like [{top}.<metric>], got {_type_name(value)}"
            )
        for metric, table in value.items():
            spec, enabled = _parse_check(top, metric, table, src)
            if spec is not None:
                checks.append(spec)
            else:
                disabled.add(f"{top}.{metric}")
    return _Parsed(extends, description, settings, checks, disabled)


def _load(src: _Source, chain: tuple[_Source, ...]) -> Profile:
    if any(s.ident == src.ident for s in chain):
        cycle = " -> ".join(s.display for s in chain + (src,))
        raise ProfileError(f"{chain[-1].display}: [profile] key 'extends': extends cycle: {cycle}")
    parsed = _parse(_read_toml(src), src)
    parent: Profile | None = None
    if parsed.extends is not None:
        parent = _load(_resolve_extends(parsed.extends, src), chain + (src,))

    own = {c.key: c for c in parsed.checks}
    merged: list[CheckSpec] = []
    if parent is not None:
        for spec in parent.checks:
            if spec.key in parsed.disabled:
                continue
            merged.append(own.pop(spec.key, spec))
    merged.extend(c for c in parsed.checks if c.key in own)

    settings: dict[str, Any] = dict(parent.settings) if parent is not None else {}
    settings.update(parsed.settings)
    description = parsed.description
    if description is None:
        description = parent.description if parent is not None else ""
    return Profile(
        name=src.name,
        path=src.display,
        description=description,
        checks=tuple(merged),
        settings=types.MappingProxyType(settings),
        extends=parent.name if parent is not None else None,
    )


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """Load a bundled profile by name (``"default"``, ``"toy-res"``, ...) or a ``.toml`` file.

    ``extends`` is resolved recursively. Raises :class:`ProfileError` on any
    problem, naming the file and key.
    """
    return _load(_resolve_entry(name_or_path), ())


# --------------------------------------------------------------------------- evaluation


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
        kind = "a list" if isinstance(raw, (list, tuple)) else f"not a number ({_type_name(raw)})"
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
