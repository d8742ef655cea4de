"""The result of one transfer evaluation and its JSON form (schema_version 1).

A :class:`TransferReport` holds plain Python numbers and lists, so it round-trips
through JSON exactly. Per-feature vectors and streamed histograms live in a
:class:`~pytest_sae_transfer.report.features.FeatureArrays` object that is written
to an ``.npz`` sidecar next to the report; the report names that file under
``"features_file"``.

Confidence intervals sit beside the metrics they belong to: ``"ci95"`` for the
entry's ``metrics`` and ``"paired_ci95"`` for its ``paired`` block, each a map
from metric key to ``[lo, hi]``. A finetune also carries ``"delta_ci95"`` and
``"ratio_ci95"``: paired intervals of its metric minus, and divided by, the base's
(both resampled on the same contexts). Metric values themselves stay plain numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from .features import FeatureArrays
from .files import stage_file, unlink_quietly

SCHEMA_VERSION = 1


def _clean_number(value: Any) -> Any:
    """JSON has no NaN or Inf: write them as null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean_number(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_number(v) for v in value]
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
        return _clean_number(out)

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
        return _clean_number(
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

    @property
    def passed(self) -> bool | None:
        """False if any fail-severity check failed; None when no check ran."""
        if not self.checks:
            return None
        return all(c.passed for c in self.checks if c.severity == "fail")

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update(
            _clean_number(
                {
                    "paired": self.paired,
                    "paired_ci95": self.paired_ci95,
                    "delta_ci95": self.delta_ci95,
                    "ratio_ci95": self.ratio_ci95,
                    "checks": [c.to_json() for c in self.checks],
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
        )


@dataclasses.dataclass
class TransferReport:
    """Everything one run measured: the base model, each finetune, and the run's config."""

    config: dict[str, Any]
    base: ModelResult
    finetunes: list[FinetuneResult]
    features: FeatureArrays | None = None
    features_file: str | None = None

    @property
    def passed(self) -> bool | None:
        verdicts = [ft.passed for ft in self.finetunes if ft.passed is not None]
        return all(verdicts) if verdicts else None

    def finetune(self, name: str) -> FinetuneResult:
        for ft in self.finetunes:
            if ft.model == name:
                return ft
        raise KeyError(f"no finetune {name!r} in report; have {[f.model for f in self.finetunes]}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "config": _clean_number(self.config),
            "base": self.base.to_json(),
            "finetunes": [ft.to_json() for ft in self.finetunes],
            "passed": self.passed,
        }
        if self.features_file is not None:
            out["features_file"] = self.features_file
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> TransferReport:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported report schema_version {version!r}; expected {SCHEMA_VERSION}")
        features = None
        features_file = data.get("features_file")
        if features_file and base_dir is not None and (base_dir / features_file).is_file():
            features = FeatureArrays.load(base_dir / features_file)
        return cls(
            config=dict(data["config"]),
            base=ModelResult.from_json(data["base"]),
            finetunes=[FinetuneResult.from_json(f) for f in data["finetunes"]],
            features=features,
            features_file=features_file,
        )

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the report and, when features are present, its ``.features.npz`` sidecar.

        Both files are written atomically: an interrupted run leaves the previous
        report (if any) intact, never a truncated one.
        """
        path = Path(path)
        previous_features_file = self.features_file
        staged: list[tuple[Path, Path]] = []  # (written temporary file, final path)
        try:
            # Both files are written in full (and fsynced) before either replaces its old
            # version: a failed write (full disk, ...) leaves the previous report *and* the
            # sidecar it names untouched, never a new sidecar beside an old report.
            if self.features is not None:
                sidecar = path.with_name(path.stem + ".features.npz")
                staged.append((stage_file(sidecar, self.features._write, binary=True), sidecar))
                self.features_file = sidecar.name
            text = json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
            staged.append((stage_file(path, lambda fh: fh.write(text)), path))
            for tmp, final in staged:
                os.replace(tmp, final)
        except BaseException:
            self.features_file = previous_features_file
            for tmp, _ in staged:
                unlink_quietly(tmp)
            raise
        return path

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> TransferReport:
        path = Path(path)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return cls.from_json(data, base_dir=path.parent)

