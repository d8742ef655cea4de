"""Which features transfer worst: four ranked lists from the per-feature vectors.

Why: the paired block gates means over all regular features, which says *that*
an SAE broke, not *which* features broke. These lists pick the features a reader
should look at first. Each list is a total order (ties by the lower feature id),
so the same vectors always give the same lists, and each says how many features
qualified, so a cut at ``n`` never hides how many were left out.

The lists (``RANKINGS``):

* ``lowest_activation_similarity``: regular features (−5 ≤ log10 density ≤ −1 on
  both models) by activation similarity, lowest first. Regular features whose
  similarity is undefined (NaN) cannot be ranked; they are counted as
  ``n_undefined``.
* ``turned_dead``: alive on the base, dead on the finetune, most used on the base
  first: the features that were doing most work and stopped.
* ``turned_alive``: dead on the base, alive on the finetune, most used on the
  finetune first.
* ``largest_density_change``: alive on both models, by |log10 density change|,
  largest first. Features dead in one model have their own lists above (their
  change is the distance to log10(1e-10) and would crowd out everything else).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .stats import LOG_EPS

#: The ranked lists, in the order reports show them.
RANKINGS: tuple[str, ...] = (
    "lowest_activation_similarity",
    "turned_dead",
    "turned_alive",
    "largest_density_change",
)

#: Default number of features kept per list.
DEFAULT_TOP_N = 20

#: The "regular" band of log10 density (docs/metrics.md), inclusive, on both models.
REGULAR_LOG10_RANGE = (-5.0, -1.0)


def log10_density(density: np.ndarray) -> np.ndarray:
    """The log density, log10(density + 1e-10); NaN stays NaN."""
    with np.errstate(invalid="ignore"):
        return np.log10(np.asarray(density, dtype=np.float64) + LOG_EPS)


def regular_mask(density_base: np.ndarray, density_finetune: np.ndarray) -> np.ndarray:
    """Features whose log10 density lies in the regular band on both models."""
    lo, hi = REGULAR_LOG10_RANGE
    lb, lf = log10_density(density_base), log10_density(density_finetune)
    with np.errstate(invalid="ignore"):
        return (lb >= lo) & (lb <= hi) & (lf >= lo) & (lf <= hi)


def _ordered(ids: np.ndarray, key: np.ndarray, descending: bool) -> np.ndarray:
    """``ids`` by ``key`` (ascending or descending), equal keys by ascending id."""
    primary = -key if descending else key
    return ids[np.lexsort((ids, primary))]


def rank_features(vectors: Mapping[str, Any], n: int = DEFAULT_TOP_N) -> dict[str, dict[str, Any]]:
    """The four ranked lists from one finetune's per-feature vectors.

    ``vectors`` holds numpy-like arrays of length d_sae: ``density_base``,
    ``density_finetune`` and ``activation_similarity`` (NaN where undefined).
    Returns ``{list name: {"ids": [...], "n_candidates": int}}`` with at most ``n``
    ids per list (plain ints, JSON-ready); the similarity list also has
    ``n_undefined``, and every list counts features whose inputs were NaN in
    ``n_unknown`` (a density that could not be measured: no included tokens).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    dens_b = np.asarray(vectors["density_base"], dtype=np.float64)
    dens_f = np.asarray(vectors["density_finetune"], dtype=np.float64)
    act = np.asarray(vectors["activation_similarity"], dtype=np.float64)
    if not (dens_b.ndim == 1 and dens_b.shape == dens_f.shape == act.shape):
        raise ValueError(
            f"per-feature vectors must share one length; got {dens_b.shape}, {dens_f.shape}, {act.shape}"
        )
    ids = np.arange(dens_b.size, dtype=np.int64)
    known = np.isfinite(dens_b) & np.isfinite(dens_f)
    n_unknown = int((~known).sum())

    def entry(selected: np.ndarray, key: np.ndarray, descending: bool, **extra: int) -> dict[str, Any]:
        order = _ordered(ids[selected], key[selected], descending)
        return {"ids": [int(i) for i in order[:n]], "n_candidates": int(selected.sum()), "n_unknown": n_unknown, **extra}

    regular = regular_mask(dens_b, dens_f)
    defined = regular & np.isfinite(act)
    alive_b, alive_f = known & (dens_b > 0), known & (dens_f > 0)
    with np.errstate(invalid="ignore"):
        change = np.abs(log10_density(dens_f) - log10_density(dens_b))
    return {
        "lowest_activation_similarity": entry(
            defined, act, descending=False, n_undefined=int((regular & ~np.isfinite(act)).sum())
        ),
        "turned_dead": entry(alive_b & known & (dens_f == 0), dens_b, descending=True),
        "turned_alive": entry(known & (dens_b == 0) & alive_f, dens_f, descending=True),
        "largest_density_change": entry(alive_b & alive_f, change, descending=True),
    }

