"""The finetune's weights against the base's, block by block."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np

from ...report import TransferReport
from .common import FT_COLOR, finetune_or_none, new_figure, save_png, short_name


def plot_weight_deviation(report: TransferReport, ft: str, path: str | Path) -> Path | None:
    """Bar chart of ‖θ_ft − θ_base‖_F / ‖θ_base‖_F per transformer block."""
    ft_result = finetune_or_none(report, ft)
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
    fig = new_figure()
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
        f"Relative weight change per block: {short_name(report.base.model)} → {short_name(ft)}\n"
        f"{vals.size} blocks, mean {np.nanmean(vals):.4g}, max {vals[i_max]:.4g} (block {labels[i_max]})",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    return save_png(fig, path)

