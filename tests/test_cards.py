"""Feature cards: well-formed HTML, hostile text escaped, missing data shown as missing,
and the markdown table."""

from __future__ import annotations

import copy
import re
from html.parser import HTMLParser

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_sae_transfer.render.cards import CARDS_CSS, feature_card_html, feature_cards_html, features_markdown
from pytest_sae_transfer.report import CheckResult

VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"}


class StrictTree(HTMLParser):
    """Fails on a closing tag that does not match the open one, and records elements and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(fragment: str) -> StrictTree:
    tree = StrictTree()
    tree.feed(fragment)
    tree.close()
    assert not tree.errors, tree.errors
    assert not tree.stack, f"unclosed: {tree.stack}"
    return tree


HOSTILE = '<script>alert("x")</script> & </article><b onmouseover="y">'


def _entry(value, left, token, right, c=0, p=5, cut_left=True, cut_right=True):
    return {"value": value, "context": c, "position": p, "token_id": 7, "left": left, "token": token,
            "right": right, "cut_left": cut_left, "cut_right": cut_right}


def _section(label="def keyword", left="class Foo:\n    ", token="def", right=" bar(self)"):
    card = {
        "id": 311, "label": label, "watched": True, "lists": ["lowest_activation_similarity"],
        "density_base": 0.0031, "density_finetune": 0.00012, "log10_density_change": -1.41, "regular": True,
        "activation_similarity": 0.21, "logit_similarity": 0.97, "dead_activation_error": None,
        "top_contexts": {"base": [_entry(3.2, left, token, right), _entry(1.5, "x = ", "def", "")],
                         "finetune": [_entry(2.0, "a", "[", "0]", 3, 9)]},
        "promoted_tokens": {"base": [{"token_id": 5, "token": " def", "value": 0.8}],
                            "finetune": [{"token_id": 6, "token": "\n", "value": 0.5}]},
    }
    other = copy.deepcopy(card)
    other.update({"id": 12, "label": None, "watched": False, "lists": ["turned_dead"], "activation_similarity": None,
                  "regular": False, "density_finetune": 0.0})
    other["top_contexts"] = {"base": [_entry(1.0, "", "x", "")], "finetune": []}
    other["promoted_tokens"] = {"base": None, "finetune": None}
    return {
        "version": 1, "d_sae": 1024, "top_k": 10, "window": {"left": 12, "right": 4},
        "lists": {"lowest_activation_similarity": {"ids": [311], "n_candidates": 600, "n_unknown": 0, "n_undefined": 2},
                  "turned_dead": {"ids": [12], "n_candidates": 1, "n_unknown": 0},
                  "turned_alive": {"ids": [], "n_candidates": 0, "n_unknown": 0}},
        "watched": [{"id": 311, "label": label}],
        "cards": {"311": card, "12": other},
    }


def test_cards_are_well_formed_and_show_every_part():
    checks = [
        CheckResult("feature[311 'def keyword'].activation_similarity>=0.8", "feature[311].activation_similarity", ">=",
                    0.8, 0.21, False, message="feature[311 'def keyword'] activation similarity = 0.21 < min 0.8"),
        CheckResult("feature[3].stays_alive", "feature[3].density_finetune", ">", 0.0, 0.1, True),  # another feature
    ]
    out = feature_cards_html(_section(), base_name="toy-base", finetune_name="toy-code", checks=checks,
                             anchor_prefix="toy-code")
    tree = parse(out)
    text = "".join(tree.text)
    ids = [a.get("id") for _, a in tree.tags if a.get("id")]
    assert ids.count("toy-code-feature-311") == 1 and ids.count("toy-code-feature-12") == 1  # each card once
    assert {a["href"] for t, a in tree.tags if t == "a"} <= {"#toy-code-feature-311", "#toy-code-feature-12"}
    marks = [i for i, (t, _) in enumerate(tree.tags) if t == "mark"]
    assert marks, "the activating token is highlighted"
    for needle in ("Watched features", "Lowest activation similarity", "(1 of 600 regular features with a similarity, 2 undefined)",
                   "Turned dead", "Turned alive", "none", "def keyword", "0.0031", "0.00012", "Δlog10 -1.41", "0.21",
                   "0.97", "3.2", "promotes", "toy-base", "toy-code", "activation_similarity>=0.8",
                   "never fired on this model", "promoted tokens not computed", "not regular on both models"):
        assert needle in text, needle
    assert "feature[3]" not in text  # only this feature's checks go on its card
    assert 'class="fc-card fc-fail"' in out


def test_one_card_alone_and_its_token_column():
    card = _section()["cards"]["311"]
    tree = parse(feature_card_html(card, base_name="b", finetune_name="f"))
    text = "".join(tree.text)
    assert "class Foo:↵    " in text and "def" in text and " bar(self)" in text
    assert "↵" in text  # the promoted newline token is visible
    out = feature_card_html(card)
    assert out.count("<mark>") == 3  # one per context


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.text(min_size=1, max_size=30), st.text(max_size=30), st.text(min_size=1, max_size=8))
def test_any_text_is_escaped(label, left, token):
    section = _section(label=label + HOSTILE, left=left + HOSTILE, token=token + HOSTILE)
    section["lists"]["<img src=x onerror=alert(1)>"] = {"ids": [311], "n_candidates": 1}
    for anchor in ("", 'x" onclick="y'):
        out = feature_cards_html(section, base_name=HOSTILE, finetune_name="<i>ft</i>", anchor_prefix=anchor)
        tree = parse(out)
        tags = {t for t, _ in tree.tags}
        assert tags <= {"details", "summary", "span", "table", "thead", "tbody", "tr", "th", "td", "a", "p", "div",
                        "article", "ul", "li", "code", "ol", "mark", "h4", "small", "b"}, tags
        assert not any(k.startswith("on") for _, attrs in tree.tags for k in attrs)
        assert "<script>" not in out and "<img" not in out and "<i>" not in out
        assert "<script>alert" in "".join(tree.text)  # shown as text


def test_missing_data_renders():
    assert "No feature section" in feature_cards_html(None)
    assert "No feature section" in feature_cards_html({})
    bare = {"id": 5}
    tree = parse(feature_card_html(bare))
    text = "".join(tree.text)
    assert "#5" in text and text.count("top contexts not recorded") == 2 and "—" in text
    section = {"lists": {"turned_dead": {"ids": [5, 6], "n_candidates": 2}}, "cards": {"5": bare}}
    text = "".join(parse(feature_cards_html(section)).text)
    assert "no card in the report for 6" in text


def test_css_is_scoped():
    css = re.sub(r"/\*.*?\*/", "", CARDS_CSS, flags=re.S)
    rules = re.sub(r"@media[^{]*\{", "", css)
    selectors = re.findall(r"(?m)^\s*([^{}]+?)\s*\{", rules)
    assert len(selectors) > 20
    for sel in selectors:
        for part in sel.split(","):
            assert ".fc-" in part, part


def test_markdown_table():
    md = features_markdown(_section(label="a|b", left="x*y_", token="`"), "toy-code")
    lines = md.strip().splitlines()
    assert lines[0] == "#### Worst features — toy-code"
    header_cols = lines[2].count("|")
    assert all(line.count("|") - line.count("\\|") == header_cols for line in lines[2:]), lines
    body = "\n".join(lines[4:])
    assert "| watched | #311 a\\|b | 0.21 | 0.0031 → 0.00012 |" in body
    assert "x\\*y\\_⟦\\`⟧" in body
    assert "| lowest activation similarity | … 599 more of 600 (the JSON report lists 1) |" in body
    assert "| turned dead | #12 | — | 0.0031 → 0 | …⟦x⟧… | (never fired) |" in body
    assert "| turned alive | none |" in body
    assert "\n" not in body.replace("\n|", "")  # one line per row
    hostile = features_markdown(_section(label=HOSTILE))
    assert "<script>" not in hostile and "&lt;script&gt;" in hostile
    assert features_markdown(None) == ""


@pytest.mark.parametrize("n", [0, 1, 5])
def test_markdown_respects_n(n):
    md = features_markdown(_section(), n=n)
    rows = [line for line in md.splitlines()[4:] if "#311" in line or "#12" in line]
    assert len(rows) <= 3 * n
