"""Resource faults: out of memory, full disks and killed runs lose nothing and poison nothing."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rel_runner import assert_numbers_close, env_for_subprocess, plugin_args, results_only, start_subprocess

from pytest_sae_transfer.engine import ModelRunner
from pytest_sae_transfer.session.cache import ResultCache


def _inject_oom(monkeypatch: pytest.MonkeyPatch, max_batch: int) -> list[int]:
    """Make the engine's forward pass raise CUDA's out-of-memory error above ``max_batch`` contexts."""
    seen: list[int] = []
    real = ModelRunner.capture

    def capture(self: Any, tokens: torch.Tensor, layers: Any) -> Any:
        seen.append(int(tokens.shape[0]))
        if tokens.shape[0] > max_batch:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB (batch of {tokens.shape[0]})")
        return real(self, tokens, layers)

    monkeypatch.setattr(ModelRunner, "capture", capture)
    return seen


def test_oom_halves_the_batch_retries_and_says_so(fx: dict[str, Any], run_plugin: Any, canonical: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _inject_oom(monkeypatch, max_batch=2)
    run = run_plugin(*plugin_args(fx, finetunes=("ft", "ft2"), sae_batch_size="8"))
    assert run.ret == 0, run.text
    assert seen[:3] == [8, 4, 2], seen
    config = run.report()["config"]
    assert config["batch_size"] == 8 and config["final_batch_size"] == 2 and config["oom_batch_splits"] == 2, config
    assert any("out of memory at batch size 8" in n and "batch size 2" in n for n in config["notes"]), config["notes"]
    assert "out of memory at batch size 8" in run.text  # the terminal summary shows the note
    # nothing of a failed batch was counted twice or lost
    assert_numbers_close(results_only(canonical.report()), results_only(run.report()))


def test_oom_at_batch_size_one_is_a_clear_error(fx: dict[str, Any], run_plugin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _inject_oom(monkeypatch, max_batch=0)
    run = run_plugin(*plugin_args(fx, sae_batch_size="4"))
    run.assert_clean_usage_error("out of memory even at batch size 1", "started at 4, halved 2 time(s)", "--sae-sequential")


def _fail_writes_under(monkeypatch: pytest.MonkeyPatch, directory: Path, name: str = r".*") -> list[str]:
    """A full disk under ``directory``: fsync of a file there whose name matches ``name`` raises
    ENOSPC (the last step before a rename, where a real full disk reports itself)."""
    hits: list[str] = []
    real = os.fsync
    root = str(directory.resolve())

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(root + os.sep) and re.fullmatch(name, os.path.basename(target)):
            hits.append(target)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hits


@pytest.mark.parametrize("fault", ["full-disk", "read-only-directory"])
def test_failed_report_write_keeps_the_previous_report(fault: str, fx: dict[str, Any], run_plugin: Any, canonical: Any,
                                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("r.json", "r.features.npz"):
        shutil.copy(canonical.cwd / name, out / name)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if fault == "full-disk":
        # The disk fills up at the last file, the JSON report: its sidecar was written already.
        # The new run (one finetune) has a different sidecar from the old report's (two
        # finetunes), so a new sidecar beside the old report would show.
        hits = _fail_writes_under(monkeypatch, out, name=r"\.r\.json\..*\.tmp")
        reason = "No space left on device"
    else:
        if os.geteuid() == 0:
            pytest.skip("running as root: a read-only directory does not stop root (the full-disk case covers this)")
        out.chmod(0o555)
        hits = ["chmod"]
        reason = "Permission denied"
    try:
        run = run_plugin(*plugin_args(fx, sae_report=str(out / "r.json")))
    finally:
        out.chmod(0o755)
    assert hits, "the simulated fault was never hit"
    # the gate passed, but the run must not look green without its report
    assert run.ret == pytest.ExitCode.USAGE_ERROR, run.text
    assert "could not write the sae-transfer report" in run.text and reason in run.text
    assert "earlier report at that path is intact" in run.text
    assert "Traceback" not in run.text and "INTERNALERROR" not in run.text
    # the previous report and the sidecar it names are untouched, and no temporary file is left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_failed_cache_write_is_a_note_not_a_failure(fx: dict[str, Any], run_plugin: Any, canonical: Any,
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    hits = _fail_writes_under(monkeypatch, cache)
    run = run_plugin(*plugin_args(fx, finetunes=("ft", "ft2"), cache=str(cache)))
    assert hits, "the simulated full disk was never hit"
    assert run.ret == 0, run.text
    report = run.report()
    assert any("could not write the result cache" in n and "No space left on device" in n for n in report["config"]["notes"])
    assert results_only(report) == results_only(canonical.report())
    # nothing half-written is left to be read later
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


# -- SIGKILL -------------------------------------------------------------------------------

HANG_CONFTEST = '''
"""Hang (for the test to SIGKILL us) at the first fsync of a file whose path matches a pattern."""
import os, re, time
from pathlib import Path

_pattern = os.environ.get("SAE_REL_HANG_PATTERN")
if _pattern:
    _real_fsync = os.fsync

    def _fsync(fd):
        _real_fsync(fd)
        target = os.readlink(f"/proc/self/fd/{fd}")
        if re.search(_pattern, target):
            Path(os.environ["SAE_REL_READY"]).write_text(target)
            time.sleep(600)

    os.fsync = _fsync
'''


def _run_until_hang_then_kill(cwd: Path, args: list[str], pattern: str, timeout: float = 300) -> str:
    """Start the plugin in a subprocess, wait until it hangs at ``pattern``, SIGKILL its process group."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "conftest.py").write_text(HANG_CONFTEST, encoding="utf-8")
    ready = cwd / "hung-at"
    ready.unlink(missing_ok=True)
    proc = start_subprocess(cwd, *args, env=env_for_subprocess({"SAE_REL_HANG_PATTERN": pattern, "SAE_REL_READY": str(ready)}))
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the run ended (exit {proc.returncode}) before reaching {pattern!r}:\n{out}\n{err}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not reach {pattern!r} within {timeout}s")
            time.sleep(0.1)
        time.sleep(0.2)  # let the write of the marker settle; the process is asleep in fsync
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return ready.read_text()


def _complete_entries(cache: Path) -> dict[str, Any]:
    """Cache entries (directories that are not temporaries) -> their loaded content; fails on a partial one."""
    store = ResultCache(cache)
    entries = {}
    for p in cache.iterdir():
        if p.is_dir() and not p.name.startswith(".tmp-"):
            loaded = store.get(p.name)
            assert loaded is not None, f"partial or unreadable cache entry {p}: {sorted(q.name for q in p.iterdir())}"
            entries[p.name] = loaded
    return entries


def test_sigkill_leaves_no_partial_cache_entry_or_truncated_report(fx: dict[str, Any], run_plugin: Any, canonical: Any,
                                                                    tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    work = tmp_path / "work"
    work.mkdir()
    for name in ("r.json", "r.features.npz"):  # an earlier report, as a CI workspace would hold
        shutil.copy(canonical.cwd / name, work / name)
    previous = {name: (work / name).read_bytes() for name in ("r.json", "r.features.npz")}
    args = plugin_args(fx, cache=str(cache))

    # 1. Killed while storing its first result: result.json is written, arrays.npz is being synced.
    hung = _run_until_hang_then_kill(work, args, r"/\.tmp-[0-9a-f]+-[^/]*/arrays\.npz$")
    assert str(cache) in hung
    assert _complete_entries(cache) == {}, "a killed run left a cache entry"
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")], "expected the killed run's scratch directory"
    assert {name: (work / name).read_bytes() for name in previous} == previous

    # 2. The next run ignores the debris, recomputes, and gets the same numbers.
    (work / "conftest.py").unlink()
    rerun = run_plugin(*args, cwd=work)
    assert rerun.ret == 0, rerun.text
    report = rerun.report()
    assert set(report["config"]["provenance"].values()) == {"computed"}
    expected = results_only(canonical.report())
    expected["finetunes"] = [ft for ft in expected["finetunes"] if ft["model"] == "ft"]  # named by its directory
    assert results_only(report) == expected
    assert len(_complete_entries(cache)) == 2  # base + pair

    # 3. Killed while writing the report (from the cache this time), after its sidecar was
    #    written: the old report and its sidecar stay whole (the old ones cover two finetunes,
    #    so a new one-finetune sidecar would show); only hidden temporary files are left.
    for name in previous:
        (work / name).write_bytes(previous[name])
    hung = _run_until_hang_then_kill(work, args, r"/\.r\.json\.[^/]*\.tmp$")
    assert hung.startswith(str(work))
    assert {name: (work / name).read_bytes() for name in previous} == previous
    json.loads((work / "r.json").read_text())  # whole, parseable
    with np.load(work / "r.features.npz") as data:
        assert data.files
    leftovers = {p.name for p in work.iterdir()} - set(previous) - {"conftest.py", "hung-at", "__pycache__"}
    assert all(re.fullmatch(r"\.r\.(json|features\.npz)\.[^/]*\.tmp", name) for name in leftovers), leftovers
    assert len(_complete_entries(cache)) == 2
