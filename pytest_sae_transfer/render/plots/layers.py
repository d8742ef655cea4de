"""The layer profile of a run of several SAEs: for one finetune, the key transfer metrics
against the hook's depth, base and finetune side by side, failing SAEs marked."""

from __future__ import annotations

from pathlib import Path

from ...report import RunReport
from ..family import SAERow, family_rows
from .common import BASE_COLOR, FT_COLOR, new_figure, save_png, short_name

#: (title, y label, base value, finetune value) per panel; None: the panel has no base line.
_PANELS = (
    ("Spliced-in CE penalty", "ce_loss_delta (nats)", lambda r: r.ce_delta_base, lambda r: r.ce_delta_finetune),
    ("Explained variance", "explained_variance", lambda r: r.ev_base, lambda r: r.ev_finetune),
    ("Activation similarity (regular features)", "mean Pearson r", None, lambda r: r.activation_similarity),
    ("Residual cosine, base vs finetune", "mean cosine", None, lambda r: r.resid_cosine),
)


def plot_layer_profile(run: RunReport, ft: str, path: str | Path) -> Path | None:
    """Four panels by hook position; one line per SAE variant (e.g. standard, -topk); a red ring
    marks each SAE that fails the gate on this finetune. None with fewer than two placed SAEs."""
    rows = [r for r in family_rows(run, ft) if r.position is not None]
    if len(rows) < 2:
        return None
    fig = new_figure((11.0, 7.0))
    axes = fig.subplots(2, 2)
    variants = list(dict.fromkeys(r.variant for r in rows))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]  # a variant with one SAE is a lone point: its marker tells it apart
    for ax, (title, ylabel, base_of, ft_of) in zip(axes.flat, _PANELS):
        for vi, name in enumerate(variants):
            group = [r for r in rows if r.variant == name]
            style = (styles[vi % len(styles)], markers[vi % len(markers)])
            suffix = "" if len(variants) == 1 else f" ({name})"
            if base_of is not None:
                _line(ax, group, base_of, BASE_COLOR, style, f"{short_name(run.saes[0].base.model, 24)}{suffix}")
            _line(ax, group, ft_of, FT_COLOR, style, f"{short_name(ft, 24)}{suffix}")
            failing = [(r.position, ft_of(r)) for r in group if r.verdict == "FAIL" and ft_of(r) is not None]
            if failing:
                ax.scatter([p for p, _ in failing], [v for _, v in failing], s=140, facecolors="none",
                           edgecolors="tab:red", linewidths=1.8, zorder=5, label="fails the gate" if vi == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_xlabel("hook position (blocks.L.hook_resid_pre = L, _post = L + 1)", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)  # hook positions are whole layers
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Layer profile: {short_name(run.saes[0].base.model)} → {short_name(ft)}, {len(rows)} SAEs", fontsize=11)
    return save_png(fig, path)


def _line(ax: object, group: list[SAERow], value_of: object, color: str, style: tuple[str, str], label: str) -> None:
    points = [(r.position, value_of(r)) for r in group if value_of(r) is not None]  # type: ignore[operator]
    if not points:
        return
    xs, ys = zip(*points)
    linestyle, marker = style
    ax.plot(xs, ys, linestyle, color=color, marker=marker, markersize=4 if marker == "o" else 6, label=label)  # type: ignore[attr-defined]
