"""Human-readable renderings of a :class:`~pytest_sae_transfer.report.TransferReport`.

* :func:`terminal_summary`: aligned plain-text tables for the pytest terminal.
* :func:`markdown_summary`: GitHub-flavoured markdown (for ``$GITHUB_STEP_SUMMARY``).
* :func:`html_page`: one self-contained HTML page, plots embedded as data URIs.
* :func:`write_report_dir`: plots + ``summary.md`` + ``report.html`` into a folder.
* :func:`append_github_step_summary`: append the markdown to ``$GITHUB_STEP_SUMMARY``.

This module is pure text: it imports neither torch nor matplotlib at import time
(:mod:`pytest_sae_transfer.plots` is imported only by :func:`write_report_dir`).
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import os
import textwrap
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .report import (
    MODEL_METRIC_KEYS,
    PAIRED_METRIC_KEYS,
    CheckResult,
    FinetuneResult,
    TransferReport,
    atomic_write,
)

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

#: Per-model metrics the terminal table always shows, in this order.
MAIN_METRICS: tuple[str, ...] = (
    "l0",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_delta",
    "ce_loss_recovered",
    "kl_div_spliced",
    "explained_variance",
    "r2_pooled",
    "dead_fraction",
    "dense_fraction",
    "nonfinite_fraction",
)

#: Paired keys holding per-position lines: drawn as plots, not put in tables.
_LINE_KEYS = ("resid_cosine_by_position", "resid_euclidean_by_position")

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

_ASCII = str.maketrans(
    {
        "✓": "+",
        "✗": "x",
        "—": "-",
        "─": "-",
        "═": "=",
        "Δ": "d",
        "→": "->",
        "…": "...",
        "·": "|",
        "−": "-",
        "∞": "inf",
        "‖": "||",
    }
)


# --------------------------------------------------------------------------- small helpers


def _is_number(v: Any) -> bool:
    """Real numbers, numpy scalars included; bools are not numbers here."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def fmt_num(v: Any, digits: int = 4) -> str:
    """4 significant digits; ints (and integral floats ≥ 1000) with thousands separators; null as "—"."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if _is_number(v):
        if isinstance(v, int) or type(v).__name__.startswith(("int", "uint")):
            return f"{int(v):,}"
        f = float(v)
        if math.isnan(f):
            return "—"
        if math.isinf(f):
            return "∞" if f > 0 else "−∞"
        if f.is_integer() and 1000 <= abs(f) < 1e15:
            return f"{int(f):,}"
        return f"{f:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return _fmt_list(v)
    return str(v)


def _finite(v: Any) -> float | None:
    if not _is_number(v):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _fmt_delta(base: Any, ft: Any, key: str = "") -> str:
    if key == "n_tokens":  # the same tokens feed both models; a difference is not a change
        return ""
    b, f = _finite(base), _finite(ft)
    if b is None or f is None:
        return ""
    return f"{f - b:+.4g}"


def _fmt_ci(ci: Any) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return ""
    return f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]"


def _fmt_list(values: Sequence[Any]) -> str:
    vals = [_finite(v) for v in values]
    good = [(i, v) for i, v in enumerate(vals) if v is not None]
    if not good:
        return f"{len(values)} values, all null"
    i_max, v_max = max(good, key=lambda t: t[1])
    mean = sum(v for _, v in good) / len(good)
    return f"{len(values)} values: mean {fmt_num(mean)}, max {fmt_num(v_max)} (#{i_max})"


def _fmt_paired(key: str, value: Any) -> str:
    if isinstance(value, Mapping):
        vals = list(value.values())
        if vals and all(_is_number(v) or v is None for v in vals):
            keys = list(value.keys())
            good = [(k, _finite(v)) for k, v in zip(keys, vals) if _finite(v) is not None]
            if good:
                k_max, v_max = max(good, key=lambda t: t[1])
                return f"{len(vals)} values: max {fmt_num(v_max)} ({k_max})"
        return f"{len(value)} entries"
    if key == "weight_deviation" and isinstance(value, (list, tuple)):
        return _fmt_list(value).replace("(#", "(block ")
    return fmt_num(value)


def check_symbol(c: CheckResult) -> str:
    """✓ passed, ✗ failed (fail severity), ! failed warning."""
    if c.passed:
        return "✓"
    return "✗" if c.severity == "fail" else "!"


def _check_expr(c: CheckResult) -> str:
    return f"{c.metric} {c.op} {fmt_num(c.bound)}"


def _check_value(c: CheckResult) -> str:
    out = f"value {fmt_num(c.value)}"
    if c.base_value is not None:
        out += f", base {fmt_num(c.base_value)}"
    if c.ci95 is not None:
        out += f", ci95 {_fmt_ci(list(c.ci95))}"
    return out


def _sorted_checks(checks: Iterable[CheckResult]) -> list[CheckResult]:
    """Failures first, then failed warnings, then passes; stable otherwise."""
    rank = {"✗": 0, "!": 1, "✓": 2}
    return sorted(checks, key=lambda c: rank[check_symbol(c)])


def finetune_verdict(ft: FinetuneResult) -> tuple[str, str]:
    """``("FAIL", "3 of 12 checks failed")``, ``("PASS", "all 12 checks passed")``, ``("NO CHECKS", ...)``."""
    checks = list(ft.checks)
    if not checks:
        return "NO CHECKS", "no thresholds were checked"
    n = len(checks)
    fails = sum(1 for c in checks if not c.passed and c.severity == "fail")
    warns = sum(1 for c in checks if not c.passed and c.severity != "fail")
    warn_txt = f", {warns} warning{'s' if warns != 1 else ''}" if warns else ""
    if ft.passed is False:
        return "FAIL", f"{fails} of {n} check{'s' if n != 1 else ''} failed{warn_txt}"
    if warns:
        return "PASS", f"{n - warns} of {n} checks passed{warn_txt}"
    return "PASS", f"all {n} check{'s' if n != 1 else ''} passed"


def _overall(report: TransferReport) -> tuple[str, str]:
    verdicts = [finetune_verdict(ft)[0] for ft in report.finetunes]
    n = len(verdicts)
    n_fail = verdicts.count("FAIL")
    if not n:
        return "NO FINETUNES", "the report holds no finetunes"
    if report.passed is None:
        return "NO CHECKS", f"{n} finetune{'s' if n != 1 else ''} measured, no thresholds checked"
    if n_fail:
        return "FAIL", f"{n_fail} of {n} finetune{'s' if n != 1 else ''} failed"
    return "PASS", f"all {n} finetune{'s' if n != 1 else ''} passed"


def _cfg_get(config: Mapping[str, Any], *keys: str) -> Any:
    """First non-empty value among ``keys``, also looking one level into ``config["sae"]``/``["base"]``."""
    for k in keys:
        v = config.get(k)
        if v not in (None, ""):
            return v
    for nest in ("sae", "run", "base"):
        sub = config.get(nest)
        if isinstance(sub, Mapping):
            for k in keys:
                short = k.split("_", 1)[1] if k.startswith(nest + "_") else k
                for kk in (k, short):
                    v = sub.get(kk)
                    if v not in (None, ""):
                        return v
    return None


def _sae_label(config: Mapping[str, Any]) -> str:
    release = _cfg_get(config, "sae_release", "release")
    sae_id = _cfg_get(config, "sae_id")
    path = _cfg_get(config, "sae_path", "path")
    if release and sae_id:
        return f"{release}/{sae_id}"
    if release or sae_id:
        return str(release or sae_id)
    if path:
        return str(path)
    sae = config.get("sae")
    return str(sae) if isinstance(sae, str) and sae else "SAE"


def report_title(report: TransferReport) -> str:
    """``SAE transfer: <release>/<id> @ <hook> — <base> → <ft1>, <ft2>``."""
    cfg = report.config
    hook = _cfg_get(cfg, "hook_name")
    sae = _sae_label(cfg)
    where = f" @ {hook}" if hook and str(hook) not in sae else ""
    fts = ", ".join(ft.model for ft in report.finetunes) or "(no finetunes)"
    return f"SAE transfer: {sae}{where} — {report.base.model} → {fts}"


def _run_facts(report: TransferReport) -> list[tuple[str, str]]:
    cfg = report.config
    facts: list[tuple[str, str]] = [("base", report.base.model)]
    dataset = _cfg_get(cfg, "dataset", "dataset_path", "dataset_name")
    if dataset:
        facts.append(("dataset", str(dataset)))
    n_tok = report.base.metrics.get("n_tokens", _cfg_get(cfg, "n_tokens"))
    if n_tok is not None:
        facts.append(("tokens", fmt_num(n_tok)))
    ctx = _cfg_get(cfg, "context_size")
    if ctx is not None:
        facts.append(("context", fmt_num(ctx)))
    for key in ("device", "dtype"):
        v = _cfg_get(cfg, key)
        if v:
            facts.append((key, str(v)))
    return facts


def _metric_keys(report: TransferReport, ft: FinetuneResult, full: bool) -> list[str]:
    present = set(report.base.metrics) | set(ft.metrics)
    checked = {c.metric.split(".", 1)[1] for c in ft.checks if c.metric.split(".", 1)[0] in ("base", "finetune")
               and "." in c.metric}
    if full:
        keys = [k for k in MODEL_METRIC_KEYS if k in present]
        keys += sorted(k for k in present if k not in MODEL_METRIC_KEYS)
    else:
        keys = [k for k in MAIN_METRICS if k in present]
        keys += [k for k in MODEL_METRIC_KEYS if k in checked and k in present and k not in keys]
        keys += sorted(k for k in checked if k in present and k not in keys)
    return keys


def _paired_keys(ft: FinetuneResult) -> list[str]:
    keys = [k for k in PAIRED_METRIC_KEYS if k in ft.paired]
    keys += sorted(k for k in ft.paired if k not in PAIRED_METRIC_KEYS)
    return [k for k in keys if k not in _LINE_KEYS]


def _marker(ft: FinetuneResult, metric_names: Sequence[str]) -> str:
    """Worst check symbol among checks on any of ``metric_names`` (``"finetune.l0"``...)."""
    syms = {check_symbol(c) for c in ft.checks if c.metric in metric_names}
    for s in ("✗", "!", "✓"):
        if s in syms:
            return s
    return ""


def _all_notes(report: TransferReport) -> list[str]:
    notes = list(report.base.notes)
    cfg_notes = report.config.get("notes")
    if isinstance(cfg_notes, (list, tuple)):
        notes += [str(n) for n in cfg_notes]
    elif isinstance(cfg_notes, str) and cfg_notes:
        notes.append(cfg_notes)
    seen: set[str] = set()
    return [n for n in notes if not (n in seen or seen.add(n))]


# --------------------------------------------------------------------------- terminal


def _table(rows: Sequence[Sequence[str]], align: str, indent: str = "  ") -> list[str]:
    """Align ``rows`` (first row = header); ``align`` is one of 'l'/'r' per column."""
    n = max(len(r) for r in rows)
    rows = [list(r) + [""] * (n - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    out = []
    for j, r in enumerate(rows):
        cells = [r[i].ljust(widths[i]) if align[i] == "l" else r[i].rjust(widths[i]) for i in range(n)]
        line = indent + "  ".join(cells).rstrip()
        out.append(line)
        if j == 0:
            out.append((indent + "  ".join(("-" if rows[0][i] else " ") * w for i, w in enumerate(widths))).rstrip())
    return out


def _wrap(text: str, width: int, indent: str, subsequent: str) -> list[str]:
    return textwrap.wrap(text, width=max(width, 40), initial_indent=indent, subsequent_indent=subsequent,
                         break_long_words=True, break_on_hyphens=False) or [indent]


def terminal_summary(report: TransferReport, width: int = 100, *, ascii_only: bool = False) -> str:
    """Compact aligned plain-text summary: per finetune, metrics, paired metrics, checks and a verdict.

    ``ascii_only`` replaces ✓/✗/—/→ and friends for terminals that cannot print them.
    """
    width = max(int(width), 40)
    lines: list[str] = []
    title = report_title(report)
    lines += _wrap(title, width, "", "    ")
    lines += _wrap(" · ".join(f"{k}: {v}" for k, v in _run_facts(report)), width, "  ", "  ")
    notes = _all_notes(report)
    if notes:
        lines.append("  notes:")
        for n in notes:
            lines += _wrap(n, width, "    - ", "      ")

    for ft in report.finetunes:
        status, detail = finetune_verdict(ft)
        lines.append("")
        head = f"── {ft.model} "
        lines.append(head + "─" * max(3, width - len(head)))
        rows = [["metric", "base", "finetune", "Δ", "finetune ci95", ""]]
        for key in _metric_keys(report, ft, full=False):
            b, f = report.base.metrics.get(key), ft.metrics.get(key)
            rows.append([key, fmt_num(b), fmt_num(f), _fmt_delta(b, f, key), _fmt_ci(ft.ci95.get(key)),
                         _marker(ft, (f"base.{key}", f"finetune.{key}"))])
        lines += _table(rows, "lrrrll")

        pkeys = _paired_keys(ft)
        scalar_keys = [k for k in pkeys if not isinstance(ft.paired.get(k), (list, tuple, Mapping))]
        if scalar_keys:
            lines.append("")
            prow = [["paired (base vs finetune)", "value", "ci95", ""]]
            for key in scalar_keys:
                prow.append([key, _fmt_paired(key, ft.paired.get(key)), _fmt_ci(ft.paired_ci95.get(key)),
                             _marker(ft, (f"paired.{key}",))])
            lines += _table(prow, "lrll")
        for key in pkeys:
            if key not in scalar_keys:
                mark = _marker(ft, (f"paired.{key}",))
                lines += _wrap(f"{key}: {_fmt_paired(key, ft.paired.get(key))} {mark}".rstrip(), width,
                               "  ", "      ")

        for n in ft.notes:
            lines += _wrap(n, width, "  note: ", "        ")

        if ft.checks:
            lines.append("")
            lines.append("  checks:")
            for c in _sorted_checks(ft.checks):
                sym = check_symbol(c)
                sev = " [warn]" if c.severity != "fail" else ""
                if c.passed:
                    lines += _wrap(f"{sym} {c.id}: {_check_expr(c)} ({_check_value(c)})", width, "    ", "        ")
                else:
                    lines += _wrap(f"{sym} {c.id}{sev}: {_check_expr(c)}, {_check_value(c)}", width,
                                   "    ", "        ")
                    if c.message:
                        lines += _wrap(c.message, width, "        ", "        ")
        lines.append(f"{ft.model}: {status}" + (f" ({detail})" if status != "NO CHECKS" else ""))

    status, detail = _overall(report)
    lines.append("")
    lines.append("═" * min(width, 60))
    lines.append(f"overall: {status} ({detail})")
    text = "\n".join(lines) + "\n"
    if ascii_only:
        text = text.translate(_ASCII).encode("ascii", "replace").decode("ascii")
    return text


# --------------------------------------------------------------------------- markdown

_MD_ICON = {"PASS": "✅", "FAIL": "❌", "NO CHECKS": "⚪", "NO FINETUNES": "⚪"}


def _md(text: Any) -> str:
    """Escape a table cell."""
    s = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return s.replace("<", "&lt;").replace(">", "&gt;")


def _md_code(text: Any) -> str:
    s = str(text).replace("`", "'").replace("|", "\\|").replace("\n", " ")
    return f"`{s}`"


def _md_table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> list[str]:
    sep = ["---:" if a == "r" else ("---" if a == "l" else ":---:") for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _flat_config(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out += _flat_config(v, key + ".")
        else:
            out.append((key, v))
    return out


def _cfg_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        s = ", ".join(fmt_num(x) if _is_number(x) else str(x) for x in v)
        return s if len(s) <= 200 else s[:199] + "…"
    s = fmt_num(v) if not isinstance(v, str) else v
    return s if len(s) <= 200 else s[:199] + "…"


def markdown_summary(report: TransferReport) -> str:
    """GitHub-flavoured markdown: headline verdict, then per finetune metric, paired and check tables."""
    status, detail = _overall(report)
    out: list[str] = [f"## {_MD_ICON.get(status, '')} SAE transfer: {status} — {_md(detail)}".replace("  ", " "), ""]
    cfg = report.config
    hook = _cfg_get(cfg, "hook_name")
    facts = [f"**SAE** {_md_code(_sae_label(cfg))}"]
    if hook:
        facts.append(f"**hook** {_md_code(hook)}")
    facts += [f"**{k}** {_md_code(v)}" for k, v in _run_facts(report)]
    out.append(" · ".join(facts))
    out.append("")
    if report.finetunes:
        out += _md_table(
            ["finetune", "verdict", "checks"],
            "lll",
            [[_md_code(ft.model), f"{_MD_ICON.get(finetune_verdict(ft)[0], '')} {finetune_verdict(ft)[0]}",
              _md(finetune_verdict(ft)[1])] for ft in report.finetunes],
        )
        out.append("")
    notes = _all_notes(report)
    if notes:
        out.append("**Notes**")
        out.append("")
        out += [f"- {_md(n)}" for n in notes]
        out.append("")

    for ft in report.finetunes:
        fstatus, fdetail = finetune_verdict(ft)
        out.append(f"### {_MD_ICON.get(fstatus, '')} {_md(ft.model)}: {fstatus} ({_md(fdetail)})")
        out.append("")
        for n in ft.notes:
            out.append(f"> {_md(n)}")
        if ft.notes:
            out.append("")
        rows = []
        for key in _metric_keys(report, ft, full=True):
            b, f = report.base.metrics.get(key), ft.metrics.get(key)
            mark = _marker(ft, (f"base.{key}", f"finetune.{key}"))
            rows.append([f"{_md_code(key)} {mark}".rstrip(), fmt_num(b), _fmt_ci(report.base.ci95.get(key)),
                         fmt_num(f), _fmt_ci(ft.ci95.get(key)), _fmt_delta(b, f, key)])
        if rows:
            out += _md_table(["metric", "base", "base ci95", "finetune", "finetune ci95", "Δ (ft − base)"],
                             "lrlrlr", rows)
            out.append("")
        pkeys = _paired_keys(ft)
        if pkeys:
            out.append("**Paired metrics (base vs finetune)**")
            out.append("")
            out += _md_table(
                ["metric", "value", "ci95"],
                "lrl",
                [[f"{_md_code(k)} {_marker(ft, (f'paired.{k}',))}".rstrip(), _md(_fmt_paired(k, ft.paired.get(k))),
                  _fmt_ci(ft.paired_ci95.get(k))] for k in pkeys],
            )
            out.append("")
        if ft.checks:
            out.append("**Checks**")
            out.append("")
            out += _md_table(
                ["", "id", "check", "value", "severity", "message"],
                "clllll",
                [[check_symbol(c), _md_code(c.id), _md_code(_check_expr(c)), _md(_check_value(c)),
                  c.severity, _md(c.message)] for c in _sorted_checks(ft.checks)],
            )
            out.append("")

    flat = _flat_config(cfg)
    if flat:
        out.append("<details><summary>Run configuration</summary>")
        out.append("")
        out += _md_table(["key", "value"], "ll", [[_md_code(k), _md(_cfg_value(v))] for k, v in flat])
        out.append("")
        out.append("</details>")
        out.append("")
    return "\n".join(out)


def append_github_step_summary(report: TransferReport, markdown: str | None = None) -> bool:
    """Append the markdown summary to ``$GITHUB_STEP_SUMMARY`` when it is set; never overwrite.

    Returns True when something was appended, False when the variable is unset
    or empty (or the file could not be written, which only warns).
    """
    target = os.environ.get("GITHUB_STEP_SUMMARY", "").strip()
    if not target:
        return False
    text = markdown if markdown is not None else markdown_summary(report)
    try:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(text.rstrip("\n") + "\n\n")
    except OSError as exc:
        warnings.warn(f"pytest-sae-transfer: could not append to GITHUB_STEP_SUMMARY={target!r}: {exc}",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


# --------------------------------------------------------------------------- HTML

_CSS = """
:root { --fail: #c0392b; --pass: #1e8449; --warn: #b9770e; --muted: #666; --line: #ddd; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #fafafa; line-height: 1.4; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 1.2em 2em; }
main { padding: 0 2em 2em; max-width: 1400px; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
h2 { font-size: 1.2em; margin: 1.6em 0 .6em; }
h3 { font-size: 1em; margin: 1.2em 0 .4em; }
.sub { color: var(--muted); margin: .2em 0; }
.badge { display: inline-block; padding: .1em .6em; border-radius: .3em; color: #fff; font-weight: 600;
         font-size: .9em; vertical-align: middle; }
.badge.PASS { background: var(--pass); } .badge.FAIL { background: var(--fail); }
.badge.NO-CHECKS, .badge.NO-FINETUNES { background: #888; }
section.finetune { background: #fff; border: 1px solid var(--line); border-radius: .4em; padding: .4em 1.4em 1.2em;
                   margin-top: 1.5em; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: .9em; }
th, td { border-bottom: 1px solid var(--line); padding: .25em .7em; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, Menlo, Consolas, monospace; }
td.sym { text-align: center; font-weight: 700; }
tr.fail td { background: #fdecea; } tr.warn td { background: #fef5e7; }
.sym-fail { color: var(--fail); } .sym-warn { color: var(--warn); } .sym-pass { color: var(--pass); }
.tables { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: .3em; padding: .5em; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: .85em; color: var(--muted); margin-top: .3em; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .95em; }
ul.notes { background: #fef9e7; border: 1px solid #f7dc6f; border-radius: .3em; padding: .6em 2em; }
nav a { margin-right: 1em; }
footer { color: var(--muted); font-size: .8em; padding: 1em 2em; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: Sequence[str], rows: Sequence[tuple[Sequence[tuple[str, str]], str]]) -> str:
    """``rows`` = [(cells, row_class)], cells = [(html, td_class)]; header cells are escaped here."""
    parts = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for cells, cls in rows:
        parts.append(f'<tr class="{cls}">' if cls else "<tr>")
        parts += [f'<td class="{c}">{h}</td>' if c else f"<td>{h}</td>" for h, c in cells]
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _sym_html(sym: str) -> str:
    cls = {"✗": "sym-fail", "!": "sym-warn", "✓": "sym-pass"}.get(sym, "")
    return f'<span class="{cls}">{_e(sym)}</span>' if sym else ""


def _data_uri(path: str | os.PathLike[str]) -> str | None:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError:
        return None
    suffix = p.suffix.lower()
    mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
            ".gif": "image/gif", ".webp": "image/webp"}.get(suffix, "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure_html(name: str, path: str, caption: str) -> str:
    uri = _data_uri(path)
    anchor = "plot-" + "".join(ch if ch.isalnum() else "-" for ch in name)
    if uri is None:
        return (f'<figure id="{_e(anchor)}" data-plot="{_e(name)}"><figcaption>{_e(caption)} '
                f"(<code>{_e(name)}</code>): image file missing</figcaption></figure>")
    return (f'<figure id="{_e(anchor)}" data-plot="{_e(name)}"><img src="{uri}" alt="{_e(name)}" loading="lazy">'
            f"<figcaption>{_e(caption)} · <code>{_e(name)}</code></figcaption></figure>")


def html_page(report: TransferReport, plot_files: Mapping[str, str | os.PathLike[str]]) -> str:
    """One self-contained HTML page: metric tables, checks and the plots embedded as base64 data URIs.

    ``plot_files`` maps plot names to image paths, as returned by
    :func:`pytest_sae_transfer.plots.make_all_plots` (names ``"<finetune>/<kind>"``
    are shown in that finetune's section, any other name under "Other plots").
    """
    title = report_title(report)
    status, detail = _overall(report)
    cfg = report.config
    body: list[str] = []
    body.append("<header>")
    body.append(f"<h1>{_e(title)}</h1>")
    body.append(f'<p><span class="badge {_e(status.replace(" ", "-"))}">{_e(status)}</span> {_e(detail)}</p>')
    body.append('<p class="sub">' + " · ".join(f"<b>{_e(k)}</b> {_e(v)}" for k, v in _run_facts(report)) + "</p>")
    if len(report.finetunes) > 1:
        body.append("<nav>" + "".join(
            f'<a href="#ft-{i}">{_e(ft.model)}: {_e(finetune_verdict(ft)[0])}</a>'
            for i, ft in enumerate(report.finetunes)) + "</nav>")
    body.append("</header><main>")

    notes = _all_notes(report)
    if notes:
        body.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")

    remaining = {str(k): str(v) for k, v in plot_files.items()}
    for i, ft in enumerate(report.finetunes):
        fstatus, fdetail = finetune_verdict(ft)
        body.append(f'<section class="finetune" id="ft-{i}">')
        body.append(f'<h2><span class="badge {_e(fstatus.replace(" ", "-"))}">{_e(fstatus)}</span> '
                    f"{_e(ft.model)} <small>({_e(fdetail)})</small></h2>")
        if ft.notes:
            body.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in ft.notes) + "</ul>")

        mrows = []
        for key in _metric_keys(report, ft, full=True):
            b, f = report.base.metrics.get(key), ft.metrics.get(key)
            mark = _marker(ft, (f"base.{key}", f"finetune.{key}"))
            cls = {"✗": "fail", "!": "warn"}.get(mark, "")
            mrows.append(([(f"<code>{_e(key)}</code>", ""), (_e(fmt_num(b)), "num"),
                           (_e(_fmt_ci(report.base.ci95.get(key))), "num"), (_e(fmt_num(f)), "num"),
                           (_e(_fmt_ci(ft.ci95.get(key))), "num"), (_e(_fmt_delta(b, f, key)), "num"),
                           (_sym_html(mark), "sym")], cls))
        prows = []
        for key in _paired_keys(ft):
            mark = _marker(ft, (f"paired.{key}",))
            cls = {"✗": "fail", "!": "warn"}.get(mark, "")
            prows.append(([(f"<code>{_e(key)}</code>", ""), (_e(_fmt_paired(key, ft.paired.get(key))), "num"),
                           (_e(_fmt_ci(ft.paired_ci95.get(key))), "num"), (_sym_html(mark), "sym")], cls))
        body.append('<div class="tables">')
        if mrows:
            body.append("<div><h3>Per-model metrics</h3>" + _html_table(
                ["metric", "base", "base ci95", "finetune", "finetune ci95", "Δ (ft − base)", ""], mrows) + "</div>")
        if prows:
            body.append("<div><h3>Paired metrics (base vs finetune)</h3>" + _html_table(
                ["metric", "value", "ci95", ""], prows) + "</div>")
        body.append("</div>")

        if ft.checks:
            crows = []
            for c in _sorted_checks(ft.checks):
                sym = check_symbol(c)
                cls = {"✗": "fail", "!": "warn"}.get(sym, "")
                crows.append(([(_sym_html(sym), "sym"), (f"<code>{_e(c.id)}</code>", ""),
                               (f"<code>{_e(_check_expr(c))}</code>", ""), (_e(_check_value(c)), ""),
                               (_e(c.severity), ""), (_e(c.message), "")], cls))
            body.append("<h3>Checks</h3>" + _html_table(["", "id", "check", "value", "severity", "message"], crows))

        figs = []
        for kind, caption in PLOT_CAPTIONS.items():
            name = f"{ft.model}/{kind}"
            if name in remaining:
                figs.append(_figure_html(name, remaining.pop(name), caption))
        if figs:
            body.append('<h3>Plots</h3><div class="plots">' + "".join(figs) + "</div>")
        body.append("</section>")

    if remaining:
        body.append('<section class="finetune"><h2>Other plots</h2><div class="plots">'
                    + "".join(_figure_html(n, p, n) for n, p in remaining.items()) + "</div></section>")

    flat = _flat_config(cfg)
    if flat:
        body.append("<h2>Run configuration</h2>" + _html_table(
            ["key", "value"], [([(f"<code>{_e(k)}</code>", ""), (_e(_cfg_value(v)), "")], "") for k, v in flat]))
    body.append("</main><footer>Generated by pytest-sae-transfer (report schema_version 1).</footer>")

    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------- report directory


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
        from . import plots as _plots

        plots = _plots.make_all_plots(report, out, strict=strict)
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
