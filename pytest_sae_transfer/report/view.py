"""The per-pair result object that fixtures hand to user tests.

``result.ce_loss_delta`` is the finetune's value, ``result.base.ce_loss_delta``
the base model's, ``result.resid_cosine_mean`` a paired metric, and
``result.activation_similarity`` the per-feature numpy array. Unknown names fail
with the nearest valid ones.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

from ..metrics.keys import FEATURE_VECTOR_KEYS
from .model import TransferReport
from .results import FinetuneResult, ModelResult


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
