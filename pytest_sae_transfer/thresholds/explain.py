"""A finetune's verdict in words: why it failed, grouped by what broke, and, apart from
that, what the warnings say about the SAE itself and about the priors.

Renderers call :func:`explain_verdict` (or :func:`explain_finetune` with a report)
and print :attr:`Explanation.lines` under the verdict, then :attr:`Explanation.warnings`::

    FAIL: on toy-code the SAE explains 0.37 less variance than on toy-base
    (reconstruction), fires 1.87x as many features per token as on toy-base
    (sparsity) and keeps only 6% of the features regular on toy-base (features)

Every phrase is built from a :class:`~pytest_sae_transfer.report.CheckResult` alone
(its metric, op, value and bound), so it works for any profile: a check this module
has no words for is quoted by id and value.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from .vocabulary import FAMILIES, family_of

if TYPE_CHECKING:  # pragma: no cover
    from ..report import CheckResult, FinetuneResult, TransferReport

#: Families in the order a failure is told; anything unknown comes last.
_ORDER = FAMILIES + ("other",)

#: Failed checks beyond each family's lead that the second line spells out.
_MAX_ALSO = 4


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What a renderer shows for one finetune.

    ``lines``: one or two lines, the verdict first (``"FAIL: ..."``, ``"PASS: ..."``).
    ``sae_warnings``: the SAE's own quality on the base model (never the finetune's fault).
    ``prior_warnings``: other failed warnings: the residual-stream prior, logit similarity,
    values undefined on this run.
    ``families``: the families of the failed checks, in the order told.
    """

    status: str
    lines: tuple[str, ...]
    sae_warnings: tuple[str, ...] = ()
    prior_warnings: tuple[str, ...] = ()
    families: tuple[str, ...] = ()

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.sae_warnings + self.prior_warnings


# ---------------------------------------------------------------------------- numbers


def _num(v: float) -> str:
    """Two decimals in the usual range, else three significant digits."""
    if not math.isfinite(v):
        return str(v)
    if v == 0 or 0.01 <= abs(v) < 1000:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _pct(v: float) -> str:
    """A share as a percentage: whole percent unless that would read 0% or 100% wrongly."""
    p = 100 * v
    if 0 < p < 1 or 99 < p < 100:
        return f"{p:.1f}%"
    return f"{p:.0f}%"


def _times(v: float) -> str:
    return f"{v:.2f}x"


# ---------------------------------------------------------------------------- phrases
# A phrase is a verb phrase whose subject is "the SAE" on the finetune. ``than`` is
# " than on <base>" for the first phrase of a headline and "" after it; ``base`` is the
# base model's name.

_Phrase = Callable[[float, str, str], str]

_RELATIVE_PHRASES: dict[tuple[str, str], _Phrase] = {
    ("ce_loss_delta", "increase"): lambda v, than, base: f"loses {_num(v)} nats more{than}",
    ("ce_loss_spliced", "increase"): lambda v, than, base: f"leaves a spliced loss {_num(v)} nats higher{than}",
    ("ce_loss_recovered", "decrease"): lambda v, than, base: f"recovers {_num(v)} less of the loss{than}",
    ("kl_div_spliced", "increase"): lambda v, than, base: f"drifts {_num(v)} nats further from the clean predictions{than}",
    ("explained_variance", "decrease"): lambda v, than, base: f"explains {_num(v)} less variance{than}",
    ("r2_pooled", "decrease"): lambda v, than, base: f"has {_num(v)} less pooled R2{than}",
    ("cossim", "decrease"): lambda v, than, base: f"reconstructs with a cosine {_num(v)} lower{than}",
    ("mse", "ratio"): lambda v, than, base: f"makes {_times(v)} the reconstruction error it makes on {base}",
    ("l0", "ratio"): lambda v, than, base: f"fires {_times(v)} as many features per token as on {base}",
    ("dead_fraction", "increase"): lambda v, than, base: f"has {_pct(v)} more dead features{than}",
    ("dense_fraction", "increase"): lambda v, than, base: f"has {_pct(v)} more dense features{than}",
}

_VALUE_PHRASES: dict[str, _Phrase] = {
    "ce_loss_delta": lambda v, than, base: f"costs {_num(v)} nats of loss",
    "ce_loss_recovered": lambda v, than, base: f"recovers only {_num(v)} of the loss",
    "kl_div_spliced": lambda v, than, base: f"drifts {_num(v)} nats from the clean predictions",
    "explained_variance": lambda v, than, base: f"explains only {_num(v)} of the variance",
    "r2_pooled": lambda v, than, base: f"reaches a pooled R2 of only {_num(v)}",
    "l0": lambda v, than, base: f"fires {_num(v)} features per token",
    "feature_transfer_rate": lambda v, than, base: f"keeps only {_pct(v)} of the features regular on {base}",
    "activation_similarity_mean": lambda v, than, base: f"keeps its features' activations at a mean correlation of only {_num(v)} with {base}",
    "activation_similarity_median": lambda v, than, base: f"keeps its features' activations at a median correlation of only {_num(v)} with {base}",
    "activation_similarity_frac_above_0_8": lambda v, than, base: f"keeps only {_pct(v)} of its shared features above 0.8 activation similarity",
    "density_log10_pearson": lambda v, than, base: f"keeps its feature densities at a correlation of only {_num(v)} with {base}",
    "density_log10_pearson_resolved": lambda v, than, base: f"keeps its feature densities at a correlation of only {_num(v)} with {base}",
    "dead_shift_fraction": lambda v, than, base: f"sees {_pct(v)} of its features turn dead or alive",
    "dense_shift_fraction": lambda v, than, base: f"sees {_pct(v)} of its features turn dense or stop being dense",
    "logit_similarity_mean": lambda v, than, base: f"keeps a mean logit similarity of only {_num(v)}",
    "resid_cosine_mean": lambda v, than, base: f"reads a residual stream at a cosine of only {_num(v)} to {base}'s",
    "n_tokens": lambda v, than, base: f"was measured on only {int(v):,} tokens, too few to judge (raise --sae-tokens)",
    "nonfinite_fraction": lambda v, than, base: f"meets NaN/Inf activations on {_pct(v)} of the tokens",
    "nonfinite_loss_fraction": lambda v, than, base: f"meets a NaN/Inf loss on {_pct(v)} of the tokens",
}

#: op -> (quantity, which end of the paired interval, or None for the point value)
_QUANTITY = {
    "increase<=": ("increase", None),
    "decrease<=": ("decrease", None),
    "ratio<=": ("ratio", None),
    "ratio>=": ("ratio", None),
    "increase_ci_high<=": ("increase", "upper"),
    "decrease_ci_high<=": ("decrease", "upper"),
    "ratio_ci_high<=": ("ratio", "upper"),
    "ratio_ci_low>=": ("ratio", "lower"),
}


def _split(metric: str) -> tuple[str, str]:
    scope, _, key = metric.partition(".")
    return (scope, key) if key else ("", scope)


def _generic(c: "CheckResult") -> str:
    value = "no value" if c.value is None else _num(c.value)
    return f"fails {c.id} ({value})"


def failure_phrase(c: "CheckResult", base: str, first: bool = False) -> str:
    """A verb phrase for one failed check, subject "the SAE" (on the finetune)."""
    scope, key = _split(c.metric)
    if c.metric.startswith("feature["):
        return _watched_phrase(c)
    if c.value is None:
        return f"has no usable value for {c.metric}"
    v = float(c.value)
    than = f" than on {base}" if first else ""
    quantity, end = _QUANTITY.get(c.op, (None, None))
    if quantity is not None:
        phrase = _RELATIVE_PHRASES.get((key, quantity))
        if phrase is None:
            return _generic(c)
        text = phrase(v, than, base)
        return text + (f" at the {end} end of its 95% interval" if end else "")
    if c.op in ("ci_low>=", "ci_high<="):
        phrase = _VALUE_PHRASES.get(key)
        if phrase is None:
            return _generic(c)
        return phrase(v, "", base) + f" at the {'lower' if c.op == 'ci_low>=' else 'upper'} end of its 95% interval"
    phrase = _VALUE_PHRASES.get(key)
    if phrase is None or scope == "base":
        return _generic(c)
    return phrase(v, "", base)


def _watched_phrase(c: "CheckResult") -> str:
    """A watched feature's failed check: the feature (and its label) and what broke."""
    name = c.id.split("].", 1)[0] + "]" if "]." in c.id else c.metric.split(".", 1)[0]
    quantity = c.metric.split("].", 1)[-1]
    if c.value is None:
        return f"cannot judge watched {name} ({quantity})"
    if quantity == "density_finetune":
        return f"lost watched {name} (it no longer fires)"
    if quantity == "density_ratio":
        return f"changes how often watched {name} fires ({_times(float(c.value))} its base density)"
    return f"changes what watched {name} responds to ({quantity.replace('_', ' ')} {_num(float(c.value))})"


def _join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _rank(c: "CheckResult") -> int:
    """Point-value checks tell a failure better than interval ends."""
    return 1 if "ci_" in c.op else 0


# ---------------------------------------------------------------------------- warnings

_SAE_WORDS: dict[str, Callable[[float], str]] = {
    "ce_loss_recovered": lambda v: f"recovers only {_num(v)} of the loss",
    "ce_loss_delta": lambda v: f"costs {_num(v)} nats of loss",
    "explained_variance": lambda v: f"explains only {_num(v)} of the variance",
    "r2_pooled": lambda v: f"reaches a pooled R2 of only {_num(v)}",
    "dense_fraction": lambda v: f"has {_pct(v)} of its features dense",
    "dead_fraction": lambda v: f"has {_pct(v)} of its features dead",
    "l0": lambda v: f"fires {_num(v)} features per token",
    "kl_div_spliced": lambda v: f"drifts {_num(v)} nats from the clean predictions",
}


def _sae_warning(checks: Sequence["CheckResult"], base: str) -> str:
    parts = []
    for c in checks:
        _, key = _split(c.metric)
        words = _SAE_WORDS.get(key)
        if c.value is None or words is None:
            parts.append(f"fails {c.id} ({'no value' if c.value is None else _num(c.value)})")
        else:
            parts.append(words(float(c.value)))
    return f"the SAE is weak on {base} itself: it {_join(parts)}; transfer verdicts on it mean little"


def _prior_warning(c: "CheckResult", base: str, finetune: str) -> str:
    _, key = _split(c.metric)
    if c.value is None:
        return f"{c.metric} is undefined on this run, so it was not judged ({c.id})"
    v = float(c.value)
    if key == "resid_cosine_mean":
        return (
            f"the residual stream of {finetune} moved away from {base}'s (cosine {_num(v)}, warning below "
            f"{_num(c.bound)}): a prior on transfer, not its outcome"
        )
    if key == "resid_euclidean_mean":
        return f"the residual stream of {finetune} moved away from {base}'s (distance {_num(v)}): a prior on transfer, not its outcome"
    if key == "logit_similarity_mean":
        return (
            f"the SAE's decoder directions read out differently through {finetune}'s unembedding (mean logit "
            f"similarity {_num(v)}, warning below {_num(c.bound)}); this mostly tracks how much the unembedding changed"
        )
    return f"{c.id}: {c.message}" if c.message else f"{c.id} (value {_num(v)})"


# ---------------------------------------------------------------------------- the verdict


def explain_verdict(checks: Iterable["CheckResult"], base: str = "the base model", finetune: str = "the finetune") -> Explanation:
    """Why a finetune passed or failed, in one or two lines, and its warnings, apart.

    ``checks`` are one finetune's :class:`~pytest_sae_transfer.report.CheckResult` objects;
    ``base`` and ``finetune`` are the models' names as the report gives them.
    """
    checks = list(checks)
    if not checks:
        return Explanation("NO CHECKS", (f"NO CHECKS: no thresholds were checked on {finetune}",))
    failed = [c for c in checks if not c.passed and c.severity == "fail"]
    warned = [c for c in checks if not c.passed and c.severity != "fail"]

    sae_checks = [c for c in warned if _split(c.metric)[0] == "base" and family_of(c.metric) != "run" and c.value is not None]
    others = [c for c in warned if c not in sae_checks]
    sae_warnings = (_sae_warning(sae_checks, base),) if sae_checks else ()
    prior_warnings = tuple(_prior_warning(c, base, finetune) for c in others)

    if not failed:
        n_hard = sum(1 for c in checks if c.severity == "fail")
        held = f"all {n_hard} gating check{'s' if n_hard != 1 else ''} hold" if n_hard else "no check can fail it"
        n_warn = len(warned)
        warn = f", {n_warn} warning{'s' if n_warn != 1 else ''} (below)" if n_warn else ""
        line = f"PASS: the SAE works on {finetune} as on {base} ({held}{warn})"
        return Explanation("PASS", (line,), sae_warnings, prior_warnings)

    by_family: dict[str, list[CheckResult]] = {}
    for c in failed:
        by_family.setdefault(family_of(c.metric), []).append(c)
    families = [f for f in _ORDER if f in by_family]
    leads: list[CheckResult] = []
    for fam in families:
        leads.append(min(by_family[fam], key=_rank))  # min is stable: profile order among equals
    parts = []
    for i, (fam, lead) in enumerate(zip(families, leads)):
        parts.append(f"{failure_phrase(lead, base, first=(i == 0))} ({fam})")
    headline = f"FAIL: on {finetune} the SAE {_join(parts)}"
    lines = [headline]
    # An interval end past its bound adds nothing when the point value already failed.
    point_failed = {c.metric for c in failed if "ci_" not in c.op}
    rest = [c for c in failed if c not in leads and not ("ci_" in c.op and c.metric in point_failed)]
    if rest:
        shown = rest[:_MAX_ALSO]
        groups = []
        for fam in _ORDER:
            phrases = [failure_phrase(c, base) for c in shown if family_of(c.metric) == fam]
            if phrases:
                groups.append(f"{_join(phrases)} ({fam})")
        more = len(rest) - len(shown)
        tail = f"; and {more} more" if more else ""
        lines.append(f"also: it {'; '.join(groups)}{tail} ({len(failed)} of {len(checks)} checks failed)")
    return Explanation("FAIL", tuple(lines), sae_warnings, prior_warnings, tuple(families))


def explain_finetune(report: "TransferReport", finetune: "FinetuneResult") -> Explanation:
    """:func:`explain_verdict` for one finetune of a report."""
    return explain_verdict(finetune.checks, report.base.model, finetune.model)
