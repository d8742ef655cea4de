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

import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .report import TransferReport, atomic_write

__all__ = [
    "DENSITY_EPS",
    "FINETUNE_PLOTS",
    "make_all_plots",
    "plot_activation_similarity_hist",
    "plot_dead_activation_error_hist",
    "plot_density_hist",
    "plot_density_scatter",
    "plot_feature_activation_hist",
    "plot_logit_similarity_hist",
    "plot_resid_cosine_by_position",
    "plot_resid_cosine_hist",
    "plot_resid_euclidean_by_position",
    "plot_resid_euclidean_hist",
    "plot_weight_deviation",
    "plot_filename",
    "finetune_slugs",
]

#: Epsilon of SPEC.md's log density, log10(density + 1e-10).
DENSITY_EPS = 1e-10
#: Log-density bins: fixed, from -10 (dead) to 0 (fires on every token).
DENSITY_BINS = np.linspace(-10.0, 0.0, 81)
#: The study's "regular" density range, in log10 density.
REGULAR_RANGE = (-5.0, -1.0)

BASE_COLOR = "tab:blue"
FT_COLOR = "tab:orange"
FIGSIZE = (8.0, 4.6)
DPI = 110

# --------------------------------------------------------------------------- helpers


def _figure(figsize: tuple[float, float] = FIGSIZE) -> Any:
    """A pyplot-free figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI), binary=True)
    return path


def _short(name: str, n: int = 40) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1) :]


def _finetune_or_none(report: TransferReport, ft: str) -> Any:
    try:
        return report.finetune(ft)
    except KeyError:
        return None


def _vector(report: TransferReport, ft: str, key: str) -> np.ndarray | None:
    feats = report.features
    if feats is None:
        return None
    vecs = feats.vectors.get(ft)
    if not vecs or key not in vecs or vecs[key] is None:
        return None
    arr = np.asarray(vecs[key], dtype=np.float64).ravel()
    return arr if arr.size else None


def _histogram(report: TransferReport, name: str) -> tuple[np.ndarray, np.ndarray] | None:
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


def _zero_count(report: TransferReport, name: str) -> float | None:
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


def _hist_mean(edges: np.ndarray, counts: np.ndarray) -> float:
    centers = 0.5 * (edges[:-1] + edges[1:])
    return float(np.sum(centers * counts) / np.sum(counts))


def _occupied_xlim(edges: np.ndarray, counts: np.ndarray, pad_frac: float = 0.04) -> tuple[float, float]:
    nz = np.nonzero(counts > 0)[0]
    lo, hi = edges[nz[0]], edges[nz[-1] + 1]
    pad = (hi - lo) * pad_frac or (edges[-1] - edges[0]) * pad_frac
    return max(edges[0], lo - pad), min(edges[-1], hi + pad)


def _stairs(ax: Any, edges: np.ndarray, counts: np.ndarray, color: str, label: str) -> None:
    ax.stairs(counts, edges, fill=True, alpha=0.3, color=color)
    ax.stairs(counts, edges, color=color, linewidth=1.4, label=label)
    # headroom above the tallest bar so the legend does not hide it
    ymax = max(getattr(ax, "_sae_ymax", 0.0), float(np.max(counts)))
    ax._sae_ymax = ymax
    ax.set_ylim(0, ymax * 1.25 if ymax > 0 else 1.0)


def _position_line(ft_result: Any, key: str) -> np.ndarray | None:
    raw = ft_result.paired.get(key) if ft_result is not None else None
    if not isinstance(raw, (list, tuple, np.ndarray)) or len(raw) == 0:
        return None
    vals = np.array([np.nan if v is None else float(v) for v in raw], dtype=np.float64)
    return vals if np.any(np.isfinite(vals)) else None


def _paired_value(ft_result: Any, key: str) -> float | None:
    if ft_result is None:
        return None
    v = ft_result.paired.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _log_density(d: np.ndarray) -> np.ndarray:
    return np.log10(np.clip(d, 0.0, None) + DENSITY_EPS)


# --------------------------------------------------------------------------- residual stream


def plot_resid_cosine_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Histogram of per-token cos(x_base, x_ft) from the streamed ``<ft>/resid_cosine``."""
    h = _histogram(report, f"{ft}/resid_cosine")
    if h is None:
        return None
    edges, counts = h
    ft_result = _finetune_or_none(report, ft)
    mean = _paired_value(ft_result, "resid_cosine_mean")
    if mean is None:
        mean = _hist_mean(edges, counts)
    fig = _figure()
    ax = fig.add_subplot()
    _stairs(ax, edges, counts, FT_COLOR, f"{int(counts.sum()):,} tokens")
    ax.axvline(mean, color="k", linestyle="--", linewidth=1, label=f"mean {mean:.4f}")
    lo, hi = _occupied_xlim(edges, counts)
    ax.set_xlim(lo, max(hi, min(1.0, edges[-1])))
    ax.set_xlabel(r"cosine similarity  $\cos(x^{base}_t,\ x^{ft}_t)$")
    ax.set_ylabel("tokens")
    ax.set_title(
        f"Residual cosine similarity per token at {report.config.get('hook_name', 'the hook')}\n"
        f"{_short(report.base.model)} vs {_short(ft)}  (mean {mean:.4f})",
        fontsize=10,
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_resid_euclidean_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Histogram of per-token log10 ‖x_base − x_ft‖₂ from ``<ft>/resid_euclidean_log10``."""
    h = _histogram(report, f"{ft}/resid_euclidean_log10")
    if h is None:
        return None
    edges, counts = h
    ft_result = _finetune_or_none(report, ft)
    mean = _paired_value(ft_result, "resid_euclidean_mean")
    fig = _figure()
    ax = fig.add_subplot()
    _stairs(ax, edges, counts, FT_COLOR, f"{int(counts.sum()):,} tokens")
    if mean is not None and mean > 0:
        ax.axvline(math.log10(mean), color="k", linestyle="--", linewidth=1, label=f"mean distance {mean:.4g}")
    ax.set_xlim(*_occupied_xlim(edges, counts))
    ax.set_xlabel(r"$\log_{10}\ \|x^{base}_t - x^{ft}_t\|_2$")
    top = ax.secondary_xaxis(
        "top",
        functions=(lambda x: np.power(10.0, x), lambda d: np.log10(np.clip(d, 1e-300, None))),
    )
    from matplotlib.ticker import FuncFormatter, LogLocator

    top.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    top.xaxis.set_minor_locator(LogLocator(base=10.0, subs="auto"))
    top.xaxis.set_major_formatter(FuncFormatter(lambda d, _pos: f"{d:g}"))
    top.set_xlabel(r"distance $\|x^{base}_t - x^{ft}_t\|_2$", fontsize=8)
    top.tick_params(labelsize=8)
    ax.set_ylabel("tokens")
    mean_txt = f"mean {mean:.4g}" if mean is not None else f"mean log10 {_hist_mean(edges, counts):.3g}"
    ax.set_title(
        f"Residual euclidean distance per token at {report.config.get('hook_name', 'the hook')}\n"
        f"{_short(report.base.model)} vs {_short(ft)}  ({mean_txt})",
        fontsize=10,
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_by_position(
    report: TransferReport, ft: str, path: str | Path, key: str, mean_key: str, what: str, ylabel: str
) -> Path | None:
    ft_result = _finetune_or_none(report, ft)
    vals = _position_line(ft_result, key)
    if vals is None:
        return None
    mean = _paired_value(ft_result, mean_key)
    pos = np.arange(vals.size)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(pos, vals, color=FT_COLOR, linewidth=1.5, marker="." if vals.size <= 64 else None,
            label=f"{_short(ft)}: mean over contexts")
    if mean is not None:
        ax.axhline(mean, color="k", linestyle="--", linewidth=1, label=f"overall mean {mean:.4g}")
    n_null = int(np.sum(~np.isfinite(vals)))
    ax.set_xlabel("token position in context")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.5, vals.size - 0.5)
    null_txt = f", {n_null} excluded" if n_null else ""
    ax.set_title(
        f"Residual {what} by token position ({vals.size} positions{null_txt})\n"
        f"{_short(report.base.model)} vs {_short(ft)}",
        fontsize=10,
    )
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_resid_cosine_by_position(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Line of the mean cos(x_base, x_ft) at each context position."""
    return _plot_by_position(report, ft, path, "resid_cosine_by_position", "resid_cosine_mean",
                             "cosine similarity", "mean cosine similarity")


def plot_resid_euclidean_by_position(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Line of the mean ‖x_base − x_ft‖₂ at each context position."""
    return _plot_by_position(report, ft, path, "resid_euclidean_by_position", "resid_euclidean_mean",
                             "euclidean distance", r"mean $\|x^{base} - x^{ft}\|_2$")


# --------------------------------------------------------------------------- feature densities


def plot_density_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """log10(density + 1e-10) histograms, base and finetune overlaid, fixed bins -10..0."""
    db = _vector(report, ft, "density_base")
    df = _vector(report, ft, "density_finetune")
    if db is None and df is None:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    d_sae = 0
    for d, color, who in ((db, BASE_COLOR, report.base.model), (df, FT_COLOR, ft)):
        if d is None:
            continue
        d = d[np.isfinite(d)]
        d_sae = max(d_sae, d.size)
        counts, _ = np.histogram(_log_density(d), bins=DENSITY_BINS)
        n_dead = int(np.sum(d <= 0))
        n_dense = int(np.sum(d > 0.1))
        _stairs(ax, DENSITY_BINS, counts.astype(float), color,
                f"{_short(who, 32)}: {n_dead:,} dead, {n_dense:,} dense")
    ax.axvspan(*REGULAR_RANGE, color="0.5", alpha=0.08, label="regular range [-5, -1]")
    ax.set_xlim(DENSITY_BINS[0] - 0.1, DENSITY_BINS[-1])
    ax.set_xlabel(r"$\log_{10}$(feature density + 1e-10)   (−10 = dead)")
    ax.set_ylabel("features")
    r = _paired_value(_finetune_or_none(report, ft), "density_log10_pearson")
    r_txt = f", Pearson r = {r:.3f}" if r is not None else ""
    ax.set_title(
        f"SAE feature density: {_short(report.base.model)} vs {_short(ft)}\n"
        f"({d_sae:,} features{r_txt})",
        fontsize=10,
    )
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_density_scatter(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Per-feature log10 density, base (x) vs finetune (y), with the y = x line."""
    db = _vector(report, ft, "density_base")
    df = _vector(report, ft, "density_finetune")
    if db is None or df is None or db.size != df.size:
        return None
    ok = np.isfinite(db) & np.isfinite(df)
    if not np.any(ok):
        return None
    db, df = db[ok], df[ok]
    lb, lf = _log_density(db), _log_density(df)
    r = _paired_value(_finetune_or_none(report, ft), "density_log10_pearson")
    if r is None and lb.size > 1 and np.std(lb) > 0 and np.std(lf) > 0:
        r = float(np.corrcoef(lb, lf)[0, 1])
    n_base_only = int(np.sum((db <= 0) & (df > 0)))
    n_ft_only = int(np.sum((db > 0) & (df <= 0)))
    fig = _figure((6.4, 6.0))
    ax = fig.add_subplot()
    ax.add_patch(_regular_box())
    ax.scatter(lb, lf, s=5, alpha=0.3, color="tab:purple", linewidths=0, rasterized=True,
               label=f"{lb.size:,} features")
    ax.plot([-10.5, 0.5], [-10.5, 0.5], color="k", linestyle="--", linewidth=1, label="y = x")
    ax.set_xlim(-10.5, 0.3)
    ax.set_ylim(-10.5, 0.3)
    ax.set_aspect("equal")
    ax.set_xlabel(f"base: $\\log_{{10}}$ density   ({_short(report.base.model, 30)})")
    ax.set_ylabel(f"finetune: $\\log_{{10}}$ density   ({_short(ft, 30)})")
    ax.text(0.02, 0.98, f"turned alive (dead in base only): {n_base_only:,}\n"
                        f"turned dead (dead in finetune only): {n_ft_only:,}",
            transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
    r_txt = f"Pearson r = {r:.3f}" if r is not None else "Pearson r undefined"
    ax.set_title(f"Feature log10 density, base vs finetune\n{lb.size:,} features, {r_txt}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _regular_box() -> Any:
    from matplotlib.patches import Rectangle

    lo, hi = REGULAR_RANGE
    return Rectangle((lo, lo), hi - lo, hi - lo, facecolor="tab:green", alpha=0.08,
                     edgecolor="tab:green", linewidth=0.8, label="regular in both")


# --------------------------------------------------------------------------- feature activations


def plot_feature_activation_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Histogram of log10 f_i(x_t) over nonzero activations, base vs finetune, zeros in the legend."""
    series = []
    for prefix, color, who in (("base", BASE_COLOR, report.base.model), (ft, FT_COLOR, ft)):
        h = _histogram(report, f"{prefix}/feature_log10_act")
        if h is None:
            continue
        zeros = _zero_count(report, f"{prefix}/feature_zero_count")
        series.append((h, zeros, color, who))
    if not series:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    lo, hi = math.inf, -math.inf
    for (edges, counts), zeros, color, who in series:
        nonzero = counts.sum()
        if zeros is not None:
            frac = zeros / (zeros + nonzero) if zeros + nonzero > 0 else float("nan")
            zero_txt = f"{int(zeros):,} zeros ({100 * frac:.2f}%) not shown"
        else:
            zero_txt = "zero count unknown"
        mean = _hist_mean(edges, counts)
        _stairs(ax, edges, counts, color,
                f"{_short(who, 32)}: {int(nonzero):,} nonzero, mean log10 {mean:.3g}; {zero_txt}")
        a, b = _occupied_xlim(edges, counts)
        lo, hi = min(lo, a), max(hi, b)
    ax.set_xlim(lo, hi)
    ax.set_xlabel(r"$\log_{10} f_i(x_t)$  (nonzero feature activations)")
    ax.set_ylabel("(token, feature) pairs")
    ax.set_title(
        f"SAE feature activations: {_short(report.base.model)} vs {_short(ft)}\n"
        "zero activations are left out and counted in the legend",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_similarity(
    report: TransferReport, ft: str, path: str | Path, key: str, what: str
) -> Path | None:
    v = _vector(report, ft, key)
    if v is None:
        return None
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return None
    n_nan = int(v.size - finite.size)
    mean = float(np.mean(finite))
    median = float(np.median(finite))
    frac_hi = float(np.mean(finite > 0.8))
    fig = _figure()
    ax = fig.add_subplot()
    bins = np.linspace(-1.0, 1.0, 81)
    counts, _ = np.histogram(np.clip(finite, -1.0, 1.0), bins=bins)
    _stairs(ax, bins, counts.astype(float), FT_COLOR, f"{finite.size:,} regular features")
    ax.axvline(mean, color="k", linestyle="--", linewidth=1, label=f"mean {mean:.4f}")
    ax.axvline(median, color="k", linestyle=":", linewidth=1, label=f"median {median:.4f}")
    ax.axvline(0.8, color="tab:green", linestyle="-", linewidth=0.8, alpha=0.7,
               label=f"0.8 ({100 * frac_hi:.1f}% above)")
    lo, hi = _occupied_xlim(bins, counts.astype(float))
    ax.set_xlim(min(lo, 0.75), 1.0)
    ax.set_xlabel(f"{what} (Pearson correlation, base vs finetune)")
    ax.set_ylabel("features")
    ax.set_title(
        f"Feature {what}: {_short(report.base.model)} vs {_short(ft)}\n"
        f"{finite.size:,} regular features, mean {mean:.4f}; "
        f"{n_nan:,} NaN dropped (not regular or undefined)",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_activation_similarity_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Histogram of per-feature activation similarity (regular features; NaNs dropped and counted)."""
    return _plot_similarity(report, ft, path, "activation_similarity", "activation similarity")


def plot_logit_similarity_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Histogram of per-feature logit similarity (regular features; NaNs dropped and counted)."""
    return _plot_similarity(report, ft, path, "logit_similarity", "logit similarity")


def plot_dead_activation_error_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Activation error of features dead in exactly one model, split by which model they are dead in."""
    err = _vector(report, ft, "dead_activation_error")
    if err is None:
        return None
    ok = np.isfinite(err)
    if not np.any(ok):
        return None
    db = _vector(report, ft, "density_base")
    df = _vector(report, ft, "density_finetune")
    groups: list[tuple[np.ndarray, str, str]] = []
    if db is not None and df is not None and db.size == err.size == df.size:
        base_only = ok & (db <= 0) & (df > 0)
        ft_only = ok & (db > 0) & (df <= 0)
        other = ok & ~base_only & ~ft_only
        groups = [(err[base_only], BASE_COLOR, "dead in base only (turned alive)"),
                  (err[ft_only], FT_COLOR, "dead in finetune only (turned dead)")]
        if np.any(other):
            groups.append((err[other], "0.5", "other"))
    else:
        groups = [(err[ok], "tab:red", "dead in exactly one model")]
    finite = err[ok]
    hi = float(np.max(finite))
    bins = np.linspace(0.0, hi * 1.05 if hi > 0 else 1.0, 51)
    fig = _figure()
    ax = fig.add_subplot()
    for vals, color, label in groups:
        if vals.size == 0:
            continue
        counts, _ = np.histogram(vals, bins=bins)
        _stairs(ax, bins, counts.astype(float), color, f"{label}: {vals.size:,}, mean {np.mean(vals):.4g}")
    ax.set_xlabel(r"activation error: mean$_t$ $|\log_{10}(f^{base}+10^{-10}) - \log_{10}(f^{ft}+10^{-10})|$")
    ax.set_ylabel("features")
    ax.set_title(
        f"Activation error of features dead in one model: {_short(report.base.model)} vs {_short(ft)}\n"
        f"{finite.size:,} features, mean {np.mean(finite):.4g}",
        fontsize=10,
    )
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_weight_deviation(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Bar chart of ‖θ_ft − θ_base‖_F / ‖θ_base‖_F per transformer block."""
    ft_result = _finetune_or_none(report, ft)
    raw = ft_result.paired.get("weight_deviation") if ft_result is not None else None
    if isinstance(raw, Mapping):
        labels = [str(k) for k in raw]
        values = list(raw.values())
    elif isinstance(raw, (list, tuple, np.ndarray)):
        labels = [str(i) for i in range(len(raw))]
        values = list(raw)
    else:
        return None
    vals = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    if vals.size == 0 or not np.any(np.isfinite(vals)):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    x = np.arange(vals.size)
    colors = [FT_COLOR] * vals.size
    hook = report.config.get("hook_name")
    m = re.match(r"blocks\.(\d+)\.", str(hook or ""))
    hook_block = int(m.group(1)) if m else None
    if hook_block is not None and str(hook_block) in labels:
        colors[labels.index(str(hook_block))] = "tab:red"
    else:
        hook_block = None
    ax.bar(x, np.nan_to_num(vals, nan=0.0), color=colors, edgecolor="k", linewidth=0.4)
    step = max(1, vals.size // 24)
    ax.set_xticks(x[::step], labels[::step], rotation=0 if vals.size <= 24 else 45, fontsize=8)
    ax.set_ylim(0, float(np.nanmax(vals)) * 1.2 if np.nanmax(vals) > 0 else 1.0)
    if hook_block is not None:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:red", label=f"block of the SAE hook ({hook})")],
                  loc="upper left", fontsize=8)
    ax.set_xlabel("transformer block")
    ax.set_ylabel(r"$\|\theta^{ft} - \theta^{base}\|_F\ /\ \|\theta^{base}\|_F$")
    i_max = int(np.nanargmax(vals))
    ax.set_title(
        f"Relative weight change per block: {_short(report.base.model)} → {_short(ft)}\n"
        f"{vals.size} blocks, mean {np.nanmean(vals):.4g}, max {vals[i_max]:.4g} (block {labels[i_max]})",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


# --------------------------------------------------------------------------- all of them

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


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return s[:80] or "finetune"


def plot_filename(ft_slug: str, kind: str) -> str:
    return f"{ft_slug}__{kind}.png"


def finetune_slugs(report: TransferReport) -> dict[str, str]:
    """A unique, filesystem-safe slug per finetune name (``a/b`` -> ``a_b``, collisions get ``-2``...)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for ft in report.finetunes:
        base = _slug(ft.model)
        slug, i = base, 2
        while slug.lower() in used:
            slug, i = f"{base}-{i}", i + 1
        used.add(slug.lower())
        out[ft.model] = slug
    return out


def make_all_plots(report: TransferReport, out_dir: str | Path, *, strict: bool = True) -> dict[str, Path]:
    """Draw every plot the report has data for into ``out_dir``.

    Returns ``{"<finetune>/<kind>": path}`` in display order (finetunes in report
    order, kinds in :data:`FINETUNE_PLOTS` order); skipped plots are absent.
    With ``strict=False`` a plot that raises is skipped with a ``RuntimeWarning``
    instead of aborting the others (what the pytest plugin wants at session end).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slugs = finetune_slugs(report)
    made: dict[str, Path] = {}
    for ft in report.finetunes:
        for kind, fn in FINETUNE_PLOTS.items():
            try:
                path = fn(report, ft.model, out_dir / plot_filename(slugs[ft.model], kind))
            except Exception as exc:
                if strict:
                    raise
                warnings.warn(f"pytest-sae-transfer: plot {ft.model}/{kind} failed: {exc!r}",
                              RuntimeWarning, stacklevel=2)
                continue
            if path is not None:
                made[f"{ft.model}/{kind}"] = path
    return made
