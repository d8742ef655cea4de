"""The result of one transfer evaluation, and its JSON form (SPEC.md, schema_version 1).

A :class:`TransferReport` holds plain Python numbers and lists, so it round-trips
through JSON exactly. Per-feature vectors and streamed histograms live in a
:class:`FeatureArrays` object that is written to an ``.npz`` sidecar next to the
report; the report names that file under ``"features_file"``.

Confidence intervals sit beside the metrics they belong to: ``"ci95"`` for the
entry's ``metrics`` and ``"paired_ci95"`` for its ``paired`` block, each a map
from metric key to ``[lo, hi]``. Metric values themselves stay plain numbers.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

SCHEMA_VERSION = 1

#: Per-model metric keys, in the order SPEC.md lists them.
MODEL_METRIC_KEYS: tuple[str, ...] = (
    "n_tokens",
    "l0",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_delta",
    "ce_loss_zero_ablation",
    "ce_loss_recovered",
    "kl_div_spliced",
    "explained_variance",
    "r2_pooled",
    "mse",
    "cossim",
    "dead_fraction",
    "dense_fraction",
    "outlier_fraction",
    "nonfinite_fraction",
    # Beyond SPEC (extra keys are allowed): included tokens whose activation was finite
    # but whose CE or KL was NaN/Inf (overflow after the hook), as a fraction.
    "nonfinite_loss_fraction",
)

#: Paired (base vs finetune) metric keys, in SPEC.md order.
PAIRED_METRIC_KEYS: tuple[str, ...] = (
    "resid_cosine_mean",
    "resid_cosine_by_position",
    "resid_euclidean_mean",
    "resid_euclidean_by_position",
    "density_log10_pearson",
    "n_dead_base_only",
    "n_dead_finetune_only",
    "dead_shift_fraction",
    "n_regular_features",
    "activation_similarity_mean",
    "activation_similarity_median",
    "activation_similarity_frac_above_0_8",
    "n_activation_similarity_undefined",
    "logit_similarity_mean",
    "logit_similarity_median",
    "dead_activation_error_base_only_mean",
    "dead_activation_error_finetune_only_mean",
    "unembed_frobenius_ratio",
    "weight_deviation",
)

#: Names of the per-feature vectors that go to the sidecar.
FEATURE_VECTOR_KEYS: tuple[str, ...] = (
    "density_base",
    "density_finetune",
    "activation_similarity",
    "logit_similarity",
    "dead_activation_error",
)


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
        )


@dataclasses.dataclass
class FeatureArrays:
    """Per-feature vectors and streamed histograms, keyed by finetune name.

    ``vectors[ft][key]`` holds the FEATURE_VECTOR_KEYS arrays (length d_sae) for
    finetune ``ft``; ``histograms`` holds fixed-bin histograms, as
    ``{name: {"edges": array, "counts": array}}`` where ``name`` is
    ``"base/feature_log10_act"`` or ``"<ft>/resid_cosine"`` and the like.
    Arrays are numpy arrays in memory.
    """

    vectors: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    histograms: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def _write(self, fh: Any) -> None:
        import numpy as np

        flat: dict[str, Any] = {}
        for ft, vecs in self.vectors.items():
            for key, arr in vecs.items():
                flat[f"vec::{ft}::{key}"] = np.asarray(arr)
        for name, hist in self.histograms.items():
            flat[f"hist::{name}::edges"] = np.asarray(hist["edges"])
            flat[f"hist::{name}::counts"] = np.asarray(hist["counts"])
        np.savez_compressed(fh, **flat)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write(Path(path), self._write, binary=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureArrays:
        import numpy as np

        out = cls()
        with np.load(path, allow_pickle=False) as data:
            for flat_key in data.files:
                kind, rest = flat_key.split("::", 1)
                if kind == "vec":
                    ft, key = rest.rsplit("::", 1)
                    out.vectors.setdefault(ft, {})[key] = data[flat_key]
                elif kind == "hist":
                    name, part = rest.rsplit("::", 1)
                    out.histograms.setdefault(name, {})[part] = data[flat_key]
        return out


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
                staged.append((_stage(sidecar, self.features._write, binary=True), sidecar))
                self.features_file = sidecar.name
            text = json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
            staged.append((_stage(path, lambda fh: fh.write(text)), path))
            for tmp, final in staged:
                os.replace(tmp, final)
        except BaseException:
            self.features_file = previous_features_file
            for tmp, _ in staged:
                _unlink_quietly(tmp)
            raise
        return path

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> TransferReport:
        path = Path(path)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return cls.from_json(data, base_dir=path.parent)


def atomic_write(path: Path, write: Any, binary: bool = False) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``.

    ``os.replace`` is atomic on POSIX and Windows, so readers see the old file or
    the new one, never a partial one. The temporary file is removed on failure.
    """
    path = Path(path)
    tmp = _stage(path, write, binary)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _stage(path: Path, write: Any, binary: bool = False) -> Path:
    """Write a whole, fsynced temporary file beside ``path``; removed again if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _unlink_quietly(Path(tmp))
        raise
    return Path(tmp)


#: A temporary file this old beside a report was left by a killed writer (a live
#: writer finishes within seconds), so the next write of that report removes it.
STALE_TEMP_AGE_S = 3600.0


def _sweep_stale_temps(path: Path, older_than: float = STALE_TEMP_AGE_S) -> int:
    """Remove ``.{name}.*.tmp`` files beside ``path`` left by a writer that was killed."""
    removed = 0
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
