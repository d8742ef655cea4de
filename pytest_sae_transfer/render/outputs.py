"""The report directory: plots, ``summary.md`` and ``report.html``, each written atomically."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..report import RunReport, TransferReport, atomic_write
from .family import as_run
from .html import html_page
from .markdown import markdown_summary


def write_report_dir(report: RunReport | TransferReport, out_dir: str | os.PathLike[str], *, strict: bool = False
                     ) -> dict[str, Path]:
    """Draw the plots and write ``summary.md`` and ``report.html`` into ``out_dir``, all atomically.

    Returns ``{"summary.md": path, "report.html": path, "<finetune>/<kind>": png_path, ...}``;
    in a run of several SAEs each SAE's plots go to a subfolder (named ``"<sae>/<finetune>/<kind>"``)
    and each finetune gets a layer profile (``"<finetune>/layer_profile"``).
    A plot that fails to draw is skipped with a warning unless ``strict`` is true.
    """
    run = as_run(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    try:
        plots = _draw(run, out, strict)
    except Exception as exc:  # matplotlib missing or broken: still write the text reports
        if strict:
            raise
        warnings.warn(f"pytest-sae-transfer: plots skipped: {exc!r}", RuntimeWarning, stacklevel=2)

    md = markdown_summary(run, plots)
    page = html_page(run, {k: str(v) for k, v in plots.items()})
    md_path, html_path = out / "summary.md", out / "report.html"
    atomic_write(md_path, lambda fh: fh.write(md))
    atomic_write(html_path, lambda fh: fh.write(page))
    return {"summary.md": md_path, "report.html": html_path, **plots}


def _draw(run: RunReport, out: Path, strict: bool) -> dict[str, Path]:
    from .plots import make_all_plots, safe_slug  # matplotlib only when plots are drawn
    from .plots.layers import plot_layer_profile

    if len(run.saes) == 1:
        return make_all_plots(run.saes[0], out, strict=strict)
    plots: dict[str, Path] = {}
    for report in run.saes:
        made = make_all_plots(report, out / safe_slug(report.sae_key), strict=strict)
        plots.update({f"{report.sae_key}/{name}": path for name, path in made.items()})
    for ft in run.finetune_names:
        try:
            path = plot_layer_profile(run, ft, out / f"{safe_slug(ft)}__layer_profile.png")
        except Exception as exc:
            if strict:
                raise
            warnings.warn(f"pytest-sae-transfer: layer profile of {ft} failed: {exc!r}", RuntimeWarning, stacklevel=2)
            continue
        if path is not None:
            plots[f"{ft}/layer_profile"] = path
    return plots
