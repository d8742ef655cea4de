"""Shared fixtures of the reliability suite: tiny checkpoints built once, and plugin runners.

Every plugin run uses the same small configuration: a 2-layer, width-32 GPT-2 base,
an SAE at ``blocks.1.hook_resid_post`` with 64 features, and 256 tokens (16 contexts
of 16). Runs go through ``pytest.main`` in this process (see rel_runner.py) unless
the behaviour needs a process boundary.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

import pytest
from rel_fixtures import build
from rel_runner import Run, offline_single_thread, plugin_args, run_inprocess


@pytest.fixture(scope="session", autouse=True)
def _offline_env() -> Any:
    """No hub access here: fail fast instead of waiting on the network. One intra-op thread,
    in this process and in the subprocesses (rel_runner.env_for_subprocess): kind to a shared
    machine, and the same float summation order everywhere, so cross-process runs compare bit
    for bit."""
    with offline_single_thread():
        yield


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory, _offline_env: Any) -> dict[str, Any]:
    """Paths of the tiny checkpoints, SAEs, datasets and profiles (built once per session)."""
    return build(tmp_path_factory.mktemp("fx"))


@pytest.fixture
def run_plugin(tmp_path: Path) -> Callable[..., Run]:
    """``run_plugin(*args)``: pytest with the plugin, in a fresh directory, in this process."""
    counter = itertools.count()

    def run(*args: str, cwd: Path | None = None) -> Run:
        return run_inprocess(cwd or tmp_path / f"run{next(counter)}", *args)

    return run


@pytest.fixture(scope="session")
def canonical(fx: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The standard run on the base, ``ft`` and ``ft2``, uncached: the numbers the other tests compare with."""
    run = run_inprocess(tmp_path_factory.mktemp("canonical"), *plugin_args(fx, finetunes=("ft", "ft2")))
    assert run.ret == 0, run.text
    return run
