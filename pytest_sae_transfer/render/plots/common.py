"""What every plot shares: pyplot-free figures saved atomically, and safe reads of the
report's vectors, histograms and per-position lines (None when absent or malformed)."""

from __future__ import annotations

import contextvars

import math
from pathlib import Path
from typing import Any

import numpy as np

from ...report import TransferReport, atomic_write

#: Epsilon of the log density, log10(density + 1e-10).
DENSITY_EPS = 1e-10

#: Log-density bins: fixed, from -10 (dead) to 0 (fires on every token).
DENSITY_BINS = np.linspace(-10.0, 0.0, 81)

#: The study's "regular" density range, in log10 density.
REGULAR_RANGE = (-5.0, -1.0)

BASE_COLOR = "tab:blue"

FT_COLOR = "tab:orange"

FIGSIZE = (8.0, 4.6)

DPI = 110


def new_figure(figsize: tuple[float, float] = FIGSIZE) -> Any:
    """A pyplot-free figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


#: The digest of the numbers the plots being drawn come from (set by ``make_all_plots``):
#: written into each PNG, so that a later run drawing from the same numbers can keep it.
DRAWN_FROM: contextvars.ContextVar[str | None] = contextvars.ContextVar("sae_transfer_drawn_from", default=None)
DIGEST_KEY = "pytest-sae-transfer:drawn-from"


def save_png(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    digest = DRAWN_FROM.get()
    metadata = {DIGEST_KEY: digest} if digest else None
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI, metadata=metadata), binary=True)
    return path


def drawn_from(path: Path) -> str | None:
    """The digest a PNG written by :func:`save_png` records, or None (no file, no digest, unreadable)."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.text.get(DIGEST_KEY)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - anything unreadable is simply redrawn
        return None


def short_name(name: str, n: int = 40) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1) :]


def finetune_or_none(report: TransferReport, ft: str) -> Any:
    try:
        return report.finetune(ft)
    except KeyError:
        return None


def feature_vector(report: TransferReport, ft: str, key: str) -> np.ndarray | None:
    feats = report.features
    if feats is None:
        return None
    vecs = feats.vectors.get(ft)
    if not vecs or key not in vecs or vecs[key] is None:
        return None
    arr = np.asarray(vecs[key], dtype=np.float64).ravel()
    return arr if arr.size else None


def streamed_histogram(report: TransferReport, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(edges, counts)`` of a streamed histogram, or None if absent, malformed or empty."""
    feats = report.features
    if feats is None:
        return None
    hist = feats.histograms.get(name)
    if not hist or "edges" not in hist or "counts" not in hist:
        return None
    edges = np.asarray(hist["edges"], dtype=np.float64).ravel()
    counts = np.asarray(hist["counts"], dtype=np.float64).ravel()
    if counts.size == 0 or edges.size != counts.size + 1:
        return None
    if not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
        return None
    counts = np.where(np.isfinite(counts), counts, 0.0)
    if counts.sum() <= 0:
        return None
    return edges, counts


def zero_count(report: TransferReport, name: str) -> float | None:
    feats = report.features
    if feats is None:
        return None
    hist = feats.histograms.get(name)
    if not hist or "counts" not in hist:
        return None
    counts = np.asarray(hist["counts"], dtype=np.float64).ravel()
    if counts.size == 0 or not np.isfinite(counts[0]):
        return None
    return float(counts[0])


def hist_mean(edges: np.ndarray, counts: np.ndarray) -> float:
    centers = 0.5 * (edges[:-1] + edges[1:])
    return float(np.sum(centers * counts) / np.sum(counts))


def occupied_xlim(edges: np.ndarray, counts: np.ndarray, pad_frac: float = 0.04) -> tuple[float, float]:
    nz = np.nonzero(counts > 0)[0]
    lo, hi = edges[nz[0]], edges[nz[-1] + 1]
    pad = (hi - lo) * pad_frac or (edges[-1] - edges[0]) * pad_frac
    return max(edges[0], lo - pad), min(edges[-1], hi + pad)


def stairs(ax: Any, edges: np.ndarray, counts: np.ndarray, color: str, label: str) -> None:
    ax.stairs(counts, edges, fill=True, alpha=0.3, color=color)
    ax.stairs(counts, edges, color=color, linewidth=1.4, label=label)
    # headroom above the tallest bar so the legend does not hide it
    ymax = max(getattr(ax, "_sae_ymax", 0.0), float(np.max(counts)))
    ax._sae_ymax = ymax
    ax.set_ylim(0, ymax * 1.25 if ymax > 0 else 1.0)


def position_line(ft_result: Any, key: str) -> np.ndarray | None:
    raw = ft_result.paired.get(key) if ft_result is not None else None
    if not isinstance(raw, (list, tuple, np.ndarray)) or len(raw) == 0:
        return None
    vals = np.array([np.nan if v is None else float(v) for v in raw], dtype=np.float64)
    return vals if np.any(np.isfinite(vals)) else None


def paired_value(ft_result: Any, key: str) -> float | None:
    if ft_result is None:
        return None
    v = ft_result.paired.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def log_density(d: np.ndarray) -> np.ndarray:
    return np.log10(np.clip(d, 0.0, None) + DENSITY_EPS)

