"""Concurrency: runs sharing one cache directory never corrupt it and agree to the bit.

Two pytest processes start at the same moment on an empty cache: one serial, one
with two xdist workers. Between them four processes race for the same three cache
entries (the base, and the two finetune pairs).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from rel_runner import Run, env_for_subprocess, finish, plugin_args, results_only, start_subprocess

from pytest_sae_transfer.session.cache import ResultCache

FINETUNES = ("ft", "ft2")


@pytest.fixture(scope="module")
def racing_runs(fx: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Run, Path]:
    root = tmp_path_factory.mktemp("race")
    cache = root / "cache"
    scratch = root / "tmp"  # TMPDIR of both runs: what they leave there is checked below
    scratch.mkdir()
    env = env_for_subprocess({"TMPDIR": str(scratch)})
    args = plugin_args(fx, finetunes=FINETUNES, cache=str(cache))
    serial = start_subprocess(root / "serial", *args, env=env)
    xdist = start_subprocess(root / "xdist", *args, "-n", "2", env=env)
    return finish(serial, root / "serial"), finish(xdist, root / "xdist"), cache


def test_both_runs_pass_cleanly(racing_runs: tuple[Run, Run, Path]) -> None:
    for run in racing_runs[:2]:
        assert run.ret == 0, run.text
        assert "Traceback" not in run.text and "INTERNALERROR" not in run.text


def test_reports_are_identical_to_each_other_and_to_a_lone_run(racing_runs: tuple[Run, Run, Path], canonical: Run) -> None:
    serial, xdist, _ = racing_runs
    a, b = results_only(serial.report()), results_only(xdist.report())
    assert a == b
    assert a == results_only(canonical.report())  # another process, another run: the same bits


def test_the_shared_cache_is_whole(racing_runs: tuple[Run, Run, Path]) -> None:
    cache = racing_runs[2]
    names = sorted(p.name for p in cache.iterdir())
    entries = [n for n in names if not n.endswith(".lock")]
    assert len(entries) == 3, names  # base + two pairs, no temporaries left behind
    store = ResultCache(cache)
    for name in entries:
        assert re.fullmatch(r"[0-9a-f]{32}", name), name
        assert store.get(name) is not None, f"entry {name} is partial or unreadable"


def test_each_result_was_computed_once(racing_runs: tuple[Run, Run, Path], fx: dict[str, Any]) -> None:
    """The file locks make the four processes compute each entry once between them; the
    others read it back."""
    serial, xdist, _ = racing_runs
    config = xdist.report()["config"]
    provenances = [serial.report()["config"]["provenance"]]
    provenances += config.get("provenance_by_worker") or [config["provenance"]]
    for key in ("base", *FINETUNES):  # finetunes given by path are named by their directory
        computed = [p[key] for p in provenances if p.get(key) == "computed"]
        assert len(computed) == 1, (key, provenances)


def test_no_scratch_files_are_left_behind(racing_runs: tuple[Run, Run, Path]) -> None:
    """xdist workers hand their reports to the controller through temporary directories."""
    scratch = racing_runs[2].parent / "tmp"
    left = sorted(p.name for p in scratch.iterdir() if not p.name.startswith("pytest-of-"))  # pytest's own basetemp
    assert left == []
