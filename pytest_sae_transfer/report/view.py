"""The per-pair result object that fixtures hand to user tests.

``result.ce_loss_delta`` is the finetune's value, ``result.base.ce_loss_delta``
the base model's, ``result.resid_cosine_mean`` a paired metric, and
``result.activation_similarity`` the per-feature numpy array. Unknown names fail
with the nearest valid ones. ``result.feature(311)`` is one feature: its numbers,
and for the features the report lists or watches, its top contexts as text
(``result.feature(311).top_contexts("finetune")``).
"""

from __future__ import annotations

import difflib
import operator
from typing import Any, Mapping

from ..metrics.keys import FEATURE_VECTOR_KEYS
from .contexts import format_snippet
from .model import TransferReport
from .results import FinetuneResult, ModelResult

#: The models a feature's contexts and promoted tokens are recorded for.
FEATURE_SIDES: tuple[str, ...] = ("base", "finetune")


class MetricView:
    """Read-only attribute access to a mapping of metrics."""

    def __init__(self, name: str, values: Mapping[str, Any], ci95: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_ci95", dict(ci95 or {}))

    def __getattr__(self, key: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if key in values:
            return values[key]
        if key.startswith("__"):
            raise AttributeError(key)
        close = difflib.get_close_matches(key, list(values), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AttributeError(f"{object.__getattribute__(self, '_name')} has no metric {key!r}{hint}")

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("metric views are read-only")

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in object.__getattribute__(self, "_values")

    def __iter__(self):
        return iter(object.__getattribute__(self, "_values"))

    def keys(self):
        return object.__getattribute__(self, "_values").keys()

    def ci95(self, key: str) -> tuple[float, float] | None:
        interval = object.__getattribute__(self, "_ci95").get(key)
        return tuple(interval) if interval is not None else None

    def as_dict(self) -> dict[str, Any]:
        return dict(object.__getattribute__(self, "_values"))

    def __repr__(self) -> str:
        values = object.__getattribute__(self, "_values")
        shown = {k: v for k, v in values.items() if not isinstance(v, (list, tuple))}
        return f"<{object.__getattribute__(self, '_name')} {shown}>"


class PairResult:
    """One finetune measured against the base, with the SAE, on the same tokens."""

    def __init__(self, report: TransferReport, finetune: str) -> None:
        ft: FinetuneResult = report.finetune(finetune)
        base: ModelResult = report.base
        self.report = report
        self.name = finetune
        self.base_name = base.model
        self.finetune_result = ft
        self.metrics = MetricView(f"finetune {finetune!r}", ft.metrics, ft.ci95)
        self.base = MetricView(f"base {base.model!r}", base.metrics, base.ci95)
        self.paired = MetricView(f"pair {base.model!r} -> {finetune!r}", ft.paired, ft.paired_ci95)
        vectors = report.features.vectors.get(finetune, {}) if report.features is not None else {}
        self.features = MetricView(f"per-feature arrays of {finetune!r}", vectors)
        self.checks = list(ft.checks)
        self.notes = list(ft.notes)

    @property
    def passed(self) -> bool | None:
        return self.finetune_result.passed

    def value(self, qualified: str) -> Any:
        """A value by its report name: 'finetune.l0', 'base.l0', 'paired.resid_cosine_mean' or 'features.density_base'."""
        scope, _, key = qualified.partition(".")
        views = {"finetune": self.metrics, "base": self.base, "paired": self.paired, "features": self.features}
        if scope not in views or not key:
            raise KeyError(f"{qualified!r}: use <scope>.<metric> with scope one of {', '.join(views)}")
        return getattr(views[scope], key)

    def ci95(self, qualified: str) -> tuple[float, float] | None:
        scope, _, key = qualified.partition(".")
        if not key:
            scope, key = "finetune", qualified
        view = {"finetune": self.metrics, "base": self.base, "paired": self.paired}.get(scope)
        return view.ci95(key) if view is not None else None

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        for view in (self.__dict__.get("metrics"), self.__dict__.get("paired"), self.__dict__.get("features")):
            if view is not None and key in view:
                return view[key]
        known = list(self.__dict__.get("metrics", {})) + list(self.__dict__.get("paired", {})) + list(FEATURE_VECTOR_KEYS)
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AttributeError(f"no metric or per-feature array {key!r} for finetune {self.__dict__.get('name')!r}{hint}")

    def __repr__(self) -> str:
        return f"<PairResult {self.base_name!r} -> {self.name!r} passed={self.passed}>"

    @property
    def feature_section(self) -> Mapping[str, Any] | None:
        """The finetune's ``"features"`` section (report.feature_section), or None when the run made none."""
        section = getattr(self.finetune_result, "features", None)
        return section if isinstance(section, Mapping) and section else None

    def feature(self, feature_id: int) -> FeatureView:
        """One SAE feature on this pair: its numbers and, where recorded, its contexts as text."""
        section = self.feature_section
        vectors = self.features.as_dict()
        sizes = {len(v) for v in vectors.values() if hasattr(v, "__len__")}
        d_sae = min(sizes) if sizes else (section or {}).get("d_sae")
        try:
            if isinstance(feature_id, bool):
                raise TypeError
            fid = operator.index(feature_id)
        except TypeError:
            raise TypeError(f"a feature id is an integer; got {feature_id!r}") from None
        if d_sae is not None and not 0 <= fid < int(d_sae):
            raise IndexError(f"feature {fid} is outside the SAE's {d_sae} features [0, {d_sae})")
        card = (section or {}).get("cards", {}).get(str(fid))
        return FeatureView(self, fid, card, vectors)


class FeatureView:
    """One feature of one base/finetune pair. Numbers come from the per-feature arrays
    (every feature) or, without them, from the feature's card; contexts and promoted
    tokens exist for the features the report lists or watches (their cards)."""

    _NUMBERS = ("density_base", "density_finetune", "activation_similarity", "logit_similarity", "dead_activation_error")

    def __init__(self, pair: PairResult, feature_id: int, card: Mapping[str, Any] | None, vectors: Mapping[str, Any]) -> None:
        self.pair = pair
        self.id = feature_id
        self.card = dict(card) if card is not None else None
        self._vectors = vectors

    @property
    def label(self) -> str | None:
        if self.card is not None and self.card.get("label"):
            return self.card["label"]
        for entry in (self.pair.feature_section or {}).get("watched", ()):
            if entry.get("id") == self.id and entry.get("label"):
                return entry["label"]
        return None

    @property
    def name(self) -> str:
        return f"feature {self.id}" + (f" {self.label!r}" if self.label else "")

    def number(self, key: str) -> float | None:
        """A per-feature number by its vector name; None where undefined or not recorded."""
        if key not in self._NUMBERS:
            raise KeyError(f"{key!r} is not a per-feature number; have {', '.join(self._NUMBERS)}")
        value: Any = None
        arr = self._vectors.get(key)
        if arr is not None:
            value = arr[self.id]
        elif self.card is not None:
            value = self.card.get(key)
        if value is None:
            return None
        value = float(value)
        return value if value == value and abs(value) != float("inf") else None

    def __getattr__(self, key: str) -> Any:
        if key in FeatureView._NUMBERS:
            return self.number(key)
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def _side(self, model: str) -> str:
        if model not in FEATURE_SIDES:
            raise ValueError(f"model must be one of {', '.join(repr(s) for s in FEATURE_SIDES)}; got {model!r}")
        return model

    def _card_part(self, part: str, model: str) -> list[dict[str, Any]]:
        side = self._side(model)
        if self.card is None:
            section = self.pair.feature_section
            if section is None:
                raise LookupError(
                    f"{self.name}: the report of {self.pair.name!r} has no feature section, so no contexts were recorded"
                )
            have = sorted(int(k) for k in section.get("cards", {}))
            shown = ", ".join(map(str, have[:20])) + (f" (+{len(have) - 20} more)" if len(have) > 20 else "")
            raise LookupError(
                f"{self.name}: contexts are recorded for the report's worst-feature lists and watched features only "
                f"({len(have)} features: {shown or 'none'}); watch it to record them (--sae-features {self.id}, "
                "or ids = [...] in the profile's [features] table)"
            )
        entries = (self.card.get(part) or {}).get(side)
        if entries is None:
            raise LookupError(f"{self.name}: the run did not record {part.replace('_', ' ')} on the {side} model")
        return [dict(e) for e in entries]

    def contexts(self, model: str = "finetune") -> list[dict[str, Any]]:
        """The top activating contexts on ``model`` ("base" or "finetune"), best first: dicts with
        value, context, position, token_id and the text (left, token, right)."""
        return self._card_part("top_contexts", model)

    def top_contexts(self, model: str = "finetune", marks: tuple[str, str] = ("[[", "]]")) -> list[str]:
        """The top activating contexts on ``model`` as one-line text, the activating token
        between ``marks``: ``'…class Foo([[def]] bar(self)…'``."""
        return [format_snippet(e, marks) for e in self.contexts(model)]

    def promoted_tokens(self, model: str = "finetune") -> list[tuple[str, float | None]]:
        """The tokens this feature's decoder direction promotes most on ``model``'s unembedding."""
        return [(e.get("token", ""), e.get("value")) for e in self._card_part("promoted_tokens", model)]

    def describe(self, n_contexts: int = 5) -> str:
        """A few lines for messages: the numbers, then the top contexts on both models."""

        def fmt(v: float | None) -> str:
            return "—" if v is None else f"{v:.4g}"

        lines = [
            f"{self.name}: density base {fmt(self.density_base)} -> finetune {fmt(self.density_finetune)}, "
            f"activation similarity {fmt(self.activation_similarity)}, logit similarity {fmt(self.logit_similarity)}"
        ]
        if self.card is None:
            try:
                self.contexts("base")
            except LookupError as exc:
                lines.append(f"  top contexts: not recorded; {str(exc).split(': ', 1)[-1]}")
            return "\n".join(lines)
        for side in FEATURE_SIDES:
            try:
                entries = self.contexts(side)
            except LookupError as exc:
                lines.append(f"  top contexts on the {side}: not recorded ({str(exc).split(': ', 1)[-1]})")
                continue
            if not entries:
                lines.append(f"  top contexts on the {side}: none (it never fired there)")
                continue
            lines.append(f"  top contexts on the {side}:")
            for e in entries[:n_contexts]:
                lines.append(f"    {fmt(e.get('value')):>8}  {format_snippet(e, max_chars=90)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<FeatureView {self.name} of {self.pair.name!r}>"
