"""The residual stream, base vs finetune: per-token cosine and distance, and both by position."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...report import TransferReport
from .common import (
    FT_COLOR,
    finetune_or_none,
    hist_mean,
    new_figure,
    occupied_xlim,
    paired_value,
    position_line,
    save_png,
    short_name,
    stairs,
    streamed_histogram,
)


def plot_resid_cosine_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Histogram of per-token cos(x_base, x_ft) from the streamed ``<ft>/resid_cosine``."""
    h = streamed_histogram(report, f"{ft}/resid_cosine")
    if h is None:
        return None
    edges, counts = h
    ft_result = finetune_or_none(report, ft)
    mean = paired_value(ft_result, "resid_cosine_mean")
    if mean is None:
        mean = hist_mean(edges, counts)
    fig = new_figure()
    ax = fig.add_subplot()
    stairs(ax, edges, counts, FT_COLOR, f"{int(counts.sum()):,} tokens")
    ax.axvline(mean, color="k", linestyle="--", linewidth=1, label=f"mean {mean:.4f}")
    lo, hi = occupied_xlim(edges, counts)
    ax.set_xlim(lo, max(hi, min(1.0, edges[-1])))
    ax.set_xlabel(r"cosine similarity  $\cos(x^{base}_t,\ x^{ft}_t)$")
    ax.set_ylabel("tokens")
    ax.set_title(
        f"Residual cosine similarity per token at {report.config.get('hook_name', 'the hook')}\n"
        f"{short_name(report.base.model)} vs {short_name(ft)}  (mean {mean:.4f})",
        fontsize=10,
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_resid_euclidean_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Histogram of per-token log10 ‖x_base − x_ft‖₂ from ``<ft>/resid_euclidean_log10``."""
    h = streamed_histogram(report, f"{ft}/resid_euclidean_log10")
    if h is None:
        return None
    edges, counts = h
    ft_result = finetune_or_none(report, ft)
    mean = paired_value(ft_result, "resid_euclidean_mean")
    fig = new_figure()
    ax = fig.add_subplot()
    stairs(ax, edges, counts, FT_COLOR, f"{int(counts.sum()):,} tokens")
    if mean is not None and mean > 0:
        ax.axvline(math.log10(mean), color="k", linestyle="--", linewidth=1, label=f"mean distance {mean:.4g}")
    ax.set_xlim(*occupied_xlim(edges, counts))
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
    mean_txt = f"mean {mean:.4g}" if mean is not None else f"mean log10 {hist_mean(edges, counts):.3g}"
    ax.set_title(
        f"Residual euclidean distance per token at {report.config.get('hook_name', 'the hook')}\n"
        f"{short_name(report.base.model)} vs {short_name(ft)}  ({mean_txt})",
        fontsize=10,
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _plot_by_position(
    report: TransferReport, ft: str, path: str | Path, key: str, mean_key: str, what: str, ylabel: str
) -> Path | None:
    ft_result = finetune_or_none(report, ft)
    vals = position_line(ft_result, key)
    if vals is None:
        return None
    mean = paired_value(ft_result, mean_key)
    pos = np.arange(vals.size)
    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot(pos, vals, color=FT_COLOR, linewidth=1.5, marker="." if vals.size <= 64 else None,
            label=f"{short_name(ft)}: mean over contexts")
    if mean is not None:
        ax.axhline(mean, color="k", linestyle="--", linewidth=1, label=f"overall mean {mean:.4g}")
    n_null = int(np.sum(~np.isfinite(vals)))
    ax.set_xlabel("token position in context")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.5, vals.size - 0.5)
    null_txt = f", {n_null} excluded" if n_null else ""
    ax.set_title(
        f"Residual {what} by token position ({vals.size} positions{null_txt})\n"
        f"{short_name(report.base.model)} vs {short_name(ft)}",
        fontsize=10,
    )
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_resid_cosine_by_position(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Line of the mean cos(x_base, x_ft) at each context position."""
    return _plot_by_position(report, ft, path, "resid_cosine_by_position", "resid_cosine_mean",
                             "cosine similarity", "mean cosine similarity")


def plot_resid_euclidean_by_position(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Line of the mean ‖x_base − x_ft‖₂ at each context position."""
    return _plot_by_position(report, ft, path, "resid_euclidean_by_position", "resid_euclidean_mean",
                             "euclidean distance", r"mean $\|x^{base} - x^{ft}\|_2$")

