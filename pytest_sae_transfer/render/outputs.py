"""The report directory: plots, ``summary.md`` and ``report.html``, each written atomically."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..report import TransferReport, atomic_write
from .html import html_page
from .markdown import markdown_summary


def write_report_dir(report: TransferReport, out_dir: str | os.PathLike[str], *, strict: bool = False
                     ) -> dict[str, Path]:
    """Draw the plots and write ``summary.md`` and ``report.html`` into ``out_dir``, all atomically.

    Returns ``{"summary.md": path, "report.html": path, "<finetune>/<kind>": png_path, ...}``.
    A plot that fails to draw is skipped with a warning unless ``strict`` is true.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    try:
        from .plots import make_all_plots  # matplotlib only when plots are drawn

        plots = make_all_plots(report, out, strict=strict)
    except Exception as exc:  # matplotlib missing or broken: still write the text reports
        if strict:
            raise
        warnings.warn(f"pytest-sae-transfer: plots skipped: {exc!r}", RuntimeWarning, stacklevel=2)

    md = markdown_summary(report)
    page = html_page(report, {k: str(v) for k, v in plots.items()})
    md_path, html_path = out / "summary.md", out / "report.html"
    atomic_write(md_path, lambda fh: fh.write(md))
    atomic_write(html_path, lambda fh: fh.write(page))
    return {"summary.md": md_path, "report.html": html_path, **plots}

