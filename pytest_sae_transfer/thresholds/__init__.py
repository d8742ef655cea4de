"""Threshold profiles: TOML files of pass/fail checks on a :class:`TransferReport`.

A profile is a TOML file (docs/metrics.md, "Threshold profiles"). Each table
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
    max_increase_ci_high = 0.4   # upper end of the paired interval of finetune - base <= 0.4
    max_ci_high = 0.6            # upper end of the value's own ci95 <= 0.6

    [finetune.l0]
    max_ratio_to_base = 1.5      # finetune / base <= 1.5
    min_ratio_to_base = 0.66     # finetune / base >= 0.66

    [paired.feature_transfer_rate]
    min = 0.5
    if_undefined = "warn"        # a null value (undefined on this run) warns instead of failing

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
  numbers). A check with ``if_undefined = "warn"`` turns a null or NaN value
  (present in the report, but undefined on this run) into a failed warning. An
  infinite value, a non-scalar value and an undefined ratio (base value 0, finetune
  not 0) always fail; 0 / 0 is a ratio of 1 (nothing changed).
* Relative bounds (``*_over_base``, ``*_from_base``, ``*_ratio_*``) are valid in
  ``[finetune.*]`` only. Their results carry the *paired* interval of the quantity
  checked (finetune − base, base − finetune or finetune / base, resampled on the same
  contexts), and their ``_ci_`` variants bound an end of that interval.
* Derived quantities (increase, decrease, ratio) are compared with a relative
  tolerance of 1e-9 so that e.g. ``0.8 - 0.5 <= 0.3`` passes despite binary
  floating point; plain ``min``/``max``/ci bounds compare exactly.

Threshold files are data: they are parsed with :mod:`tomllib` only.

The bundled profiles are the top-level ``thresholds/`` folder of the repository,
installed as ``pytest_sae_transfer/profiles`` (see pyproject.toml).

Modules: ``vocabulary`` (scopes, metrics and their families, bound keys, the data
model) · ``sources`` (finding bundled and user files) · ``watchlist`` (the ``[features]``
table: watched features, their bounds and checks) · ``parse`` (TOML into a
:class:`Profile`, with ``extends``) · ``evaluate`` (checks on a report) ·
``explain`` (a verdict in words, grouped by what broke).
May import: ``errors``, ``metrics.keys``, ``report``.
"""


from .evaluate import evaluate_checks, evaluate_pair, planned_checks
from .explain import Explanation, explain_finetune, explain_verdict
from .parse import load_profile
from .sources import available_profiles, profile_for_release
from .vocabulary import (
    BOUND_KEYS,
    FAMILIES,
    METRIC_FAMILY,
    SCOPES,
    SETTINGS_KEYS,
    CheckSpec,
    Profile,
    ProfileError,
    family_of,
)

__all__ = [
    "BOUND_KEYS",
    "CheckSpec",
    "Explanation",
    "FAMILIES",
    "METRIC_FAMILY",
    "Profile",
    "ProfileError",
    "SCOPES",
    "SETTINGS_KEYS",
    "available_profiles",
    "evaluate_checks",
    "evaluate_pair",
    "explain_finetune",
    "explain_verdict",
    "family_of",
    "load_profile",
    "planned_checks",
    "profile_for_release",
]
