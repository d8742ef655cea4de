"""Human-readable renderings of a :class:`~pytest_sae_transfer.report.TransferReport`.

* :func:`terminal_summary`: aligned plain-text tables for the pytest terminal.
* :func:`markdown_summary`: GitHub-flavoured markdown (for ``$GITHUB_STEP_SUMMARY``).
* :func:`html_page`: one self-contained HTML page, plots embedded as data URIs.
* :func:`write_report_dir`: plots + ``summary.md`` + ``report.html`` into a folder.
* :func:`append_github_step_summary`: append the markdown to ``$GITHUB_STEP_SUMMARY``.

Modules: ``text`` (formats and verdict words shared by all) · ``terminal`` ·
``markdown`` · ``html`` · ``outputs`` (the report directory) · ``plots/``
(matplotlib, imported only when plots are drawn).
May import: ``errors``, ``metrics.keys``, ``report``, ``thresholds``.
"""

from .html import html_page
from .markdown import append_github_step_summary, markdown_summary
from .outputs import write_report_dir
from .terminal import terminal_summary
from .text import MAIN_METRICS, check_symbol, finetune_verdict, fmt_num, report_title

__all__ = [
    "MAIN_METRICS",
    "append_github_step_summary",
    "check_symbol",
    "fmt_num",
    "finetune_verdict",
    "html_page",
    "markdown_summary",
    "report_title",
    "terminal_summary",
    "write_report_dir",
]
