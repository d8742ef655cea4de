"""Sequential mode (base alone with a disk spill, then each finetune alone) gives the
numbers of the simultaneous pass, and only ever holds one finetune."""

from __future__ import annotations

import math

from helpers import random_tokens, tiny_pair, tiny_sae


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_sequential_matches_simultaneous() -> None:
    from pytest_sae_transfer.engine import EngineOptions, run_transfer

    base, ft = tiny_pair(seed=4)
    _, far = tiny_pair(seed=4, noise=0.3)
    sae = tiny_sae()
    toks = random_tokens(12, 16, seed=4)
    opts = EngineOptions(batch_size=5, special_token_ids=(0,), n_bootstrap=100)
    together = run_transfer(base, {"ft": ft, "far": far}, sae, toks, opts).report

    loaded: list[str] = []

    def loader(name, model):
        def load():
            loaded.append(name)
            return model
        return load

    seq_opts = EngineOptions(batch_size=5, special_token_ids=(0,), n_bootstrap=100, sequential=True)
    alone = run_transfer(base, {"ft": loader("ft", ft), "far": loader("far", far)}, sae, toks, seq_opts).report
    assert loaded == ["ft", "far"]  # each finetune is materialised once, one after the other
    assert alone.config["sequential"] is True and together.config["sequential"] is False
    _close(together.base.metrics, alone.base.metrics)
    for a, b in zip(together.finetunes, alone.finetunes):
        _close(a.metrics, b.metrics, a.model)
        _close(a.paired, b.paired, a.model)
        _close(a.ci95, b.ci95, a.model)
        _close(a.paired_ci95, b.paired_ci95, a.model)
    assert together.finetune("far").paired["resid_cosine_mean"] < together.finetune("ft").paired["resid_cosine_mean"]
