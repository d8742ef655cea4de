"""The study's plots, drawn from a :class:`~pytest_sae_transfer.report.TransferReport`.

Every plot function takes the report, a finetune name (``FinetuneResult.model``)
and an output path, writes one PNG atomically and returns its path, or returns
``None`` when the report lacks the data for that picture (no features sidecar,
an empty histogram, a finetune without a per-position line...). Nothing here
raises for missing data.

Figures are plain :class:`matplotlib.figure.Figure` objects on a
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg` canvas: no pyplot, no
global figure registry, no backend switch, so nothing leaks between tests and a
headless CI machine needs no display. matplotlib is imported lazily, inside the
functions, so importing this module is cheap.

The pictures (after Kutsyk, Mencattini, Florea 2025):

===============================  ==============================================
kind                             what it shows
===============================  ==============================================
``resid_cosine_hist``            per-token cos(x_base, x_ft) histogram (streamed)
``resid_euclidean_hist``         per-token log10 ‖x_base − x_ft‖₂ histogram
``resid_cosine_by_position``     mean cosine at each context position
``resid_euclidean_by_position``  mean euclidean distance at each position
``density_hist``                 log10 feature density, base vs finetune
``density_scatter``              log10 density, base (x) vs finetune (y), y = x
``feature_activation_hist``      log10 of nonzero feature activations, base vs ft
``activation_similarity_hist``   activation similarity of regular features
``logit_similarity_hist``        logit similarity of regular features
``dead_activation_error_hist``   activation error of features dead in one model
``weight_deviation``             relative weight change per transformer block
===============================  ==============================================
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Callable

from ...report import TransferReport
from .common import DRAWN_FROM, drawn_from
from .features import (
    plot_activation_similarity_hist,
    plot_dead_activation_error_hist,
    plot_density_hist,
    plot_density_scatter,
    plot_feature_activation_hist,
    plot_logit_similarity_hist,
)
from .residual import (
    plot_resid_cosine_by_position,
    plot_resid_cosine_hist,
    plot_resid_euclidean_by_position,
    plot_resid_euclidean_hist,
)
from .weights import plot_weight_deviation

PlotFn = Callable[[TransferReport, str, "str | Path"], "Path | None"]


#: Per-finetune plots in display order: kind -> function.
FINETUNE_PLOTS: dict[str, PlotFn] = {
    "resid_cosine_hist": plot_resid_cosine_hist,
    "resid_euclidean_hist": plot_resid_euclidean_hist,
    "resid_cosine_by_position": plot_resid_cosine_by_position,
    "resid_euclidean_by_position": plot_resid_euclidean_by_position,
    "density_hist": plot_density_hist,
    "density_scatter": plot_density_scatter,
    "feature_activation_hist": plot_feature_activation_hist,
    "activation_similarity_hist": plot_activation_similarity_hist,
    "logit_similarity_hist": plot_logit_similarity_hist,
    "dead_activation_error_hist": plot_dead_activation_error_hist,
    "weight_deviation": plot_weight_deviation,
}


#: Human captions for the plot kinds of :data:`pytest_sae_transfer.plots.FINETUNE_PLOTS`.
PLOT_CAPTIONS: dict[str, str] = {
    "resid_cosine_hist": "Residual cosine similarity per token (histogram)",
    "resid_euclidean_hist": "Residual euclidean distance per token (log10 histogram)",
    "resid_cosine_by_position": "Residual cosine similarity by token position",
    "resid_euclidean_by_position": "Residual euclidean distance by token position",
    "density_hist": "Feature log10 density, base vs finetune",
    "density_scatter": "Feature log10 density scatter, base vs finetune",
    "feature_activation_hist": "log10 feature activations, base vs finetune",
    "activation_similarity_hist": "Activation similarity of regular features",
    "logit_similarity_hist": "Logit similarity of regular features",
    "dead_activation_error_hist": "Activation error of features dead in one model",
    "weight_deviation": "Relative weight change per transformer block",
}


def safe_slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return s[:80] or "finetune"


def plot_filename(ft_slug: str, kind: str) -> str:
    return f"{ft_slug}__{kind}.png"


def finetune_slugs(report: TransferReport) -> dict[str, str]:
    """A unique, filesystem-safe slug per finetune name (``a/b`` -> ``a_b``, collisions get ``-2``...)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for ft in report.finetunes:
        base = safe_slug(ft.model)
        slug, i = base, 2
        while slug.lower() in used:
            slug, i = f"{base}-{i}", i + 1
        used.add(slug.lower())
        out[ft.model] = slug
    return out


#: Bump when a plot's drawing changes, so that pictures kept from an earlier run are redrawn.
PLOTS_VERSION = "1"


def make_all_plots(report: TransferReport, out_dir: str | Path, *, strict: bool = True) -> dict[str, Path]:
    """Draw every plot the report has data for into ``out_dir``.

    Returns ``{"<finetune>/<kind>": path}`` in display order (finetunes in report
    order, kinds in :data:`FINETUNE_PLOTS` order); skipped plots are absent.
    With ``strict=False`` a plot that raises is skipped with a ``RuntimeWarning``
    instead of aborting the others (what the pytest plugin wants at session end).

    A finetune's pictures depend on its numbers only, not on the checks. Each PNG records
    a digest of the numbers it was drawn from; when ``out_dir`` already holds one drawn
    from the same numbers it is kept, so a re-run after a threshold edit redraws nothing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slugs = finetune_slugs(report)
    made: dict[str, Path] = {}
    for ft in report.finetunes:
        digest = _plot_digest(report, ft.model)
        token = DRAWN_FROM.set(digest)
        try:
            for kind, fn in FINETUNE_PLOTS.items():
                target = out_dir / plot_filename(slugs[ft.model], kind)
                try:
                    path = target if drawn_from(target) == digest else fn(report, ft.model, target)
                except Exception as exc:
                    if strict:
                        raise
                    warnings.warn(f"pytest-sae-transfer: plot {ft.model}/{kind} failed: {exc!r}",
                                  RuntimeWarning, stacklevel=2)
                    continue
                if path is not None:
                    made[f"{ft.model}/{kind}"] = path
        finally:
            DRAWN_FROM.reset(token)
    return made


def _plot_digest(report: TransferReport, ft: str) -> str:
    """A digest of everything a finetune's plots are drawn from (numbers, names, the hook)."""
    import numpy as np

    h = hashlib.sha256(PLOTS_VERSION.encode())
    entry = report.finetune(ft)
    for part in (report.base.model, ft, str(report.config.get("hook_name")), entry.paired, entry.metrics, report.base.metrics):
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    features = report.features
    if features is not None:
        for key, arr in sorted((features.vectors.get(ft) or {}).items()):
            h.update(key.encode())
            h.update(np.ascontiguousarray(np.asarray(arr, dtype=np.float64)).tobytes())
        for name in sorted(n for n in features.histograms if n.startswith((f"{ft}/", "base/"))):
            for part in ("edges", "counts"):
                h.update(np.ascontiguousarray(np.asarray(features.histograms[name][part], dtype=np.float64)).tobytes())
    return h.hexdigest()
