"""A profile's TOML, validated key by key, into a :class:`~.vocabulary.Profile`."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from typing import Any, Mapping

from ..metrics.keys import CHECKABLE_PAIRED_KEYS, MODEL_METRIC_KEYS
from .sources import Source, is_number, read_toml, resolve_entry, resolve_extends, suggest, type_name
from .vocabulary import (
    BOUND_KEYS,
    CHECK_OPTION_KEYS,
    IF_UNDEFINED,
    LIST_METRICS,
    PROFILE_KEYS,
    RELATIVE_BOUNDS,
    SCOPE_METRICS,
    SCOPES,
    SEVERITIES,
    CheckSpec,
    Profile,
    ProfileError,
)
from .watchlist import ParsedFeatures, merge_watchlists, parse_features_table


@dataclasses.dataclass
class _Parsed:
    extends: Any
    description: str | None
    settings: dict[str, Any]
    checks: list[CheckSpec]
    disabled: set[str]
    features: ParsedFeatures | None = None


def _parse_settings(table: Mapping[str, Any], src: Source) -> tuple[Any, str | None, dict[str, Any]]:
    extends = None
    description = None
    settings: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{src.display}: [profile] key '{key}'"
        if key == "extends":
            extends = value
        elif key == "description":
            if not isinstance(value, str):
                raise ProfileError(f"{where}: must be a string, got {type_name(value)}")
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
                        + suggest(word, ("auto", "off"))
                    )
            elif is_number(value) and math.isfinite(value) and value > 0:
                settings[key] = float(value)
            else:
                raise ProfileError(
                    f"{where}: must be a positive finite number, \"auto\" or \"off\", got {type_name(value)}"
                )
        elif key == "exclude_special_tokens":
            if not isinstance(value, bool):
                raise ProfileError(f"{where}: must be true or false, got {type_name(value)}")
            settings[key] = value
        else:
            raise ProfileError(f"{where}: unknown profile setting; {suggest(key, PROFILE_KEYS)}")
    return extends, description, settings


def _parse_check(scope: str, metric: str, table: Any, src: Source) -> tuple[CheckSpec | None, bool]:
    """Validate one ``[scope.metric]`` table. Returns (spec or None, enabled)."""
    name = f"{scope}.{metric}"
    where = f"{src.display}: [{name}]"
    _check_metric(scope, metric, table, where, src)
    options: dict[str, Any] = {"severity": "fail", "if_undefined": "fail", "enabled": True}
    bounds: list[tuple[str, float]] = []
    for key, value in table.items():
        kwhere = f"{where} key '{key}'"
        if key in BOUND_KEYS:
            bounds.append((key, _bound_value(scope, metric, key, value, kwhere)))
        elif key in CHECK_OPTION_KEYS:
            options[key] = _option_value(key, value, kwhere)
        else:
            raise ProfileError(
                f"{kwhere}: unknown bound key (bad operator); "
                + suggest(key, tuple(BOUND_KEYS) + CHECK_OPTION_KEYS)
            )
    if not options["enabled"]:
        return None, False
    if not bounds:
        raise ProfileError(
            f"{where}: check holds no bound; add one of {', '.join(BOUND_KEYS)} "
            "(or enabled = false to drop an inherited check)"
        )
    b = dict(bounds)
    for low, high in (("min", "max"), ("min_ratio_to_base", "max_ratio_to_base"), ("min_ratio_ci_low", "max_ratio_ci_high")):
        if low in b and high in b and b[low] > b[high]:
            raise ProfileError(f"{where} key '{low}': {low} {b[low]!r} > {high} {b[high]!r}, the check can never pass")
    spec = CheckSpec(scope=scope, metric=metric, bounds=tuple(bounds), severity=options["severity"], source=src.display,
                     if_undefined=options["if_undefined"])
    return spec, True


def _check_metric(scope: str, metric: str, table: Any, where: str, src: Source) -> None:
    """The metric exists in its scope, is a scalar, and its entry is a table of bounds."""
    valid = SCOPE_METRICS[scope]
    if metric not in valid:
        other = [s for s in SCOPES if s != scope and metric in SCOPE_METRICS[s]]
        hint = f"'{metric}' is a {other[0]} metric: did you mean [{other[0]}.{metric}]?" if other else suggest(metric, valid)
        raise ProfileError(f"{where}: unknown metric '{metric}' for scope '{scope}'; {hint}")
    if metric in LIST_METRICS or metric.endswith("_by_position"):
        raise ProfileError(
            f"{where}: metric '{metric}' is a list (one value per position or block), "
            "not a scalar; scalar bounds cannot check it"
        )
    if not isinstance(table, dict):
        raise ProfileError(
            f"{src.display}: [{scope}] key '{metric}': must be a table of bounds "
            f"(e.g. [{scope}.{metric}] with max = ...), got {type_name(table)}"
        )


def _option_value(key: str, value: Any, kwhere: str) -> Any:
    """``severity``, ``if_undefined`` or ``enabled``, validated."""
    if key == "enabled":
        if not isinstance(value, bool):
            raise ProfileError(f"{kwhere}: must be true or false, got {type_name(value)}")
        return value
    allowed = SEVERITIES if key == "severity" else IF_UNDEFINED
    if not isinstance(value, str) or value not in allowed:
        shown = repr(value) if isinstance(value, str) else type_name(value)
        raise ProfileError(f"{kwhere}: {key} must be \"fail\" or \"warn\", got {shown}; " + suggest(str(value).lower(), allowed))
    return value


def _bound_value(scope: str, metric: str, key: str, value: Any, kwhere: str) -> float:
    """A bound's number, where its kind of bound is allowed."""
    if key in RELATIVE_BOUNDS and scope != "finetune":
        if metric in MODEL_METRIC_KEYS:
            hint = f"did you mean [finetune.{metric}]?"
        else:  # a paired metric already compares the two models
            plain = "min" if key.startswith("min_") or "decrease" in key else "max"
            hint = f"a paired metric already compares base and finetune: did you mean '{plain}'?"
        raise ProfileError(
            f"{kwhere}: '{key}' compares a finetune with the base, so it is only valid "
            f"in [finetune.*] checks; {hint}"
        )
    if not is_number(value):
        raise ProfileError(f"{kwhere}: bound must be a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise ProfileError(f"{kwhere}: bound must be finite, got {value!r}")
    return float(value)


def _parse(raw: Mapping[str, Any], src: Source) -> _Parsed:
    extends: Any = None
    description: str | None = None
    settings: dict[str, Any] = {}
    checks: list[CheckSpec] = []
    disabled: set[str] = set()
    features: ParsedFeatures | None = None
    all_metrics = set(MODEL_METRIC_KEYS) | set(CHECKABLE_PAIRED_KEYS)
    for top, value in raw.items():
        if top == "features":
            features = parse_features_table(value, src)
            continue
        if top == "profile":
            if not isinstance(value, dict):
                raise ProfileError(f"{src.display}: key 'profile' must be a table [profile], got {type_name(value)}")
            extends, description, settings = _parse_settings(value, src)
            continue
        if top not in SCOPES:
            if top in all_metrics:
                scope = "paired" if top in CHECKABLE_PAIRED_KEYS else "finetune"
                hint = f"a check table is [<scope>.<metric>]: did you mean [{scope}.{top}]?"
                table = top
            else:
                first = None
                if isinstance(value, dict):
                    first = next((k for k, v in value.items() if isinstance(v, dict)), None)
                table = f"{top}.{first}" if first is not None else top
                match = difflib.get_close_matches(top, SCOPES + ("profile", "features"), n=1, cutoff=0.6)
                if match and first is not None and match[0] in SCOPES:
                    hint = f"did you mean '{match[0]}' ([{match[0]}.{first}])?"
                else:
                    hint = suggest(top, SCOPES + ("profile", "features"))
            raise ProfileError(f"{src.display}: [{table}]: unknown scope '{top}'; {hint}")
        if not isinstance(value, dict):
            raise ProfileError(
                f"{src.display}: key '{top}' must be a table of checks like [{top}.<metric>], got {type_name(value)}"
            )
        for metric, table in value.items():
            spec, enabled = _parse_check(top, metric, table, src)
            if spec is not None:
                checks.append(spec)
            else:
                disabled.add(f"{top}.{metric}")
    return _Parsed(extends, description, settings, checks, disabled, features)


def _load(src: Source, chain: tuple[Source, ...]) -> Profile:
    if any(s.ident == src.ident for s in chain):
        cycle = " -> ".join(s.display for s in chain + (src,))
        raise ProfileError(f"{chain[-1].display}: [profile] key 'extends': extends cycle: {cycle}")
    parsed = _parse(read_toml(src), src)
    parent: Profile | None = None
    if parsed.extends is not None:
        parent = _load(resolve_extends(parsed.extends, src), chain + (src,))

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
        features=merge_watchlists(parent.features if parent is not None else None, parsed.features),
    )


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """Load a bundled profile by name (``"default"``, ``"toy-res"``, ...) or a ``.toml`` file.

    ``extends`` is resolved recursively. Raises :class:`ProfileError` on any
    problem, naming the file and key.
    """
    return _load(resolve_entry(name_or_path), ())

