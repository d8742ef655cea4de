"""Feature cards: a finetune's worst and watched features as HTML cards and a markdown table.

Why: "feature 311 fired on ``def`` in the base and fires on ``[`` in the finetune" is
read at a glance from a card that puts both models' top contexts side by side, with
the activating token highlighted and its value, and the tokens the feature promotes
on each model. The input is a finetune's ``"features"`` section
(:mod:`pytest_sae_transfer.report.feature_section`), plain JSON, so cards render from
a report read back from disk as well.

* :data:`CARDS_CSS`: the styles the cards need (class names start with ``fc-``, so
  they do not collide with the page's); put it in the page's ``<style>``.
* :func:`feature_card_html`: one card. :func:`feature_cards_html`: the watched
  features and each worst-feature list, each list with a compact table and its cards.
* :func:`features_markdown`: a compact table of the worst features with a one-line
  snippet each, for ``summary.md``.

Everything that comes from the data (labels, token text, model names, list names) is
escaped. Missing parts (a model's contexts not recorded, no promoted tokens, null
numbers) render as such, never as an empty space that looks like "nothing fired".
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable, Mapping, Sequence

from ..report import CheckResult
from ..report.contexts import format_snippet, visible

#: Headings of the worst-feature lists (metrics.feature_rank.RANKINGS); other names are shown as they are.
LIST_TITLES: Mapping[str, tuple[str, str]] = {
    "lowest_activation_similarity": ("Lowest activation similarity", "regular features with a similarity"),
    "turned_dead": ("Turned dead", "features alive on the base, dead on the finetune"),
    "turned_alive": ("Turned alive", "features dead on the base, alive on the finetune"),
    "largest_density_change": ("Largest density change", "features alive on both models"),
}

CARDS_CSS = """
.fc-list { margin: 1em 0; }
.fc-list > summary { cursor: pointer; font-weight: 600; font-size: 1.05em; }
.fc-list > summary .fc-count { font-weight: 400; color: #666; }
.fc-cards { display: grid; grid-template-columns: 1fr; gap: .8em; margin-top: .6em; }
.fc-card { background: #fff; border: 1px solid #ddd; border-left: 4px solid #888; border-radius: .35em;
           padding: .6em .9em .8em; }
.fc-card.fc-fail { border-left-color: #c0392b; } .fc-card.fc-pass { border-left-color: #1e8449; }
.fc-card.fc-warn { border-left-color: #b9770e; }
.fc-head { display: flex; flex-wrap: wrap; align-items: baseline; gap: .5em; margin-bottom: .3em; }
.fc-id { font-weight: 700; font-size: 1.1em; font-family: ui-monospace, Menlo, Consolas, monospace; }
.fc-label { font-weight: 600; }
.fc-tag { font-size: .75em; padding: .05em .5em; border-radius: 1em; background: #eef2f7; color: #334; }
.fc-tag.fc-watched { background: #e8f0fe; color: #1a4fa0; }
.fc-nums { display: flex; flex-wrap: wrap; gap: .3em 1.4em; margin: .2em 0 .4em; font-size: .88em; color: #333; }
.fc-nums b { font-weight: 600; color: #555; margin-right: .3em; }
.fc-nums .fc-bad { color: #c0392b; font-weight: 600; }
.fc-checks { list-style: none; padding: 0; margin: .2em 0 .5em; font-size: .85em; }
.fc-checks li { margin: .1em 0; }
.fc-checks .fc-sym-fail { color: #c0392b; font-weight: 700; } .fc-checks .fc-sym-pass { color: #1e8449; font-weight: 700; }
.fc-checks .fc-sym-warn { color: #b9770e; font-weight: 700; }
.fc-sides { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 1.2em; }
.fc-side { min-width: 0; }
.fc-side h4 { margin: .2em 0 .3em; font-size: .9em; color: #444; }
.fc-side h4 small { font-weight: 400; color: #777; }
.fc-ctx { list-style: none; margin: 0; padding: 0; font-family: ui-monospace, Menlo, Consolas, monospace;
          font-size: .8em; }
.fc-ctx li { display: flex; gap: .6em; padding: .12em 0; border-bottom: 1px dotted #eee; }
.fc-val { flex: 0 0 4.2em; text-align: right; color: #555; font-variant-numeric: tabular-nums; }
/* The activating tokens line up in one column: the left text is right-aligned and clipped on
   its left, the right text clipped on its right. */
.fc-snip { display: flex; flex: 1 1 0; min-width: 0; color: #444; }
.fc-l { flex: 1 1 0; min-width: 0; overflow: hidden; display: flex; justify-content: flex-end; }
.fc-l > span, .fc-r { white-space: pre; }
.fc-r { flex: 1 1 0; min-width: 0; overflow: hidden; text-overflow: ellipsis; }
.fc-snip mark { flex: none; white-space: pre; background: #ffd54f; color: #000; border-radius: .2em;
                padding: 0 .1em; font-weight: 700; }
.fc-snip .fc-cut { color: #aaa; }
.fc-prom { margin-top: .4em; font-size: .8em; color: #444; line-height: 1.9; overflow-wrap: anywhere; }
.fc-prom code { background: #f3f3f3; border-radius: .25em; padding: .05em .3em; margin-right: .15em;
                font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
.fc-prom .fc-pv { color: #888; margin-right: .6em; }
.fc-none { color: #888; font-style: italic; font-size: .85em; }
table.fc-table { border-collapse: collapse; font-size: .85em; margin: .4em 0; }
table.fc-table th, table.fc-table td { border-bottom: 1px solid #ddd; padding: .2em .6em; text-align: left; }
table.fc-table td.fc-num { text-align: right; font-variant-numeric: tabular-nums; }
table.fc-table td.fc-snipcell { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; max-width: 30em;
                                overflow: hidden; text-overflow: ellipsis; font-size: .95em; }
table.fc-table td.fc-snipcell mark { background: #ffd54f; color: #000; border-radius: .2em; font-weight: 700; }
@media (max-width: 900px) { .fc-sides { grid-template-columns: 1fr; } }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, bool):
        return "—"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return "—"
    if not math.isfinite(f):
        return "—"
    if f == 0:
        return "0"
    return f"{f:.{digits}g}"


def _anchor(prefix: str, feature_id: Any) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(prefix))
    return f"{safe}-feature-{_e(feature_id)}" if safe else f"feature-{_e(feature_id)}"


def _feature_checks(checks: Iterable[CheckResult], feature_id: Any) -> list[CheckResult]:
    prefix = f"feature[{feature_id}]."
    return [c for c in checks if str(c.metric).startswith(prefix)]


def _snippet_html(entry: Mapping[str, Any]) -> str:
    token_raw = str(entry.get("token", ""))
    left = _e(visible(str(entry.get("left", ""))))
    token = _e(visible(token_raw, spaces=not token_raw.strip()))
    right = _e(visible(str(entry.get("right", ""))))
    cut_l = '<span class="fc-cut">…</span>' if entry.get("cut_left") else ""
    cut_r = '<span class="fc-cut">…</span>' if entry.get("cut_right") else ""
    title = _e(f"context {entry.get('context')}, position {entry.get('position')}, token id {entry.get('token_id')}")
    return (f'<span class="fc-snip" title="{title}"><span class="fc-l"><span>{cut_l}{left}</span></span>'
            f'<mark>{token}</mark><span class="fc-r">{right}{cut_r}</span></span>')


def _side_html(card: Mapping[str, Any], side: str, model_name: str, max_contexts: int | None) -> str:
    parts = [f'<div class="fc-side"><h4>{_e(side)} <small>{_e(model_name)}</small></h4>']
    contexts = (card.get("top_contexts") or {}).get(side)
    if contexts is None:
        parts.append('<p class="fc-none">top contexts not recorded for this model</p>')
    elif not contexts:
        parts.append('<p class="fc-none">never fired on this model</p>')
    else:
        shown = contexts if max_contexts is None else contexts[:max_contexts]
        parts.append('<ol class="fc-ctx">')
        for entry in shown:
            parts.append(f'<li><span class="fc-val">{_e(_num(entry.get("value")))}</span>{_snippet_html(entry)}</li>')
        parts.append("</ol>")
        if len(shown) < len(contexts):
            parts.append(f'<p class="fc-none">{len(contexts) - len(shown)} more in the JSON report</p>')
    promoted = (card.get("promoted_tokens") or {}).get(side)
    if promoted is None:
        parts.append('<p class="fc-none">promoted tokens not computed</p>')
    elif promoted:
        toks = " ".join(  # the spaces let the line wrap between tokens
            f'<code>{_e(visible(str(p.get("token", "")), spaces=True))}</code><span class="fc-pv">{_e(_num(p.get("value"), 2))}</span>'
            for p in promoted
        )
        parts.append(f'<div class="fc-prom"><b>promotes</b> {toks}</div>')
    parts.append("</div>")
    return "".join(parts)


def feature_card_html(
    card: Mapping[str, Any],
    *,
    base_name: str = "",
    finetune_name: str = "",
    checks: Sequence[CheckResult] = (),
    anchor_prefix: str = "",
    max_contexts: int | None = None,
) -> str:
    """One feature's card from its section entry; ``checks`` (e.g. the finetune's checks) adds
    the results of this feature's watch checks; ``anchor_prefix`` makes its element id unique
    on a page with several finetunes."""
    fid = card.get("id", "?")
    own = _feature_checks(checks, fid)
    state = ""
    if own:
        if any(not c.passed and c.severity == "fail" for c in own):
            state = " fc-fail"
        elif any(not c.passed for c in own):
            state = " fc-warn"
        else:
            state = " fc-pass"
    head = [f'<span class="fc-id">#{_e(fid)}</span>']
    if card.get("label"):
        head.append(f'<span class="fc-label">{_e(card["label"])}</span>')
    if card.get("watched"):
        head.append('<span class="fc-tag fc-watched">watched</span>')
    for name in card.get("lists") or ():
        head.append(f'<span class="fc-tag">{_e(LIST_TITLES.get(name, (name,))[0].lower())}</span>')

    act, logit = card.get("activation_similarity"), card.get("logit_similarity")
    low = act is not None and isinstance(act, (int, float)) and act < 0.8
    change = card.get("log10_density_change")
    density = f'{_e(_num(card.get("density_base")))} → {_e(_num(card.get("density_finetune")))}'
    if isinstance(change, (int, float)) and math.isfinite(change):
        density += f" (Δlog10 {change:+.2f})"
    why_no_sim = ""
    if act is None:
        why_no_sim = " (not regular on both models)" if not card.get("regular") else " (undefined)"
    nums = [
        f"<span><b>density</b>{density}</span>",
        f'<span><b>activation similarity</b><span class="{"fc-bad" if low else ""}">{_e(_num(act))}</span>'
        f'<span class="fc-none">{_e(why_no_sim)}</span></span>',
        f"<span><b>logit similarity</b>{_e(_num(logit))}</span>",
    ]
    if card.get("dead_activation_error") is not None:
        nums.append(f'<span><b>dead-feature error</b>{_e(_num(card.get("dead_activation_error")))}</span>')

    parts = [f'<article class="fc-card{state}" id="{_anchor(anchor_prefix, fid)}">',
             '<div class="fc-head">' + " ".join(head) + "</div>",
             '<div class="fc-nums">' + "".join(nums) + "</div>"]
    if own:
        items = []
        for c in own:
            sym, cls = ("✓", "pass") if c.passed else (("✗", "fail") if c.severity == "fail" else ("!", "warn"))
            bound = str(c.id).split("].", 1)[-1]  # the feature's name is the card's title
            items.append(f'<li><span class="fc-sym-{cls}">{sym}</span> <code>{_e(bound)}</code> {_e(c.message)}</li>')
        parts.append('<ul class="fc-checks">' + "".join(items) + "</ul>")
    parts.append('<div class="fc-sides">'
                 + _side_html(card, "base", base_name, max_contexts)
                 + _side_html(card, "finetune", finetune_name, max_contexts) + "</div>")
    parts.append("</article>")
    return "".join(parts)


def _short_snippet_html(entry: Mapping[str, Any], max_chars: int) -> str:
    """A one-line snippet trimmed to ``max_chars``, the activating token highlighted."""
    # visible() turns control characters into text, so these two cannot occur in the snippet.
    text = format_snippet(entry, ("\x00", "\x01"), max_chars=max_chars)
    return _e(text).replace("\x00", "<mark>").replace("\x01", "</mark>")


def _summary_table(section: Mapping[str, Any], ids: Sequence[Any], anchor_prefix: str) -> str:
    cards = section.get("cards") or {}
    rows = []
    for fid in ids:
        card = cards.get(str(fid)) or {}
        tops = {}
        for side in ("base", "finetune"):
            entries = (card.get("top_contexts") or {}).get(side)
            if entries:
                tops[side] = _short_snippet_html(entries[0], 40)
            else:
                tops[side] = "—" if entries is None else '<span class="fc-none">never fired</span>'
        rows.append(
            f'<tr><td><a href="#{_anchor(anchor_prefix, fid)}">#{_e(fid)}</a></td>'
            f'<td>{_e(card.get("label") or "")}</td>'
            f'<td class="fc-num">{_e(_num(card.get("activation_similarity")))}</td>'
            f'<td class="fc-num">{_e(_num(card.get("density_base")))} → {_e(_num(card.get("density_finetune")))}</td>'
            f'<td class="fc-snipcell">{tops["base"]}</td><td class="fc-snipcell">{tops["finetune"]}</td></tr>'
        )
    head = "".join(f"<th>{h}</th>" for h in ("feature", "label", "act. sim.", "density base → ft", "base top context", "finetune top context"))
    return f'<table class="fc-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def feature_cards_html(
    section: Mapping[str, Any] | None,
    *,
    base_name: str = "",
    finetune_name: str = "",
    checks: Sequence[CheckResult] = (),
    anchor_prefix: str = "",
    max_contexts: int | None = None,
    open_lists: Sequence[str] = ("watched", "lowest_activation_similarity"),
) -> str:
    """The watched features, then each worst-feature list: a ``<details>`` block with a compact
    table and the list's cards. A feature on several lists has its card (and anchor) once, in
    the first block that shows it. An absent section renders a one-line note."""
    if not section:
        return '<p class="fc-none">No feature section in this report (feature-level results were not recorded).</p>'
    cards = section.get("cards") or {}
    shown: set[str] = set()
    blocks = []

    def block(key: str, title: str, count: str, ids: Sequence[Any]) -> None:
        opened = " open" if key in open_lists else ""
        body = [_summary_table(section, ids, anchor_prefix)] if ids else ['<p class="fc-none">none</p>']
        fresh = [str(i) for i in ids if str(i) not in shown]
        missing = [i for i in fresh if i not in cards]
        if missing:
            body.append(f'<p class="fc-none">no card in the report for {_e(", ".join(missing))}</p>')
        body.append('<div class="fc-cards">' + "".join(
            feature_card_html(cards[i], base_name=base_name, finetune_name=finetune_name, checks=checks,
                              anchor_prefix=anchor_prefix, max_contexts=max_contexts)
            for i in fresh if i in cards) + "</div>")
        shown.update(fresh)
        blocks.append(f'<details class="fc-list"{opened}><summary>{_e(title)} <span class="fc-count">{_e(count)}</span>'
                      f'</summary>{"".join(body)}</details>')

    watched = [w.get("id") for w in section.get("watched") or ()]
    if watched:
        block("watched", "Watched features", f"({len(watched)})", watched)
    for name, entry in (section.get("lists") or {}).items():
        title, what = LIST_TITLES.get(name, (name, "features"))
        ids = list(entry.get("ids") or ())
        count = f"({len(ids)} of {entry.get('n_candidates', '?')} {what}"
        extra = [f"{entry[k]} {k[2:]}" for k in ("n_undefined", "n_unknown") if entry.get(k)]
        count += (", " + ", ".join(extra) if extra else "") + ")"
        block(name, title, count, ids)
    return "".join(blocks)


# ---------------------------------------------------------------------------- markdown


def _md_cell(text: Any) -> str:
    """Text for a GFM table cell: no line breaks, no table or markup syntax, no HTML."""
    s = visible(str(text))
    out = []
    for ch in s:
        if ch in "\\`*_[]|~#!":
            out.append("\\" + ch)
        elif ch == "<":
            out.append("&lt;")
        elif ch == ">":
            out.append("&gt;")
        elif ch == "&":
            out.append("&amp;")
        else:
            out.append(ch)
    return "".join(out)


def features_markdown(section: Mapping[str, Any] | None, finetune_name: str = "", n: int = 5, snippet_chars: int = 40) -> str:
    """A compact markdown table of the worst features: per list its first ``n`` features with
    their numbers and a one-line snippet (the top context) on each model; the watched
    features first."""
    if not section:
        return ""
    cards = section.get("cards") or {}
    header = "| list | feature | act. sim. | density base → ft | base top context | finetune top context |"
    lines = [f"#### Worst features{(' — ' + _md_cell(finetune_name)) if finetune_name else ''}", "", header,
             "|---|---:|---:|---|---|---|"]

    def row(list_title: str, fid: Any) -> str:
        card = cards.get(str(fid)) or {}
        label = f" {_md_cell(card['label'])}" if card.get("label") else ""
        snips = []
        for side in ("base", "finetune"):
            entries = (card.get("top_contexts") or {}).get(side)
            if entries is None:
                snips.append("—")
            elif not entries:
                snips.append("(never fired)")
            else:
                snips.append(_md_cell(format_snippet(entries[0], ("⟦", "⟧"), max_chars=snippet_chars)))
        dens = f"{_num(card.get('density_base'))} → {_num(card.get('density_finetune'))}"
        return (f"| {list_title} | #{_md_cell(fid)}{label} | {_num(card.get('activation_similarity'))} | {dens} | "
                f"{snips[0]} | {snips[1]} |")

    watched = [w.get("id") for w in section.get("watched") or ()]
    for fid in watched[:n]:
        lines.append(row("watched", fid))
    for name, entry in (section.get("lists") or {}).items():
        title = _md_cell(LIST_TITLES.get(name, (name,))[0].lower())
        ids = list(entry.get("ids") or ())
        for fid in ids[:n]:
            lines.append(row(title, fid))
        total = int(entry.get("n_candidates") or 0)
        if total == 0:
            lines.append(f"| {title} | none | | | | |")
        elif total > min(n, len(ids)):
            lines.append(f"| {title} | … {total - min(n, len(ids))} more of {total} (the JSON report lists {len(ids)}) | | | | |")
    if len(lines) == 4:
        lines.append("| — | no features listed | | | | |")
    return "\n".join(lines) + "\n"
