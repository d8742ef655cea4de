"""The text around a token position: what a feature fired on, readable.

Why: a feature is understood by reading its top activating tokens in context. The
run already holds its token tensor, so the snippets are decoded after the pass,
only for the features a report lists.

A snippet is the activating token isolated between a window of tokens on its left
and on its right (cut at the context's edges), as three strings, so that renderers
can highlight the token. Decoding is per piece (left / token / right) with the
tokenizer's own ``decode``; special tokens (BOS, EOS, PAD, ...) are shown as their
token strings (``<bos>``) wherever they are, since tokenizers disagree on whether
``decode`` keeps them. A token that decodes to part of a multi-byte character
(byte-level BPE) is shown as its bytes, ``\\xe2``, rather than as "�". An id the
tokenizer cannot decode (outside its vocabulary, or failing) is shown as ``[id]``,
never dropped. Whitespace is kept as it is; :func:`visible` makes it visible for
one-line displays.

Tokenizers are duck-typed (Hugging Face ``decode``, ``convert_ids_to_tokens``,
``all_special_ids``), so any tokenizer of any model works, or none at all.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

#: Default window: tokens shown left and right of the activating token.
DEFAULT_LEFT = 12
DEFAULT_RIGHT = 4

_REPLACEMENT = "\ufffd"


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2 style): the printable character standing for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _bytes_text(raw: bytes) -> str:
    """Bytes as text: valid UTF-8 decoded, anything else escaped as \\xNN."""
    return raw.decode("utf-8", errors="backslashreplace")


class SnippetMaker:
    """Snippets from one run's token tensor [contexts, T] and its tokenizer."""

    def __init__(
        self,
        tokens: Any,
        tokenizer: Any,
        left: int = DEFAULT_LEFT,
        right: int = DEFAULT_RIGHT,
        special_ids: Iterable[int] | None = None,
    ) -> None:
        import numpy as np

        if left < 0 or right < 0:
            raise ValueError(f"window sizes must be >= 0; got left={left}, right={right}")
        arr = tokens.detach().cpu().numpy() if hasattr(tokens, "detach") else np.asarray(tokens)
        if arr.ndim != 2:
            raise ValueError(f"tokens must be [contexts, positions]; got shape {arr.shape}")
        self.tokens = arr.astype(np.int64, copy=False)
        self.tokenizer = tokenizer
        self.left = left
        self.right = right
        specials = set(int(i) for i in special_ids) if special_ids is not None else set()
        for attr in ("all_special_ids",):
            try:
                specials.update(int(i) for i in (getattr(tokenizer, attr, None) or ()))
            except (TypeError, ValueError):
                pass
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            value = getattr(tokenizer, attr, None)
            if isinstance(value, int):
                specials.add(value)
        self.special_ids = frozenset(specials)
        try:
            self.vocab_size: int | None = len(tokenizer) if tokenizer is not None else None
        except TypeError:
            self.vocab_size = None
        self._token_cache: dict[int, str] = {}

    # -- decoding ------------------------------------------------------------------

    def _raw_token(self, token_id: int) -> str | None:
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        if convert is None:
            return None
        try:
            out = convert(int(token_id))
        except Exception:  # noqa: BLE001 - any tokenizer, any failure: fall back below
            return None
        return out if isinstance(out, str) else None

    def _decode_run(self, ids: Sequence[int]) -> str:
        decode = getattr(self.tokenizer, "decode", None)
        if decode is None:
            return "".join(f"[{i}]" for i in ids)
        try:
            try:
                text = decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            except TypeError:  # a decode without Hugging Face's keyword arguments
                text = decode(list(ids))
        except Exception:  # noqa: BLE001 - an id the tokenizer does not know, for instance
            if len(ids) > 1:
                return "".join(self._decode_run([i]) for i in ids)
            return f"[{ids[0]}]"
        return text if isinstance(text, str) else f"[{' '.join(map(str, ids))}]"

    def token_text(self, token_id: int) -> str:
        """One token alone, readable: its decoded text, its bytes when it is part of a
        character, or its token string when it is a special token."""
        cached = self._token_cache.get(token_id)
        if cached is not None:
            return cached
        text: str
        if token_id in self.special_ids:
            text = self._raw_token(token_id) or f"[{token_id}]"
        elif self._alone(token_id):
            text = f"[{token_id}]"
        else:
            text = self._decode_run([token_id])
            if _REPLACEMENT in text:
                raw = self._raw_token(token_id)
                alphabet = _byte_level_alphabet()
                if raw and all(c in alphabet for c in raw):
                    text = _bytes_text(bytes(alphabet[c] for c in raw))
                elif raw and raw.startswith("<0x") and raw.endswith(">"):  # SentencePiece byte fallback
                    text = raw
        self._token_cache[token_id] = text
        return text

    def _alone(self, token_id: int) -> bool:
        """Shown on its own rather than decoded in a run: a special token, or an id the
        tokenizer does not have (a finetune's added tokens; ``decode`` would drop it silently)."""
        if token_id in self.special_ids:
            return True
        return token_id < 0 or (self.vocab_size is not None and token_id >= self.vocab_size)

    def decode(self, ids: Sequence[int]) -> str:
        """Several tokens as text, special tokens as their token strings."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if self._alone(i):
                if run:
                    parts.append(self._decode_run(run))
                    run = []
                parts.append(self.token_text(i))
            else:
                run.append(i)
        if run:
            parts.append(self._decode_run(run))
        return "".join(parts)

    # -- snippets ----------------------------------------------------------------

    def snippet(self, context: int, position: int) -> dict[str, Any]:
        """The window around ``tokens[context, position]``: ``left``, ``token`` and ``right``
        strings, the ``token_id``, and whether the window cut text off on either side."""
        n_ctx, T = self.tokens.shape
        if not (0 <= context < n_ctx and 0 <= position < T):
            raise IndexError(f"(context {context}, position {position}) is outside the run's tokens [{n_ctx}, {T}]")
        row = self.tokens[context]
        lo = max(0, position - self.left)
        hi = min(T, position + 1 + self.right)
        token_id = int(row[position])
        return {
            "context": int(context),
            "position": int(position),
            "token_id": token_id,
            "left": self.decode(row[lo:position].tolist()),
            "token": self.token_text(token_id),
            "right": self.decode(row[position + 1 : hi].tolist()),
            "cut_left": lo > 0,
            "cut_right": hi < T,
        }


_VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}


def visible(text: str, spaces: bool = False) -> str:
    """Line breaks, tabs and other control characters as visible symbols (one-line displays);
    with ``spaces``, spaces too (for a token that is only whitespace)."""
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ch == " " and spaces:
            out.append("␣")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def format_snippet(entry: Mapping[str, Any], marks: tuple[str, str] = ("[[", "]]"), max_chars: int | None = None) -> str:
    """One line: ``…left[[token]]right…``, whitespace made visible; ``max_chars`` trims the
    left and right text (never the token) to fit."""
    left = visible(str(entry.get("left", "")))
    token = visible(str(entry.get("token", "")), spaces=not str(entry.get("token", "")).strip())
    right = visible(str(entry.get("right", "")))
    cut_left, cut_right = bool(entry.get("cut_left")), bool(entry.get("cut_right"))
    if max_chars is not None:
        room = max(0, max_chars - len(token) - len(marks[0]) - len(marks[1]))
        keep_right = min(len(right), room // 3)
        keep_left = min(len(left), room - keep_right)
        keep_right = min(len(right), room - keep_left)
        if keep_left < len(left):
            left, cut_left = left[len(left) - keep_left :], True
        if keep_right < len(right):
            right, cut_right = right[:keep_right], True
    return f"{'…' if cut_left else ''}{left}{marks[0]}{token}{marks[1]}{right}{'…' if cut_right else ''}"
