"""Determinism: the same inputs and seed give the same report, to the bit, on CPU.

Across processes see test_rel_concurrency.py (two other processes, and xdist
workers, reproduce the in-process numbers exactly).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from rel_runner import assert_numbers_close, comparable, plugin_args

from pytest_sae_transfer.report import FeatureArrays


def test_same_inputs_and_seed_give_a_bit_identical_report(fx: dict[str, Any], run_plugin: Any, canonical: Any) -> None:
    again = run_plugin(*plugin_args(fx, finetunes=("ft", "ft2")))
    assert again.ret == 0, again.text
    assert comparable(again.report()) == comparable(canonical.report())
    a, b = FeatureArrays.load(canonical.cwd / "r.features.npz"), FeatureArrays.load(again.cwd / "r.features.npz")
    assert a.vectors.keys() == b.vectors.keys() and a.histograms.keys() == b.histograms.keys()
    for ft in a.vectors:
        for key in a.vectors[ft]:
            assert np.array_equal(a.vectors[ft][key], b.vectors[ft][key], equal_nan=True), (ft, key)
    for name in a.histograms:
        for part in ("edges", "counts"):
            assert np.array_equal(a.histograms[name][part], b.histograms[name][part]), (name, part)


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_batch_size_changes_results_only_within_float_tolerance(batch_size: int, fx: dict[str, Any], run_plugin: Any,
                                                                canonical: Any) -> None:
    """The canonical run uses 8 contexts per batch; 5 leaves a ragged last batch."""
    run = run_plugin(*plugin_args(fx, finetunes=("ft", "ft2"), sae_batch_size=str(batch_size)))
    assert run.ret == 0, run.text
    a, b = comparable(canonical.report()), comparable(run.report())
    assert b["config"].pop("batch_size") == batch_size and a["config"].pop("batch_size") == 8
    assert b["config"].pop("final_batch_size") == batch_size and a["config"].pop("final_batch_size") == 8
    assert a["config"] == b["config"]
    for key in ("base", "finetunes", "passed"):
        assert_numbers_close(a[key], b[key], key)
