"""The plain-text summary printed at the end of a pytest run."""

from __future__ import annotations

import textwrap
from typing import Any, Mapping, Sequence

from ..report import FinetuneResult, RunReport, TransferReport
from ..thresholds.explain import explain_finetune
from .family import as_run, family_rows
from .text import (
    all_notes,
    check_expr,
    check_marker,
    check_symbol,
    check_value,
    finetune_verdict,
    fmt_ci,
    fmt_delta,
    fmt_num,
    fmt_paired,
    metric_keys,
    overall_verdict,
    paired_keys,
    report_title,
    run_facts,
    sorted_checks,
)

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


def terminal_summary(report: RunReport | TransferReport, width: int = 100, *, ascii_only: bool = False,
                     verbose: bool = False) -> str:
    """The run's summary for the terminal, to fit on a screen: per finetune the verdict with its
    reason, the failing checks one line each, a count of the passing ones and where the results
    came from; with several SAEs, a table per finetune with a row per SAE. ``verbose`` (pytest
    ``-v``) shows every metric and check of every SAE.

    ``ascii_only`` replaces ✓/✗/—/→ and friends for terminals that cannot print them.
    """
    run = as_run(report)
    width = max(int(width), 40)
    if verbose:
        lines = [line for r in run.saes for line in _sae_summary(r, width) + [""]]
    elif len(run.saes) == 1:
        lines = _sae_compact(run.saes[0], width)
    else:
        lines = _family_summary(run, width)
    text = "\n".join(lines) + "\n"
    if ascii_only:
        text = text.translate(_ASCII).encode("ascii", "replace").decode("ascii")
    return text


def _sae_compact(report: TransferReport, width: int) -> list[str]:
    """One SAE: the run's facts, then per finetune its verdict, reason, failures and warnings."""
    lines = _wrap(report_title(report), width, "", "    ")
    lines += _wrap(" · ".join(f"{k}: {v}" for k, v in run_facts(report)), width, "  ", "  ")
    for note in all_notes(report):
        lines += _wrap(note, width, "  note: ", "        ")
    for ft in report.finetunes:
        lines.append("")
        lines += _finetune_compact(report, ft, width)
    status, detail = overall_verdict(report)
    lines.append("")
    lines.append(f"overall: {status} ({detail})")
    return lines


def _finetune_compact(report: TransferReport, ft: FinetuneResult, width: int) -> list[str]:
    status, _ = finetune_verdict(ft)
    head = f"── {ft.model}: {status} "
    lines = [head + "─" * max(3, width - len(head))]
    why = explain_finetune(report, ft)
    lines += [f"  {line}" for line in why.lines]
    failed = [c for c in ft.checks if not c.passed and c.severity == "fail"]
    # One line per failing check, never wrapped mid-expression (the terminal folds long ones).
    lines += [f"  {check_symbol(c)} {c.id}: {c.message or check_expr(c)}" for c in failed]
    warnings = [*why.sae_warnings, *why.prior_warnings]
    lines += [f"  ! warning: {w}" for w in warnings]
    for note in ft.notes:
        lines += _wrap(note, width, "  note: ", "        ")
    n_pass = sum(1 for c in ft.checks if c.passed)
    where = _provenance(report, ft.model)
    lines.append(f"  {n_pass} of {len(ft.checks)} checks passed{where} (pytest -v shows every metric and check)")
    return lines


def _provenance(report: TransferReport, finetune: str) -> str:
    """Where this finetune's and the base's numbers came from: "; from the cache" and the like."""
    prov = report.config.get("provenance")
    if not isinstance(prov, Mapping):
        return ""
    used = {prov.get("base"), prov.get(finetune)} - {None}
    if used == {"cache"}:
        return "; results from the cache"
    if used == {"computed"}:
        return "; results computed in this run"
    if used:
        return f"; base {prov.get('base')}, finetune {prov.get(finetune)}"
    return ""


def _family_summary(run: RunReport, width: int) -> list[str]:
    """Per finetune: a row per SAE with its verdict and the key transfer numbers."""
    first = run.saes[0]
    lines = _wrap(f"SAE transfer: {len(run.saes)} SAEs — {first.base.model} → {', '.join(run.finetune_names)}", width, "", "    ")
    lines += _wrap(" · ".join(f"{k}: {v}" for k, v in run_facts(first)), width, "  ", "  ")
    for ft in run.finetune_names:
        rows = family_rows(run, ft)
        lines.append("")
        head = f"── {ft} "
        lines.append(head + "─" * max(3, width - len(head)))
        table = [["SAE", "verdict", "ΔCE over base", "EV drop", "act sim", "resid cos", "failed"]]
        for r in rows:
            table.append([r.sae, r.verdict, fmt_num(r.ce_delta_increase), fmt_num(r.ev_drop), fmt_num(r.activation_similarity),
                          fmt_num(r.resid_cosine), str(r.n_failed) if r.verdict == "FAIL" else ""])
        lines += _table(table, "llrrrrr")
        for r in rows:
            if r.verdict == "FAIL":
                sae_report = run.sae(r.sae)
                lines.append(f"  {r.sae}: {explain_finetune(sae_report, sae_report.finetune(ft)).lines[0]}")
        lines.append(_family_line(ft, rows))
    judged = [f for r in run.saes for f in r.finetunes if f.checks]
    n_bad = sum(1 for f in judged if f.passed is False)
    lines.append("")
    lines.append("═" * min(width, 60))
    overall = "FAIL" if run.passed is False else ("PASS" if run.passed else "NO CHECKS")
    left_out = sum(len(r.finetunes) for r in run.saes) - len(judged)
    aside = f"; {left_out} measured but deselected" if left_out else ""
    lines.append(f"overall: {overall} ({n_bad} of {len(judged)} judged (finetune, SAE) pairs failed{aside})")
    lines.append("  the full per-SAE detail is in the HTML and markdown reports (--sae-report-dir), and with pytest -v")
    return lines


def _family_line(ft: str, rows: list[Any]) -> str:
    """``toy-code: FAIL (2 of 3 SAEs failed; 2 deselected)``: counts over the SAEs whose checks ran."""
    judged = [r for r in rows if r.verdict in ("PASS", "FAIL")]
    n_fail = sum(1 for r in judged if r.verdict == "FAIL")
    n_out = sum(1 for r in rows if r.verdict == "DESELECTED")
    aside = f"; {n_out} deselected" if n_out else ""
    if n_fail:
        return f"{ft}: FAIL ({n_fail} of {len(judged)} SAEs failed{aside})"
    if judged:
        return f"{ft}: PASS (all {len(judged)} SAEs passed{aside})"
    return f"{ft}: NO CHECKS ({len(rows)} SAEs measured{aside})"


def _sae_summary(report: TransferReport, width: int) -> list[str]:
    """One SAE: per finetune, metrics, paired metrics, checks and a verdict."""
    lines: list[str] = []
    title = report_title(report)
    lines += _wrap(title, width, "", "    ")
    lines += _wrap(" · ".join(f"{k}: {v}" for k, v in run_facts(report)), width, "  ", "  ")
    notes = all_notes(report)
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
        for key in metric_keys(report, ft, full=False):
            b, f = report.base.metrics.get(key), ft.metrics.get(key)
            rows.append([key, fmt_num(b), fmt_num(f), fmt_delta(b, f, key), fmt_ci(ft.ci95.get(key)),
                         check_marker(ft, (f"base.{key}", f"finetune.{key}"))])
        lines += _table(rows, "lrrrll")

        pkeys = paired_keys(ft)
        scalar_keys = [k for k in pkeys if not isinstance(ft.paired.get(k), (list, tuple, Mapping))]
        if scalar_keys:
            lines.append("")
            prow = [["paired (base vs finetune)", "value", "ci95", ""]]
            for key in scalar_keys:
                prow.append([key, fmt_paired(key, ft.paired.get(key)), fmt_ci(ft.paired_ci95.get(key)),
                             check_marker(ft, (f"paired.{key}",))])
            lines += _table(prow, "lrll")
        for key in pkeys:
            if key not in scalar_keys:
                mark = check_marker(ft, (f"paired.{key}",))
                lines += _wrap(f"{key}: {fmt_paired(key, ft.paired.get(key))} {mark}".rstrip(), width,
                               "  ", "      ")

        for n in ft.notes:
            lines += _wrap(n, width, "  note: ", "        ")

        if ft.checks:
            lines.append("")
            lines.append("  checks:")
            for c in sorted_checks(ft.checks):
                sym = check_symbol(c)
                sev = " [warn]" if c.severity != "fail" else ""
                if c.passed:
                    lines += _wrap(f"{sym} {c.id}: {check_expr(c)} ({check_value(c)})", width, "    ", "        ")
                else:
                    lines += _wrap(f"{sym} {c.id}{sev}: {check_expr(c)}, {check_value(c)}", width,
                                   "    ", "        ")
                    if c.message:
                        lines += _wrap(c.message, width, "        ", "        ")
        lines.append(f"{ft.model}: {status}" + (f" ({detail})" if status != "NO CHECKS" else ""))

    status, detail = overall_verdict(report)
    lines.append("")
    lines.append("═" * min(width, 60))
    lines.append(f"overall: {status} ({detail})")
    return lines

