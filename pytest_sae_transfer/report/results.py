"""One model's and one finetune's results with one SAE, and the result of one check."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


def clean_number(value: Any) -> Any:
    """JSON has no NaN or Inf: write them as null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean_number(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_number(v) for v in value]
    return value



@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One threshold check evaluated against one finetune."""

    id: str
    metric: str  # "<scope>.<key>", e.g. "finetune.ce_loss_delta"
    op: str  # "<=", ">=", "increase<=", "ratio<=", "ci_low>=", "ci_high<=", ...
    bound: float
    value: float | None
    passed: bool
    severity: str = "fail"
    base_value: float | None = None
    ci95: tuple[float, float] | None = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ci95"] = list(self.ci95) if self.ci95 is not None else None
        return clean_number(out)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckResult:
        kw = dict(data)
        if kw.get("ci95") is not None:
            kw["ci95"] = tuple(kw["ci95"])
        return cls(**kw)



@dataclasses.dataclass
class ModelResult:
    """Per-model metrics of one model with the SAE."""

    model: str
    metrics: dict[str, Any]
    ci95: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return clean_number(
            {"model": self.model, "metrics": self.metrics, "ci95": self.ci95, "notes": self.notes}
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelResult:
        return cls(
            model=data["model"],
            metrics=dict(data["metrics"]),
            ci95={k: list(v) for k, v in data.get("ci95", {}).items()},
            notes=list(data.get("notes", [])),
        )



@dataclasses.dataclass
class FinetuneResult(ModelResult):
    """A finetune's own metrics, its paired metrics against the base, and its checks."""

    paired: dict[str, Any] = dataclasses.field(default_factory=dict)
    paired_ci95: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    checks: list[CheckResult] = dataclasses.field(default_factory=list)
    #: Paired bootstrap intervals of finetune − base and finetune / base, per metric key.
    delta_ci95: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    ratio_ci95: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    #: Feature-level answers (see ``report.feature_section``): the worst features with their text.
    features: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Ids of the profile's checks that this run did not select (-k, -m, --deselect): in
    #: neither ``checks`` nor the verdict.
    deselected: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool | None:
        """False if any fail-severity check failed; None when no check ran."""
        if not self.checks:
            return None
        return all(c.passed for c in self.checks if c.severity == "fail")

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update(
            clean_number(
                {
                    "paired": self.paired,
                    "paired_ci95": self.paired_ci95,
                    "delta_ci95": self.delta_ci95,
                    "ratio_ci95": self.ratio_ci95,
                    "features": self.features,
                    "checks": [c.to_json() for c in self.checks],
                    "deselected": list(self.deselected),
                    "passed": self.passed,
                }
            )
        )
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FinetuneResult:
        return cls(
            model=data["model"],
            metrics=dict(data["metrics"]),
            ci95={k: list(v) for k, v in data.get("ci95", {}).items()},
            notes=list(data.get("notes", [])),
            paired=dict(data.get("paired", {})),
            paired_ci95={k: list(v) for k, v in data.get("paired_ci95", {}).items()},
            checks=[CheckResult.from_json(c) for c in data.get("checks", [])],
            delta_ci95={k: list(v) for k, v in (data.get("delta_ci95") or {}).items()},
            ratio_ci95={k: list(v) for k, v in (data.get("ratio_ci95") or {}).items()},
            features=dict(data.get("features") or {}),
            deselected=list(data.get("deselected") or []),
        )

