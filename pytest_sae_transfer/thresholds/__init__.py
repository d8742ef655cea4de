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

The bundled profiles are the top-level ``thresholds/`` folder of the repository,
installed as ``pytest_sae_transfer/profiles`` (see pyproject.toml).

Modules: ``vocabulary`` (scopes, metrics, bound keys, the data model) ·
``sources`` (finding bundled and user files) · ``watchlist`` (the ``[features]``
table: watched features, their bounds and checks) · ``parse`` (TOML into a
:class:`Profile`, with ``extends``) · ``evaluate`` (checks on a report).
May import: ``errors``, ``metrics.keys``, ``report``.
"""


from .evaluate import evaluate_checks, evaluate_pair, planned_checks
from .parse import load_profile
from .sources import available_profiles, profile_for_release
from .vocabulary import BOUND_KEYS, SCOPES, SETTINGS_KEYS, CheckSpec, Profile, ProfileError

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
    "planned_checks",
    "profile_for_release",
]
