"""GitHub-flavoured markdown: ``summary.md`` and ``$GITHUB_STEP_SUMMARY``."""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Sequence

from pathlib import Path

from ..report import FinetuneResult, RunReport, TransferReport
from ..thresholds.explain import explain_finetune
from .cards import features_markdown
from .family import as_run, family_rows
from .text import (
    all_notes,
    cfg_get,
    cfg_value,
    check_expr,
    check_marker,
    check_symbol,
    check_value,
    finetune_verdict,
    flat_config,
    fmt_ci,
    fmt_delta,
    fmt_num,
    fmt_paired,
    metric_keys,
    overall_verdict,
    paired_keys,
    run_facts,
    sae_label,
    sorted_checks,
)

_MD_ICON = {"PASS": "✅", "FAIL": "❌", "NO CHECKS": "⚪", "NO FINETUNES": "⚪", "DESELECTED": "⚪"}


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


def markdown_summary(report: RunReport | TransferReport, plot_files: Mapping[str, Any] | None = None) -> str:
    """GitHub-flavoured markdown: headline verdict, then per finetune metric, paired and check tables.

    A run of several SAEs starts with a table per finetune (a row per SAE) and, when
    ``plot_files`` holds them, its layer profiles (linked by file name); each SAE's
    detail follows."""
    run = as_run(report)
    if len(run.saes) == 1:
        return "\n".join(_sae_markdown(run.saes[0], "##"))
    return "\n".join(_family_markdown(run, plot_files or {}))


def _family_markdown(run: RunReport, plot_files: Mapping[str, Any]) -> list[str]:
    overall = "FAIL" if run.passed is False else ("PASS" if run.passed else "NO CHECKS")
    first = run.saes[0]
    out = [f"## {_MD_ICON.get(overall, '')} SAE transfer: {overall} — {len(run.saes)} SAEs, {first.base.model} → "
           f"{_md(', '.join(run.finetune_names))}", ""]
    out.append(" · ".join(f"**{k}** {_md_code(v)}" for k, v in run_facts(first)))
    out.append("")
    for ft in run.finetune_names:
        rows = family_rows(run, ft)
        out.append(f"### {_md(ft)}")
        out.append("")
        out += _md_table(
            ["SAE", "verdict", "ΔCE over base", "EV drop", "act sim", "resid cos", "checks"], "llrrrrl",
            [[_md_code(r.sae), f"{_MD_ICON.get(r.verdict, '')} {r.verdict}", fmt_num(r.ce_delta_increase), fmt_num(r.ev_drop),
              fmt_num(r.activation_similarity), fmt_num(r.resid_cosine), _md(r.detail)] for r in rows],
        )
        out.append("")
        profile = plot_files.get(f"{ft}/layer_profile")
        if profile is not None:
            out.append(f"![layer profile of {_md(ft)}]({Path(str(profile)).name})")
            out.append("")
    for report in run.saes:
        out += _sae_markdown(report, "###", with_config=False)
    return out


def _sae_markdown(report: TransferReport, level: str, with_config: bool = True) -> list[str]:
    status, detail = overall_verdict(report)
    sub = level + "#"
    out: list[str] = [f"{level} {_MD_ICON.get(status, '')} SAE transfer: {status} — {_md(detail)}".replace("  ", " "), ""]
    cfg = report.config
    hook = cfg_get(cfg, "hook_name")
    facts = [f"**SAE** {_md_code(sae_label(cfg))}"]
    if hook:
        facts.append(f"**hook** {_md_code(hook)}")
    facts += [f"**{k}** {_md_code(v)}" for k, v in run_facts(report)]
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
    notes = all_notes(report)
    if notes:
        out.append("**Notes**")
        out.append("")
        out += [f"- {_md(n)}" for n in notes]
        out.append("")
    for ft in report.finetunes:
        out += _finetune_markdown(report, ft, sub)
    flat = flat_config(cfg) if with_config else []
    if flat:
        out.append("<details><summary>Run configuration</summary>")
        out.append("")
        out += _md_table(["key", "value"], "ll", [[_md_code(k), _md(cfg_value(v))] for k, v in flat])
        out.append("")
        out.append("</details>")
        out.append("")
    return out


def _finetune_markdown(report: TransferReport, ft: FinetuneResult, level: str) -> list[str]:
    fstatus, fdetail = finetune_verdict(ft)
    out = [f"{level} {_MD_ICON.get(fstatus, '')} {_md(ft.model)}: {fstatus} ({_md(fdetail)})", ""]
    why = explain_finetune(report, ft)
    out += [_md(line) for line in why.lines] + [f"- warning: {_md(w)}" for w in (*why.sae_warnings, *why.prior_warnings)] + [""]
    for n in ft.notes:
        out.append(f"> {_md(n)}")
    if ft.notes:
        out.append("")
    rows = []
    for key in metric_keys(report, ft, full=True):
        b, f = report.base.metrics.get(key), ft.metrics.get(key)
        mark = check_marker(ft, (f"base.{key}", f"finetune.{key}"))
        rows.append([f"{_md_code(key)} {mark}".rstrip(), fmt_num(b), fmt_ci(report.base.ci95.get(key)),
                     fmt_num(f), fmt_ci(ft.ci95.get(key)), fmt_delta(b, f, key)])
    if rows:
        out += _md_table(["metric", "base", "base ci95", "finetune", "finetune ci95", "Δ (ft − base)"], "lrlrlr", rows)
        out.append("")
    pkeys = paired_keys(ft)
    if pkeys:
        out.append("**Paired metrics (base vs finetune)**")
        out.append("")
        out += _md_table(
            ["metric", "value", "ci95"],
            "lrl",
            [[f"{_md_code(k)} {check_marker(ft, (f'paired.{k}',))}".rstrip(), _md(fmt_paired(k, ft.paired.get(k))),
              fmt_ci(ft.paired_ci95.get(k))] for k in pkeys],
        )
        out.append("")
    if ft.checks:
        out.append("**Checks**")
        out.append("")
        out += _md_table(
            ["", "id", "check", "value", "severity", "message"],
            "clllll",
            [[check_symbol(c), _md_code(c.id), _md_code(check_expr(c)), _md(check_value(c)),
              c.severity, _md(c.message)] for c in sorted_checks(ft.checks)],
        )
        out.append("")
    if ft.features:
        out += [features_markdown(ft.features, ft.model), ""]
    return out


def append_github_step_summary(report: RunReport | TransferReport, markdown: str | None = None) -> bool:
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

