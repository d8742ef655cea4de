"""The SAE's features, base vs finetune: densities, activations, activation and logit
similarity, and the activation error of features dead in one model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ...report import TransferReport
from .common import (
    BASE_COLOR,
    DENSITY_BINS,
    FT_COLOR,
    REGULAR_RANGE,
    feature_vector,
    finetune_or_none,
    hist_mean,
    log_density,
    new_figure,
    occupied_xlim,
    paired_value,
    save_png,
    short_name,
    stairs,
    streamed_histogram,
    zero_count,
)


def plot_density_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """log10(density + 1e-10) histograms, base and finetune overlaid, fixed bins -10..0."""
    db = feature_vector(report, ft, "density_base")
    df = feature_vector(report, ft, "density_finetune")
    if db is None and df is None:
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    d_sae = 0
    for d, color, who in ((db, BASE_COLOR, report.base.model), (df, FT_COLOR, ft)):
        if d is None:
            continue
        d = d[np.isfinite(d)]
        d_sae = max(d_sae, d.size)
        counts, _ = np.histogram(log_density(d), bins=DENSITY_BINS)
        n_dead = int(np.sum(d <= 0))
        n_dense = int(np.sum(d > 0.1))
        stairs(ax, DENSITY_BINS, counts.astype(float), color,
                f"{short_name(who, 32)}: {n_dead:,} dead, {n_dense:,} dense")
    ax.axvspan(*REGULAR_RANGE, color="0.5", alpha=0.08, label="regular range [-5, -1]")
    ax.set_xlim(DENSITY_BINS[0] - 0.1, DENSITY_BINS[-1])
    ax.set_xlabel(r"$\log_{10}$(feature density + 1e-10)   (−10 = dead)")
    ax.set_ylabel("features")
    r = paired_value(finetune_or_none(report, ft), "density_log10_pearson")
    r_txt = f", Pearson r = {r:.3f}" if r is not None else ""
    ax.set_title(
        f"SAE feature density: {short_name(report.base.model)} vs {short_name(ft)}\n"
        f"({d_sae:,} features{r_txt})",
        fontsize=10,
    )
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_density_scatter(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Per-feature log10 density, base (x) vs finetune (y), with the y = x line."""
    db = feature_vector(report, ft, "density_base")
    df = feature_vector(report, ft, "density_finetune")
    if db is None or df is None or db.size != df.size:
        return None
    ok = np.isfinite(db) & np.isfinite(df)
    if not np.any(ok):
        return None
    db, df = db[ok], df[ok]
    lb, lf = log_density(db), log_density(df)
    r = paired_value(finetune_or_none(report, ft), "density_log10_pearson")
    if r is None and lb.size > 1 and np.std(lb) > 0 and np.std(lf) > 0:
        r = float(np.corrcoef(lb, lf)[0, 1])
    n_base_only = int(np.sum((db <= 0) & (df > 0)))
    n_ft_only = int(np.sum((db > 0) & (df <= 0)))
    fig = new_figure((6.4, 6.0))
    ax = fig.add_subplot()
    ax.add_patch(_regular_box())
    ax.scatter(lb, lf, s=5, alpha=0.3, color="tab:purple", linewidths=0, rasterized=True,
               label=f"{lb.size:,} features")
    ax.plot([-10.5, 0.5], [-10.5, 0.5], color="k", linestyle="--", linewidth=1, label="y = x")
    ax.set_xlim(-10.5, 0.3)
    ax.set_ylim(-10.5, 0.3)
    ax.set_aspect("equal")
    ax.set_xlabel(f"base: $\\log_{{10}}$ density   ({short_name(report.base.model, 30)})")
    ax.set_ylabel(f"finetune: $\\log_{{10}}$ density   ({short_name(ft, 30)})")
    ax.text(0.02, 0.98, f"turned alive (dead in base only): {n_base_only:,}\n"
                        f"turned dead (dead in finetune only): {n_ft_only:,}",
            transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
    r_txt = f"Pearson r = {r:.3f}" if r is not None else "Pearson r undefined"
    ax.set_title(f"Feature log10 density, base vs finetune\n{lb.size:,} features, {r_txt}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _regular_box() -> Any:
    from matplotlib.patches import Rectangle

    lo, hi = REGULAR_RANGE
    return Rectangle((lo, lo), hi - lo, hi - lo, facecolor="tab:green", alpha=0.08,
                     edgecolor="tab:green", linewidth=0.8, label="regular in both")


def plot_feature_activation_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Histogram of log10 f_i(x_t) over nonzero activations, base vs finetune, zeros in the legend."""
    series = []
    for prefix, color, who in (("base", BASE_COLOR, report.base.model), (ft, FT_COLOR, ft)):
        h = streamed_histogram(report, f"{prefix}/feature_log10_act")
        if h is None:
            continue
        zeros = zero_count(report, f"{prefix}/feature_zero_count")
        series.append((h, zeros, color, who))
    if not series:
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    lo, hi = math.inf, -math.inf
    for (edges, counts), zeros, color, who in series:
        nonzero = counts.sum()
        if zeros is not None:
            frac = zeros / (zeros + nonzero) if zeros + nonzero > 0 else float("nan")
            zero_txt = f"{int(zeros):,} zeros ({100 * frac:.2f}%) not shown"
        else:
            zero_txt = "zero count unknown"
        mean = hist_mean(edges, counts)
        stairs(ax, edges, counts, color,
                f"{short_name(who, 32)}: {int(nonzero):,} nonzero, mean log10 {mean:.3g}; {zero_txt}")
        a, b = occupied_xlim(edges, counts)
        lo, hi = min(lo, a), max(hi, b)
    ax.set_xlim(lo, hi)
    ax.set_xlabel(r"$\log_{10} f_i(x_t)$  (nonzero feature activations)")
    ax.set_ylabel("(token, feature) pairs")
    ax.set_title(
        f"SAE feature activations: {short_name(report.base.model)} vs {short_name(ft)}\n"
        "zero activations are left out and counted in the legend",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _plot_similarity(
    report: TransferReport, ft: str, path: str | Path, key: str, what: str
) -> Path | None:
    v = feature_vector(report, ft, key)
    if v is None:
        return None
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return None
    n_nan = int(v.size - finite.size)
    mean = float(np.mean(finite))
    median = float(np.median(finite))
    frac_hi = float(np.mean(finite > 0.8))
    fig = new_figure()
    ax = fig.add_subplot()
    bins = np.linspace(-1.0, 1.0, 81)
    counts, _ = np.histogram(np.clip(finite, -1.0, 1.0), bins=bins)
    stairs(ax, bins, counts.astype(float), FT_COLOR, f"{finite.size:,} regular features")
    ax.axvline(mean, color="k", linestyle="--", linewidth=1, label=f"mean {mean:.4f}")
    ax.axvline(median, color="k", linestyle=":", linewidth=1, label=f"median {median:.4f}")
    ax.axvline(0.8, color="tab:green", linestyle="-", linewidth=0.8, alpha=0.7,
               label=f"0.8 ({100 * frac_hi:.1f}% above)")
    lo, hi = occupied_xlim(bins, counts.astype(float))
    ax.set_xlim(min(lo, 0.75), 1.0)
    ax.set_xlabel(f"{what} (Pearson correlation, base vs finetune)")
    ax.set_ylabel("features")
    ax.set_title(
        f"Feature {what}: {short_name(report.base.model)} vs {short_name(ft)}\n"
        f"{finite.size:,} regular features, mean {mean:.4f}; "
        f"{n_nan:,} NaN dropped (not regular or undefined)",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_activation_similarity_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Histogram of per-feature activation similarity (regular features; NaNs dropped and counted)."""
    return _plot_similarity(report, ft, path, "activation_similarity", "activation similarity")


def plot_logit_similarity_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Histogram of per-feature logit similarity (regular features; NaNs dropped and counted)."""
    return _plot_similarity(report, ft, path, "logit_similarity", "logit similarity")


def plot_dead_activation_error_hist(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Activation error of features dead in exactly one model, split by which model they are dead in."""
    err = feature_vector(report, ft, "dead_activation_error")
    if err is None:
        return None
    ok = np.isfinite(err)
    if not np.any(ok):
        return None
    db = feature_vector(report, ft, "density_base")
    df = feature_vector(report, ft, "density_finetune")
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
    fig = new_figure()
    ax = fig.add_subplot()
    for vals, color, label in groups:
        if vals.size == 0:
            continue
        counts, _ = np.histogram(vals, bins=bins)
        stairs(ax, bins, counts.astype(float), color, f"{label}: {vals.size:,}, mean {np.mean(vals):.4g}")
    ax.set_xlabel(r"activation error: mean$_t$ $|\log_{10}(f^{base}+10^{-10}) - \log_{10}(f^{ft}+10^{-10})|$")
    ax.set_ylabel("features")
    ax.set_title(
        f"Activation error of features dead in one model: {short_name(report.base.model)} vs {short_name(ft)}\n"
        f"{finite.size:,} features, mean {np.mean(finite):.4g}",
        fontsize=10,
    )
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, path)

