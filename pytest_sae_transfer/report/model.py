"""What one run measured, and its JSON form (``schema_version`` 2; version 1 is still read).

A :class:`TransferReport` is one SAE's results: the base model and every finetune with
that SAE, and the full configuration they were measured with. A :class:`RunReport`
holds one TransferReport per SAE of the run. Everything is plain Python numbers and
lists, so it round-trips through JSON exactly. Per-feature vectors and streamed
histograms live in :class:`~pytest_sae_transfer.report.features.FeatureArrays`, written
to one ``.npz`` sidecar next to the report (``"features_file"``).

The JSON layout (version 2)::

    {"schema_version": 2,
     "config": {...what every SAE shares: models, tokens, device, versions...},
     "saes": [{"sae": "<key>", "config": {...this SAE: release, id, hook, width, τ, provenance...},
               "base": {...}, "finetunes": [{...one finetune with this SAE, its checks...}],
               "passed": true}],
     "passed": false,
     "features_file": "report.features.npz"}

A finetune entry's ``"checks"`` are the checks this run judged, and its ``"passed"`` (and
with it the SAE's and the run's) is the verdict on those checks alone. Checks of the
profile that the run did not select (pytest's ``-k``, ``-m`` or ``--deselect`` on the gate
items) are not evaluated into the verdict: their ids are listed in the entry's
``"deselected"`` (``[]`` when every check ran), so that e.g. ``-k nonfinite`` gives
``"passed": true`` exactly when the non-finite checks pass, as pytest's exit code says.

Version 1 (one SAE, everything at the top level) is read as a run of one SAE.
Confidence intervals sit beside the metrics they belong to: ``"ci95"`` for an entry's
``metrics`` and ``"paired_ci95"`` for its ``paired`` block, each a map from metric key
to ``[lo, hi]``. A finetune also carries ``"delta_ci95"`` and ``"ratio_ci95"``: paired
intervals of its metric minus, and divided by, the base's (both resampled on the same
contexts).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from .features import FeatureArrays, load_arrays
from .files import stage_file, unlink_quietly
from .results import CheckResult, FinetuneResult, ModelResult, clean_number

SCHEMA_VERSION = 2

#: Config keys that belong to one SAE rather than to the run.
SAE_CONFIG_KEYS: tuple[str, ...] = (
    "sae_key", "sae_release", "sae_id", "sae_path", "sae_kind", "sae_architecture", "d_in", "d_sae",
    "hook_name", "outlier_norm", "provenance", "provenance_by_worker",
)

__all__ = ["SCHEMA_VERSION", "CheckResult", "FinetuneResult", "ModelResult", "RunReport", "TransferReport"]


@dataclasses.dataclass
class TransferReport:
    """One SAE's results: the base model, each finetune, and the configuration."""

    config: dict[str, Any]
    base: ModelResult
    finetunes: list[FinetuneResult]
    features: FeatureArrays | None = None
    features_file: str | None = None

    @property
    def passed(self) -> bool | None:
        verdicts = [ft.passed for ft in self.finetunes if ft.passed is not None]
        return all(verdicts) if verdicts else None

    @property
    def sae_key(self) -> str:
        return str(self.config.get("sae_key") or self.config.get("sae_id") or self.config.get("sae_path") or "sae")

    def finetune(self, name: str) -> FinetuneResult:
        for ft in self.finetunes:
            if ft.model == name:
                return ft
        raise KeyError(f"no finetune {name!r} in report; have {[f.model for f in self.finetunes]}")

    def to_json(self) -> dict[str, Any]:
        return RunReport([self]).to_json()

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> TransferReport:
        return RunReport.from_json(data, base_dir).single()

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the report (as a run of one SAE) and its sidecar; see :meth:`RunReport.write_json`."""
        run = RunReport([self])
        out = run.write_json(path)
        self.features_file = run.features_file
        return out

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> TransferReport:
        return RunReport.read_json(path).single()


@dataclasses.dataclass
class RunReport:
    """Every SAE's :class:`TransferReport` of one run, in the run's order."""

    saes: list[TransferReport]
    features_file: str | None = None

    @property
    def config(self) -> dict[str, Any]:
        """What the SAEs share (the first SAE's configuration without its SAE-only keys)."""
        if not self.saes:
            return {}
        return {k: v for k, v in self.saes[0].config.items() if k not in SAE_CONFIG_KEYS}

    @property
    def passed(self) -> bool | None:
        verdicts = [r.passed for r in self.saes if r.passed is not None]
        return all(verdicts) if verdicts else None

    @property
    def finetune_names(self) -> list[str]:
        return list(dict.fromkeys(ft.model for r in self.saes for ft in r.finetunes))

    def sae(self, key: str) -> TransferReport:
        for report in self.saes:
            if report.sae_key == key:
                return report
        raise KeyError(f"no SAE {key!r} in report; have {[r.sae_key for r in self.saes]}")

    def single(self) -> TransferReport:
        if len(self.saes) != 1:
            raise ValueError(f"the report holds {len(self.saes)} SAEs; read it with RunReport.read_json")
        return self.saes[0]

    # -- JSON -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "config": clean_number(self.config), "saes": []}
        for report in self.saes:
            out["saes"].append({
                "sae": report.sae_key,
                "config": clean_number({k: v for k, v in report.config.items() if k in SAE_CONFIG_KEYS}),
                "base": report.base.to_json(),
                "finetunes": [ft.to_json() for ft in report.finetunes],
                "passed": report.passed,
            })
        out["passed"] = self.passed
        if self.features_file is not None:
            out["features_file"] = self.features_file
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> RunReport:
        version = data.get("schema_version")
        if version == 1:
            entries = [{"config": data["config"], "base": data["base"], "finetunes": data["finetunes"]}]
            run_config: Mapping[str, Any] = {}
        elif version == SCHEMA_VERSION:
            entries, run_config = list(data["saes"]), data["config"]
        else:
            raise ValueError(f"unsupported report schema_version {version!r}; this version reads 1 and {SCHEMA_VERSION}")
        features_file = data.get("features_file")
        sidecar = _read_sidecar(base_dir / features_file, version, len(entries)) if features_file and base_dir else None
        saes = [
            TransferReport(
                config={**entry["config"], **run_config},
                base=ModelResult.from_json(entry["base"]),
                finetunes=[FinetuneResult.from_json(f) for f in entry["finetunes"]],
                features=sidecar[i] if sidecar is not None else None,
                features_file=features_file,
            )
            for i, entry in enumerate(entries)
        ]
        return cls(saes, features_file=features_file)

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the report and, when features are present, its ``.features.npz`` sidecar.

        Both files are written in full (and fsynced) before either replaces its old
        version: a failed write (full disk, ...) leaves the previous report *and* the
        sidecar it names untouched, never a new sidecar beside an old report.
        """
        path = Path(path)
        previous = self.features_file
        staged: list[tuple[Path, Path]] = []  # (written temporary file, final path)
        try:
            if any(r.features is not None for r in self.saes):
                sidecar = path.with_name(path.stem + ".features.npz")
                staged.append((stage_file(sidecar, self._write_sidecar, binary=True), sidecar))
                self.features_file = sidecar.name
            text = json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
            staged.append((stage_file(path, lambda fh: fh.write(text)), path))
            for tmp, final in staged:
                os.replace(tmp, final)
        except BaseException:
            self.features_file = previous
            for tmp, _ in staged:
                unlink_quietly(tmp)
            raise
        for report in self.saes:
            report.features_file = self.features_file
        return path

    def _write_sidecar(self, fh: Any) -> None:
        import numpy as np

        flat: dict[str, Any] = {}
        for i, report in enumerate(self.saes):
            if report.features is not None:
                flat.update({f"s{i}::{k}": v for k, v in report.features.flat().items()})
        np.savez_compressed(fh, **flat)

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> RunReport:
        path = Path(path)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return cls.from_json(data, base_dir=path.parent)


def _read_sidecar(path: Path, version: int, n_saes: int) -> list[FeatureArrays] | None:
    """Each SAE's features from a sidecar (version 1: one SAE, keys unprefixed)."""
    if not path.is_file():
        return None
    arrays = load_arrays(path)
    if version == 1:
        return [FeatureArrays.from_flat(arrays)]
    parts: list[dict[str, Any]] = [{} for _ in range(n_saes)]
    for key, value in arrays.items():
        prefix, rest = key.split("::", 1)
        index = int(prefix[1:])
        if 0 <= index < n_saes:
            parts[index][rest] = value
    return [FeatureArrays.from_flat(p) for p in parts]
