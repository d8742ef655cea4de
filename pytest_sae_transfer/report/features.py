"""Per-feature vectors and streamed histograms, and their one flat key encoding
(used by the ``.features.npz`` sidecar and by the result cache alike)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from .files import atomic_write


def encode_histograms(hists: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{name: {"edges", "counts"}}`` as flat arrays ``hist::<name>::edges`` / ``::counts``."""
    out: dict[str, Any] = {}
    for name, hist in hists.items():
        out[f"hist::{name}::edges"] = hist["edges"]
        out[f"hist::{name}::counts"] = hist["counts"]
    return out


def decode_histograms(arrays: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`encode_histograms`; other keys are ignored. Names may contain "::"."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in arrays.items():
        if key.startswith("hist::"):
            name, part = key[len("hist::"):].rsplit("::", 1)
            out.setdefault(name, {})[part] = value
    return out


def encode_topk(tables: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{model: {"values", "contexts", "positions"}}`` (each model's top-k table, see
    ``metrics.topk.TopKTable.to_arrays``) as flat arrays ``topk::<model>::<part>``."""
    return {f"topk::{model}::{part}": arr for model, parts in tables.items() for part, arr in parts.items()}


def decode_topk(arrays: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`encode_topk`; other keys are ignored. Model names may contain "::"."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in arrays.items():
        if key.startswith("topk::"):
            model, part = key[len("topk::"):].rsplit("::", 1)
            out.setdefault(model, {})[part] = value
    return out


@dataclasses.dataclass
class FeatureArrays:
    """Per-feature vectors and streamed histograms, keyed by finetune name.

    ``vectors[ft][key]`` holds the FEATURE_VECTOR_KEYS arrays (length d_sae) for
    finetune ``ft``; ``histograms`` holds fixed-bin histograms, as
    ``{name: {"edges": array, "counts": array}}`` where ``name`` is
    ``"base/feature_log10_act"`` or ``"<ft>/resid_cosine"`` and the like.
    ``topk`` holds each model's top-k activation table (``"base"`` and each
    finetune's name) as ``{"values", "contexts", "positions"}`` [d_sae, k] arrays.
    Arrays are numpy arrays in memory.
    """

    vectors: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    histograms: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    topk: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """Every array under one flat key (``vec::<ft>::<key>``, ``hist::<name>::<part>``)."""
        import numpy as np

        flat: dict[str, Any] = {}
        for ft, vecs in self.vectors.items():
            for key, arr in vecs.items():
                flat[f"vec::{ft}::{key}"] = np.asarray(arr)
        flat.update({k: np.asarray(v) for k, v in encode_histograms(self.histograms).items()})
        flat.update({k: np.asarray(v) for k, v in encode_topk(self.topk).items()})
        return flat

    @classmethod
    def from_flat(cls, arrays: Mapping[str, Any]) -> FeatureArrays:
        out = cls()
        for flat_key, value in arrays.items():
            if flat_key.startswith("vec::"):
                ft, key = flat_key[len("vec::"):].rsplit("::", 1)
                out.vectors.setdefault(ft, {})[key] = value
        out.histograms = decode_histograms(arrays)
        out.topk = decode_topk(arrays)
        return out

    def _write(self, fh: Any) -> None:
        import numpy as np

        np.savez_compressed(fh, **self.flat())

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write(Path(path), self._write, binary=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureArrays:
        return cls.from_flat(load_arrays(path))


def load_arrays(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every array of an ``.npz`` file, read in full (no pickles)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
