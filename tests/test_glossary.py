"""The metric glossary and the metric documentation cover every metric key, so that
neither can fall behind ``metrics/keys.py``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pytest_sae_transfer.metrics import keys
from pytest_sae_transfer.render.glossary import GLOSSARY, define

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "metrics.md"
GLOSSARY_FILE = REPO / "pytest_sae_transfer" / "render" / "glossary.py"
METRICS_DIR = REPO / "pytest_sae_transfer" / "metrics"


def key_tuples() -> dict[str, tuple[str, ...]]:
    """Every ``*_KEYS`` tuple of strings in ``metrics/keys.py``, found by name: a tuple
    added there later is covered without touching this test."""
    return {
        name: value
        for name, value in vars(keys).items()
        if name.endswith("_KEYS") and isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    }


def all_keys() -> list[str]:
    return sorted({key for values in key_tuples().values() for key in values})


def test_the_key_lists_are_found() -> None:
    found = key_tuples()
    for name in ("MODEL_METRIC_KEYS", "PAIRED_METRIC_KEYS", "PAIRED_EXTRA_KEYS", "FEATURE_VECTOR_KEYS"):
        assert name in found, name


@pytest.mark.parametrize("key", all_keys())
def test_every_metric_key_has_a_definition(key: str) -> None:
    assert define(key) == GLOSSARY.get(key) and GLOSSARY.get(key), f"{key!r} has no glossary entry"


def test_definitions_are_short_single_lines() -> None:
    bad = {k: v for k, v in GLOSSARY.items() if not v.strip() or "\n" in v or len(v) > 120}
    assert not bad, bad


def test_no_stale_glossary_entry() -> None:
    """A key beyond keys.py must still be one the metrics write (a report-only count)."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in METRICS_DIR.glob("*.py"))
    stale = [k for k in GLOSSARY if k not in all_keys() and f'"{k}"' not in source]
    assert not stale, stale


@pytest.mark.parametrize("key", sorted(set(all_keys()) | set(GLOSSARY)))
def test_every_metric_key_is_documented(key: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    assert re.search(rf"`{re.escape(key)}`", text), f"docs/metrics.md does not mention `{key}`"


def test_define_reads_scoped_names_and_rejects_unknown_ones() -> None:
    assert define("finetune.ce_loss_delta") == GLOSSARY["ce_loss_delta"]
    assert define("paired.feature_transfer_rate") == GLOSSARY["feature_transfer_rate"]
    assert define("no_such_metric") is None
    assert define("paired.no_such_metric") is None


def test_glossary_imports_nothing_from_the_package() -> None:
    tree = ast.parse(GLOSSARY_FILE.read_text(encoding="utf-8"))
    imported = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.module != "__future__")
    ]
    assert not imported, f"glossary.py must import nothing (the HTML renderer reads it standalone): {imported}"
