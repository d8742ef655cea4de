"""A finetune's ``"features"`` section: the features that broke worst, and the watched
ones, each with its numbers, its top contexts as text and its promoted tokens.

Why: the paired block says *that* an SAE stopped transferring; this section says
*which* features broke and what they were about, in the JSON report itself, so a
reader (or the HTML cards, or a custom test) needs no notebook to see that
"feature 311 fired on ``def`` in the base and fires on ``[`` in the finetune".

The section is plain JSON (NaN written as null)::

    {
      "version": 1,
      "d_sae": 1024,
      "top_k": 10,                       # top contexts kept per feature and model
      "window": {"left": 12, "right": 4},  # tokens of text around each context
      "lists": {                         # metrics.feature_rank.RANKINGS, in that order
        "lowest_activation_similarity": {"ids": [311, ...], "n_candidates": 612,
                                         "n_unknown": 0, "n_undefined": 0},
        "turned_dead": {...}, "turned_alive": {...}, "largest_density_change": {...}
      },
      "watched": [{"id": 311, "label": "def keyword"}, {"id": 12, "label": null}],
      "cards": {                         # one per listed or watched feature; keys are str(id)
        "311": {
          "id": 311, "label": "def keyword", "watched": true,
          "lists": ["lowest_activation_similarity"],   # the lists it is on
          "density_base": 0.0031, "density_finetune": 0.00012, "log10_density_change": -1.41,
          "regular": true,
          "activation_similarity": 0.21, "logit_similarity": 0.97, "dead_activation_error": null,
          "top_contexts": {
            "base":     [{"value": 3.2, "context": 17, "position": 40, "token_id": 569,
                          "left": "...", "token": "def", "right": " foo(",
                          "cut_left": true, "cut_right": true}, ...],
            "finetune": [...]            # null when that model's top-k table was not recorded
          },
          "promoted_tokens": {
            "base":     [{"token_id": 569, "token": "def", "value": 0.83}, ...],
            "finetune": [...]            # null when not computed
          }
        }
      }
    }

A list's ``n_candidates`` is how many features qualified for it (a list shows at
most N of them); ``n_unknown`` counts features whose density could not be measured,
``n_undefined`` regular features without a similarity. Nothing is cut silently.

Inputs are duck-typed so that this module needs nothing from ``metrics`` beyond the
metric names: a top-k table is anything with ``values``, ``contexts`` and
``positions`` arrays of shape [d_sae, k] (``metrics.topk.TopKTable``), the rankings
are ``metrics.feature_rank.rank_features``'s output, and promoted tokens are
``metrics.promoted.promoted_tokens``'s output.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from .contexts import DEFAULT_LEFT, DEFAULT_RIGHT, SnippetMaker

SECTION_VERSION = 1

#: Models of a card, in display order.
SIDES: tuple[str, ...] = ("base", "finetune")

_LOG_EPS = 1e-10  # the log-density epsilon (docs/metrics.md)
_REGULAR = (-5.0, -1.0)


def _num(value: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _log10_density(d: float | None) -> float | None:
    return math.log10(d + _LOG_EPS) if d is not None and d >= 0 else None


def _contexts(table: Any, feature: int, snippets: SnippetMaker) -> list[dict[str, Any]] | None:
    if table is None:
        return None
    out = []
    values, contexts, positions = table.values, table.contexts, table.positions
    for j in range(values.shape[1]):
        c = int(contexts[feature, j])
        if c < 0:  # unused slots are at the end of a row
            break
        p = int(positions[feature, j])
        out.append({"value": _num(values[feature, j]), **snippets.snippet(c, p)})
    return out


def _promoted(
    promoted: Mapping[int, Sequence[tuple[int, float]]] | None, feature: int, snippets: SnippetMaker
) -> list[dict[str, Any]] | None:
    if promoted is None or feature not in promoted:
        return None
    return [
        {"token_id": int(t), "token": snippets.token_text(int(t)), "value": _num(v)} for t, v in promoted[feature]
    ]


def feature_card(
    feature: int,
    vectors: Mapping[str, Any],
    top_k: Mapping[str, Any],
    promoted: Mapping[str, Mapping[int, Sequence[tuple[int, float]]] | None],
    snippets: SnippetMaker,
    label: str | None = None,
    watched: bool = False,
    lists: Sequence[str] = (),
) -> dict[str, Any]:
    """One feature's card (see the module docstring)."""

    def vec(key: str) -> float | None:
        arr = vectors.get(key)
        return _num(arr[feature]) if arr is not None else None

    dens_b, dens_f = vec("density_base"), vec("density_finetune")
    lb, lf = _log10_density(dens_b), _log10_density(dens_f)
    regular = lb is not None and lf is not None and all(_REGULAR[0] <= x <= _REGULAR[1] for x in (lb, lf))
    return {
        "id": int(feature),
        "label": label,
        "watched": bool(watched),
        "lists": list(lists),
        "density_base": dens_b,
        "density_finetune": dens_f,
        "log10_density_change": (lf - lb) if lb is not None and lf is not None else None,
        "regular": regular,
        "activation_similarity": vec("activation_similarity"),
        "logit_similarity": vec("logit_similarity"),
        "dead_activation_error": vec("dead_activation_error"),
        "top_contexts": {side: _contexts(top_k.get(side), feature, snippets) for side in SIDES},
        "promoted_tokens": {side: _promoted(promoted.get(side), feature, snippets) for side in SIDES},
    }


def build_features_section(
    vectors: Mapping[str, Any],
    rankings: Mapping[str, Mapping[str, Any]],
    top_k: Mapping[str, Any],
    tokens: Any,
    tokenizer: Any,
    promoted: Mapping[str, Mapping[int, Sequence[tuple[int, float]]] | None],
    watched: Iterable[tuple[int, str | None]] = (),
    window: tuple[int, int] = (DEFAULT_LEFT, DEFAULT_RIGHT),
    special_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """The ``"features"`` section of one finetune's report entry (a pure function).

    ``vectors``: the finetune's per-feature arrays (FEATURE_VECTOR_KEYS, length d_sae).
    ``rankings``: ``rank_features(vectors, n)``. ``top_k``: ``{"base": table,
    "finetune": table}`` (a missing or None table gives null contexts). ``tokens``: the
    run's token tensor [contexts, T]; ``tokenizer``: the base tokenizer (or None).
    ``promoted``: ``{"base": promoted_tokens(W_dec, W_U_base, ids), "finetune": ...}``
    for at least the ids the section lists (:func:`listed_ids`). ``watched``: (id,
    label) pairs. ``window``: tokens of text left and right of each context.
    Raises ``IndexError`` for a watched id outside ``[0, d_sae)``.
    """
    d_sae = int(len(vectors["density_base"]))
    watch = [(int(i), label) for i, label in watched]
    bad = sorted({i for i, _ in watch if not 0 <= i < d_sae})
    if bad:
        raise IndexError(f"watched feature ids {bad} are outside this SAE's [0, {d_sae})")
    snippets = SnippetMaker(tokens, tokenizer, left=window[0], right=window[1], special_ids=special_ids)
    on_lists: dict[int, list[str]] = {}
    lists_out: dict[str, dict[str, Any]] = {}
    for name, ranking in rankings.items():
        lists_out[name] = {key: (list(map(int, v)) if key == "ids" else v) for key, v in ranking.items()}
        for i in lists_out[name]["ids"]:
            on_lists.setdefault(i, []).append(name)
    labels: dict[int, str | None] = {}
    for i, label in watch:
        if labels.get(i) is None:
            labels[i] = label
    cards = {
        str(i): feature_card(i, vectors, top_k, promoted, snippets, labels.get(i), i in labels, on_lists.get(i, ()))
        for i in sorted(set(on_lists) | set(labels))
    }
    k_values = [t.values.shape[1] for t in (top_k.get(side) for side in SIDES) if t is not None]
    return {
        "version": SECTION_VERSION,
        "d_sae": d_sae,
        "top_k": max(k_values) if k_values else None,
        "window": {"left": int(window[0]), "right": int(window[1])},
        "lists": lists_out,
        "watched": [{"id": i, "label": labels[i]} for i in labels],
        "cards": cards,
    }


def listed_ids(rankings: Mapping[str, Mapping[str, Any]], watched: Iterable[tuple[int, str | None]] = ()) -> list[int]:
    """The ids a section built from these inputs will hold cards for, ascending: the ids
    whose promoted tokens must be computed before :func:`build_features_section`."""
    ids = {int(i) for r in rankings.values() for i in r.get("ids", ())}
    ids.update(int(i) for i, _ in watched)
    return sorted(ids)
