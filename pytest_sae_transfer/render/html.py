"""One self-contained HTML page: metric tables, checks and the plots embedded as data URIs."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..report import FinetuneResult, RunReport, TransferReport
from ..thresholds.explain import explain_finetune
from .cards import CARDS_CSS, feature_cards_html
from .family import as_run, family_rows
from .glossary import define
from .plots import PLOT_CAPTIONS
from .text import (
    all_notes,
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
    report_title,
    run_facts,
    sorted_checks,
)

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


def html_page(report: RunReport | TransferReport, plot_files: Mapping[str, str | os.PathLike[str]]) -> str:
    """One self-contained HTML page: metric tables, checks and the plots embedded as base64 data URIs.

    ``plot_files`` maps plot names to image paths, as returned by
    :func:`pytest_sae_transfer.render.plots.make_all_plots` (names ``"<finetune>/<kind>"``
    are shown in that finetune's section; in a run of several SAEs, ``"<sae>/<finetune>/<kind>"``
    in that SAE's, and ``"<finetune>/layer_profile"`` at the top; any other name under
    "Other plots").
    """
    run = as_run(report)
    remaining = {str(k): str(v) for k, v in plot_files.items()}
    if len(run.saes) == 1:
        single = run.saes[0]
        title = report_title(single)
        body = _sae_body(single, remaining, plot_prefix="", anchor="ft")
    else:
        title = f"SAE transfer: {len(run.saes)} SAEs — {run.saes[0].base.model} → {', '.join(run.finetune_names)}"
        body = _family_body(run, remaining)
    if remaining:
        body.append('<section class="finetune"><h2>Other plots</h2><div class="plots">'
                    + "".join(_figure_html(n, p, n) for n, p in remaining.items()) + "</div></section>")
    flat = flat_config(run.config if len(run.saes) > 1 else run.saes[0].config)
    if flat:
        body.append("<h2>Run configuration</h2>" + _html_table(
            ["key", "value"], [([(f"<code>{_e(k)}</code>", ""), (_e(cfg_value(v)), "")], "") for k, v in flat]))
    body.append("</main><footer>Generated by pytest-sae-transfer (report schema_version 2). Hover a metric for its definition; docs/metrics.md in the project defines every metric, the JSON layout and the profile format.</footer>")
    return _page(title, body)


def _badge(status: str) -> str:
    return f'<span class="badge {_e(status.replace(" ", "-"))}">{_e(status)}</span>'


def _sae_body(report: TransferReport, remaining: dict[str, str], plot_prefix: str, anchor: str, heading: str = "h1") -> list[str]:
    """One SAE: its header, notes and a section per finetune."""
    status, detail = overall_verdict(report)
    body = [f'<header id="{_e(anchor)}">' if heading == "h1" else f'<section class="sae" id="{_e(anchor)}">']
    body.append(f"<{heading}>{_e(report_title(report))}</{heading}>")
    body.append(f"<p>{_badge(status)} {_e(detail)}</p>")
    body.append('<p class="sub">' + " · ".join(f"<b>{_e(k)}</b> {_e(v)}" for k, v in run_facts(report)) + "</p>")
    if len(report.finetunes) > 1:
        body.append("<nav>" + "".join(
            f'<a href="#{_e(anchor)}-{i}">{_e(ft.model)}: {_e(finetune_verdict(ft)[0])}</a>'
            for i, ft in enumerate(report.finetunes)) + "</nav>")
    if heading == "h1":
        body.append("</header><main>")
    notes = all_notes(report)
    if notes:
        body.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    for i, ft in enumerate(report.finetunes):
        body += _finetune_section(report, ft, f"{anchor}-{i}", remaining, plot_prefix)
    if heading != "h1":
        body.append("</section>")
    return body


def _family_body(run: RunReport, remaining: dict[str, str]) -> list[str]:
    """Several SAEs: per finetune, a row per SAE and the layer profile; then each SAE in detail."""
    overall = "FAIL" if run.passed is False else ("PASS" if run.passed else "NO CHECKS")
    body = ["<header>", f"<h1>{_e(f'SAE transfer: {len(run.saes)} SAEs')}</h1>", f"<p>{_badge(overall)}</p>"]
    body.append('<p class="sub">' + " · ".join(f"<b>{_e(k)}</b> {_e(v)}" for k, v in run_facts(run.saes[0])) + "</p>")
    body.append("<nav>" + "".join(f'<a href="#sae-{i}">{_e(r.sae_key)}</a>' for i, r in enumerate(run.saes)) + "</nav>")
    body.append("</header><main>")
    for ft in run.finetune_names:
        rows = family_rows(run, ft)
        body.append(f'<section class="finetune"><h2>{_e(ft)}: a row per SAE</h2>')
        trs = []
        for r in rows:
            cls = {"FAIL": "fail"}.get(r.verdict, "")
            link = f'<a href="#sae-{[x.sae_key for x in run.saes].index(r.sae)}">{_e(r.sae)}</a>'
            trs.append(([(link, ""), (_badge(r.verdict), ""), (_e(fmt_num(r.ce_delta_increase)), "num"),
                         (_e(fmt_num(r.ev_drop)), "num"), (_e(fmt_num(r.activation_similarity)), "num"),
                         (_e(fmt_num(r.resid_cosine)), "num"), (_e(r.detail), "")], cls))
        body.append(_html_table(["SAE", "verdict", "ΔCE over base", "EV drop", "act sim", "resid cos", "checks"], trs))
        name = f"{ft}/layer_profile"
        if name in remaining:
            body.append('<div class="plots">' + _figure_html(name, remaining.pop(name), "Layer profile: key transfer metrics by hook") + "</div>")
        body.append("</section>")
    for i, report in enumerate(run.saes):
        body += _sae_body(report, remaining, plot_prefix=f"{report.sae_key}/", anchor=f"sae-{i}", heading="h2")
    return body


def _finetune_section(report: TransferReport, ft: FinetuneResult, anchor: str, remaining: dict[str, str], plot_prefix: str) -> list[str]:
    fstatus, fdetail = finetune_verdict(ft)
    body = [f'<section class="finetune" id="{_e(anchor)}">']
    body.append(f"<h3>{_badge(fstatus)} {_e(ft.model)} <small>({_e(fdetail)})</small></h3>")
    why = explain_finetune(report, ft)
    body.append('<div class="why">' + "".join(f"<p>{_e(line)}</p>" for line in why.lines)
                + "".join(f'<p class="warn">warning: {_e(w)}</p>' for w in (*why.sae_warnings, *why.prior_warnings)) + "</div>")
    if ft.notes:
        body.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in ft.notes) + "</ul>")
    body.append('<div class="tables">')
    mrows = _metric_rows(report, ft)
    if mrows:
        body.append("<div><h4>Per-model metrics</h4>" + _html_table(
            ["metric", "base", "base ci95", "finetune", "finetune ci95", "Δ (ft − base)", ""], mrows) + "</div>")
    prows = _paired_rows(ft)
    if prows:
        body.append("<div><h4>Paired metrics (base vs finetune)</h4>" + _html_table(["metric", "value", "ci95", ""], prows) + "</div>")
    body.append("</div>")
    if ft.checks:
        crows = []
        for c in sorted_checks(ft.checks):
            sym = check_symbol(c)
            cls = {"✗": "fail", "!": "warn"}.get(sym, "")
            crows.append(([(_sym_html(sym), "sym"), (f"<code>{_e(c.id)}</code>", ""),
                           (f"<code>{_e(check_expr(c))}</code>", ""), (_e(check_value(c)), ""),
                           (_e(c.severity), ""), (_e(c.message), "")], cls))
        body.append("<h4>Checks</h4>" + _html_table(["", "id", "check", "value", "severity", "message"], crows))
    figs = []
    for kind, caption in PLOT_CAPTIONS.items():
        name = f"{plot_prefix}{ft.model}/{kind}"
        if name in remaining:
            figs.append(_figure_html(name, remaining.pop(name), caption))
    if figs:
        body.append('<h4>Plots</h4><div class="plots">' + "".join(figs) + "</div>")
    if ft.features:
        body.append("<h4>Features: which broke, with their text</h4>" + feature_cards_html(
            ft.features, base_name=report.base.model, finetune_name=ft.model, checks=ft.checks, anchor_prefix=anchor))
    body.append("</section>")
    return body


def _metric_rows(report: TransferReport, ft: FinetuneResult) -> list[Any]:
    rows = []
    for key in metric_keys(report, ft, full=True):
        b, f = report.base.metrics.get(key), ft.metrics.get(key)
        mark = check_marker(ft, (f"base.{key}", f"finetune.{key}"))
        cls = {"✗": "fail", "!": "warn"}.get(mark, "")
        rows.append(([(_metric_name(key), ""), (_e(fmt_num(b)), "num"),
                      (_e(fmt_ci(report.base.ci95.get(key))), "num"), (_e(fmt_num(f)), "num"),
                      (_e(fmt_ci(ft.ci95.get(key))), "num"), (_e(fmt_delta(b, f, key)), "num"),
                      (_sym_html(mark), "sym")], cls))
    return rows


def _paired_rows(ft: FinetuneResult) -> list[Any]:
    rows = []
    for key in paired_keys(ft):
        mark = check_marker(ft, (f"paired.{key}",))
        cls = {"✗": "fail", "!": "warn"}.get(mark, "")
        rows.append(([(_metric_name(key), ""), (_e(fmt_paired(key, ft.paired.get(key))), "num"),
                      (_e(fmt_ci(ft.paired_ci95.get(key))), "num"), (_sym_html(mark), "sym")], cls))
    return rows


def _metric_name(key: str) -> str:
    """A metric's key, with its one-line definition as a tooltip (docs/metrics.md has the rest)."""
    meaning = define(key)
    return f'<code title="{_e(meaning)}">{_e(key)}</code>' if meaning else f"<code>{_e(key)}</code>"


def _page(title: str, body: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}{CARDS_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )

