"""The words a threshold profile may use, and what a parsed profile is."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

from ..errors import InputError
from ..metrics.keys import MODEL_METRIC_KEYS, PAIRED_METRIC_KEYS

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


class ProfileError(InputError):
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
    features: Any = None  # the [features] watchlist (a watchlist.Watchlist), or None

    def check(self, key: str) -> CheckSpec | None:
        """The check for ``"scope.metric"``, or None."""
        for spec in self.checks:
            if spec.key == key:
                return spec
        return None

