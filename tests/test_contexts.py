"""Snippets decoded with the zoo tokenizer from real zoo text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_sae_transfer import zoo
from pytest_sae_transfer.report.contexts import SnippetMaker, format_snippet, visible

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
T = 64


@pytest.fixture(scope="module")
def tokenizer():
    return zoo.load_tokenizer()


@pytest.fixture(scope="module")
def docs():
    with open(zoo.dataset_path("toy-eval"), encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    # Documents with curly quotes and dashes: multi-byte characters split over byte-level tokens.
    fancy = [t for t in texts if any(c in t for c in "’“–—…")][:3]
    return texts[:6] + fancy


@pytest.fixture(scope="module")
def packed(tokenizer, docs):
    """toy-eval documents packed as the engine packs them: BOS first, BOS between documents."""
    stream: list[int] = []
    for text in docs:
        stream += [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(stream) // T
    return torch.tensor(stream[: n * T]).view(n, T)


def test_snippets_reassemble_the_real_text(tokenizer, docs, packed):
    """left + token + right is the text of the window, and that text is in the document."""
    maker = SnippetMaker(packed, tokenizer, left=10, right=5)
    checked = 0
    for c in range(packed.shape[0]):
        for p in range(0, T, 7):
            s = maker.snippet(c, p)
            window = packed[c, max(0, p - 10) : p + 6].tolist()
            text = tokenizer.decode(window)
            if tokenizer.bos_token_id in window or "\ufffd" in text or "\ufffd" in s["left"] + s["token"] + s["right"]:
                continue
            assert s["left"] + s["token"] + s["right"] == text
            assert any(text in d for d in docs)
            assert s["token_id"] == int(packed[c, p]) and (s["context"], s["position"]) == (c, p)
            assert s["cut_left"] == (p > 10) and s["cut_right"] == (p + 6 < T)
            checked += 1
    assert checked > 50


@PROPS
@given(st.data())
def test_window_sizes_and_edges(tokenizer, packed, data):
    left = data.draw(st.integers(0, 20))
    right = data.draw(st.integers(0, 20))
    c = data.draw(st.integers(0, packed.shape[0] - 1))
    p = data.draw(st.integers(0, T - 1))
    maker = SnippetMaker(packed, tokenizer, left=left, right=right)
    s = maker.snippet(c, p)
    row = packed[c].tolist()
    assert s["left"] == maker.decode(row[max(0, p - left) : p])
    assert s["right"] == maker.decode(row[p + 1 : p + 1 + right])
    assert s["cut_left"] == (p - left > 0) and s["cut_right"] == (p + 1 + right < T)
    if left == 0:
        assert s["left"] == ""


def test_special_tokens_are_shown(tokenizer, packed):
    maker = SnippetMaker(packed, tokenizer, left=3, right=3)
    c, p = 0, 0
    assert maker.snippet(c, p)["token"] == "<bos>"
    # A BOS between documents shows up inside a window, readable.
    where = [(c, p) for c in range(packed.shape[0]) for p in range(4, T) if int(packed[c, p]) == tokenizer.bos_token_id]
    c, p = where[0]
    assert "<bos>" in maker.snippet(c, p + 1)["left"]
    assert maker.decode([tokenizer.eos_token_id, tokenizer.pad_token_id]) == "<eos><pad>"


def test_a_partial_character_shows_its_bytes(tokenizer):
    ids = tokenizer("a ✓ b", add_special_tokens=False)["input_ids"]
    maker = SnippetMaker(torch.tensor([ids]), tokenizer)
    pieces = [maker.token_text(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert any(piece.startswith("\\x") for piece in pieces)  # ✓ is three bytes over several tokens
    assert "".join(pieces).replace(" ", "") != ""
    # A character that is a whole token decodes as itself.
    whole = tokenizer("’", add_special_tokens=False)["input_ids"]
    if len(whole) == 1:
        assert maker.token_text(whole[0]) == "’"


def test_without_a_tokenizer_and_with_unknown_ids():
    maker = SnippetMaker(np.array([[5, 6, 7, 8]]), None, left=2, right=1)
    assert maker.snippet(0, 2) == {
        "context": 0, "position": 2, "token_id": 7, "left": "[5][6]", "token": "[7]", "right": "[8]",
        "cut_left": False, "cut_right": False,
    }
    tok = zoo.load_tokenizer()
    maker = SnippetMaker(np.array([[5, 10**7, 6]]), tok, left=2, right=0)
    s = maker.snippet(0, 1)
    assert s["token"] == f"[{10**7}]"  # decode() alone would drop it silently
    assert maker.decode([5, 10**7, 6, -1]) == tok.decode([5]) + f"[{10**7}]" + tok.decode([6]) + "[-1]"
    with pytest.raises(IndexError, match="outside"):
        maker.snippet(1, 0)
    with pytest.raises(ValueError):
        SnippetMaker(np.array([1, 2]), tok)


def test_visible_and_one_line_format():
    assert visible("a\nb\tc\x00") == "a↵b⇥c\\x00"
    assert visible("  ", spaces=True) == "␣␣"
    entry = {"left": "def f(x):\n    ", "token": "return", "right": " x\n", "cut_left": True, "cut_right": False}
    assert format_snippet(entry) == "…def f(x):↵    [[return]] x↵"
    assert format_snippet({"left": "a", "token": " ", "right": "b"}) == "a[[␣]]b"
    short = format_snippet({"left": "x" * 50, "token": "TOKEN", "right": "y" * 50}, max_chars=25)
    assert "[[TOKEN]]" in short and short.startswith("…") and short.endswith("…")
    assert len(short) <= 25 + 2
