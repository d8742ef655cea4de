"""The words a threshold profile may use, and what a parsed profile is."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

from ..errors import InputError
from ..metrics.keys import CHECKABLE_PAIRED_KEYS, MODEL_METRIC_KEYS

SCOPES: tuple[str, ...] = ("base", "finetune", "paired")

SCOPE_METRICS: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {"base": MODEL_METRIC_KEYS, "finetune": MODEL_METRIC_KEYS, "paired": CHECKABLE_PAIRED_KEYS}
)


#: What a metric says something about; a verdict is explained family by family.
#: ``run`` is about the measurement itself, ``residual`` about how far the finetune moved
#: the model (a prior on transfer, not its outcome).
FAMILIES: tuple[str, ...] = ("loss", "reconstruction", "sparsity", "features", "residual", "run")

METRIC_FAMILY: Mapping[str, str] = types.MappingProxyType(
    {
        # per model
        "n_tokens": "run",
        "l0": "sparsity",
        "ce_loss_clean": "loss",
        "ce_loss_spliced": "loss",
        "ce_loss_delta": "loss",
        "ce_loss_zero_ablation": "loss",
        "ce_loss_recovered": "loss",
        "kl_div_spliced": "loss",
        "explained_variance": "reconstruction",
        "r2_pooled": "reconstruction",
        "mse": "reconstruction",
        "cossim": "reconstruction",
        "dead_fraction": "sparsity",
        "dense_fraction": "sparsity",
        "outlier_fraction": "run",
        "nonfinite_fraction": "run",
        "nonfinite_loss_fraction": "run",
        # paired
        "resid_cosine_mean": "residual",
        "resid_cosine_by_position": "residual",
        "resid_euclidean_mean": "residual",
        "resid_euclidean_by_position": "residual",
        "density_log10_pearson": "features",
        "n_dead_base_only": "features",
        "n_dead_finetune_only": "features",
        "dead_shift_fraction": "features",
        "n_regular_features": "features",
        "activation_similarity_mean": "features",
        "activation_similarity_median": "features",
        "activation_similarity_frac_above_0_8": "features",
        "n_activation_similarity_undefined": "features",
        "logit_similarity_mean": "features",
        "logit_similarity_median": "features",
        "dead_activation_error_base_only_mean": "features",
        "dead_activation_error_finetune_only_mean": "features",
        "unembed_frobenius_ratio": "residual",
        "weight_deviation": "residual",
        "n_regular_base": "features",
        "n_transferred": "features",
        "feature_transfer_rate": "features",
        "density_log10_pearson_resolved": "features",
        "n_dense_base_only": "features",
        "n_dense_finetune_only": "features",
        "dense_shift_fraction": "features",
    }
)


def family_of(metric: str) -> str:
    """The family of ``"scope.metric"`` or of a bare metric key (a watched feature's checks,
    ``"feature[311].activation_similarity"``, are "features"); ``"other"`` if unknown."""
    if metric.startswith("feature["):
        return "features"
    return METRIC_FAMILY.get(metric.split(".", 1)[-1], "other")


#: Metrics whose value is a list (per position / per block): no scalar bound applies.
LIST_METRICS: frozenset[str] = frozenset(
    {"resid_cosine_by_position", "resid_euclidean_by_position", "weight_deviation"}
)


#: Bound key -> the ``op`` written into CheckResult, in evaluation order.
#:
#: The relative bounds compare the finetune with the base on the same tokens: the
#: increase (finetune - base), the decrease (base - finetune) or the ratio (finetune /
#: base). Their ``_ci_`` variants bound an end of the *paired* bootstrap interval of that
#: same quantity (``FinetuneResult.delta_ci95`` / ``ratio_ci95``), not the interval of
#: the finetune's own value.
BOUND_KEYS: Mapping[str, str] = types.MappingProxyType(
    {
        "min": ">=",
        "max": "<=",
        "max_increase_over_base": "increase<=",
        "max_decrease_from_base": "decrease<=",
        "max_ratio_to_base": "ratio<=",
        "min_ratio_to_base": "ratio>=",
        "min_ci_low": "ci_low>=",
        "max_ci_high": "ci_high<=",
        "max_increase_ci_high": "increase_ci_high<=",
        "max_decrease_ci_high": "decrease_ci_high<=",
        "max_ratio_ci_high": "ratio_ci_high<=",
        "min_ratio_ci_low": "ratio_ci_low>=",
    }
)


#: Bounds on a point value compared with the base's.
RELATIVE_POINT_BOUNDS: frozenset[str] = frozenset(
    {"max_increase_over_base", "max_decrease_from_base", "max_ratio_to_base", "min_ratio_to_base"}
)

#: Bounds on an end of the paired interval of a finetune-vs-base quantity.
RELATIVE_CI_BOUNDS: frozenset[str] = frozenset(
    {"max_increase_ci_high", "max_decrease_ci_high", "max_ratio_ci_high", "min_ratio_ci_low"}
)

#: Bounds relative to the base model's value: only meaningful for ``finetune.*``.
RELATIVE_BOUNDS: frozenset[str] = RELATIVE_POINT_BOUNDS | RELATIVE_CI_BOUNDS


#: Non-bound keys a check table may hold.
CHECK_OPTION_KEYS: tuple[str, ...] = ("severity", "enabled", "if_undefined")


SEVERITIES: tuple[str, ...] = ("fail", "warn")

#: What a ``fail`` check does when its value is present but null or NaN (undefined on
#: this run, e.g. a feature statistic when the base has no regular feature): fail, or
#: become a failed warning. A value absent from the report always fails.
IF_UNDEFINED: tuple[str, ...] = ("fail", "warn")


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
    if_undefined: str = "fail"  # one of IF_UNDEFINED

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

