#!/usr/bin/env python
"""A sample page of feature cards from a real zoo run (toy-base -> a finetune on toy-eval),
to look at in a browser before the HTML report embeds the cards.

    python scripts/feature_cards_sample.py --finetune toy-code --out /tmp/cards.html
    chromium --headless --no-sandbox --disable-gpu --screenshot=/tmp/cards.png \\
             --window-size=1400,2000 file:///tmp/cards.html

Writes the page, the section as JSON (``.json`` beside it) and the markdown table (``.md``).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

#: The watchlist the sample shows (features that keep their meaning on toy-prose, not on toy-code).
WATCHED = ((289, "class/module noun"), (556, "'and' conjunction"), (204, "paragraph break"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--finetune", default="toy-code")
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--dataset", default="toy-eval")
    ap.add_argument("--out", default="/tmp/cards.html")
    args = ap.parse_args()

    from feature_zoo import run_features

    from pytest_sae_transfer.render.cards import CARDS_CSS, feature_cards_html, features_markdown
    from pytest_sae_transfer.thresholds.watchlist import (
        Watchlist,
        WatchedFeature,
        evaluate_watchlist,
        evaluated_tokens,
    )

    run = run_features(args.finetune, watched=WATCHED, n_contexts=args.contexts, dataset=args.dataset)
    report, section = run["report"], run["section"]
    watch = Watchlist(features=tuple(WatchedFeature(i, label) for i, label in WATCHED),
                      defaults=(("min_activation_similarity", 0.8), ("must_stay_alive", True)))
    checks = evaluate_watchlist(watch, run["vectors"], evaluated_tokens(report.base.metrics),
                                evaluated_tokens(report.finetune(args.finetune).metrics))
    cards = feature_cards_html(section, base_name="toy-base", finetune_name=args.finetune, checks=checks,
                               anchor_prefix=args.finetune)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>feature cards sample</title>'
        "<style>body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 1.5em 2em;"
        " background: #fafafa; color: #222; max-width: 1400px; }</style>"
        f"<style>{CARDS_CSS}</style></head><body>"
        f"<h1>Feature cards: toy-base → {html.escape(args.finetune)} ({html.escape(args.dataset)}, "
        f"{args.contexts} contexts)</h1>{cards}</body></html>\n"
    )
    out = Path(args.out)
    out.write_text(page, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(section, indent=1, allow_nan=False), encoding="utf-8")
    out.with_suffix(".md").write_text(features_markdown(section, args.finetune), encoding="utf-8")
    print(out)


if __name__ == "__main__":
    main()
