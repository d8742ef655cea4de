"""Run the plugin through ``pytest.main`` in this process, or through a real subprocess.

In-process runs go through exactly the code a command-line run does (the plugin is
loaded from its entry point, options are parsed, the gate is collected and run), but
skip the 5-15 s it takes a fresh interpreter to import torch, transformers and
sae_lens. Subprocess runs are kept for what needs a process boundary: SIGKILL,
concurrent processes and xdist workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
from rel_fixtures import TOKENS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for helpers
from helpers import one_sae  # noqa: E402


@dataclasses.dataclass
class Run:
    ret: int
    out: str
    err: str
    cwd: Path
    seconds: float

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    def report(self, name: str = "r.json") -> dict[str, Any]:
        """The JSON report of this one-SAE run, as its SAE's entry with the run's config merged in."""
        return one_sae(json.loads((self.cwd / name).read_text(encoding="utf-8")))

    def assert_clean_usage_error(self, *needles: str) -> None:
        """Exit code 4, every needle in the output, and no traceback or INTERNALERROR."""
        __tracebackhide__ = True
        assert self.ret == pytest.ExitCode.USAGE_ERROR, f"exit {self.ret}\n{self.text}"
        for needle in needles:
            assert needle in self.text, f"{needle!r} not in:\n{self.text}"
        assert "Traceback" not in self.text, self.text
        assert "INTERNALERROR" not in self.text, self.text


def _forget_test_modules(cwd: Path) -> None:
    """Drop conftest/test modules the inner run imported from ``cwd`` (the next run has its own)."""
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None) or ""
        if path and Path(path).resolve().is_relative_to(cwd.resolve()):
            del sys.modules[name]


def run_inprocess(cwd: Path, *args: str, plugins: Sequence[Any] = ()) -> Run:
    """``pytest ARGS`` in directory ``cwd``, inside this process (output captured)."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    started = time.perf_counter()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            ret = pytest.main(["-p", "no:cacheprovider", "-p", "no:randomly", "--capture=sys", *args], plugins=list(plugins))
    finally:
        os.chdir(old)
        _forget_test_modules(cwd)
    return Run(int(ret), out.getvalue(), err.getvalue(), cwd, time.perf_counter() - started)


@contextlib.contextmanager
def offline_single_thread() -> Iterator[None]:
    """No hub access (fail fast instead of waiting on the network) and one torch intra-op
    thread, restored afterwards: kind to a shared machine, and the same float summation
    order in every run, so runs compare bit for bit."""
    import torch

    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def env_for_subprocess(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    env.pop("PYTEST_ADDOPTS", None)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def start_subprocess(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m pytest ARGS`` in ``cwd`` as its own process group (so it can be killed whole)."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *args],
        cwd=cwd, env=env or env_for_subprocess(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, cwd: Path, timeout: float = 300) -> Run:
    started = time.perf_counter()
    out, err = proc.communicate(timeout=timeout)
    return Run(proc.returncode, out, err, Path(cwd), time.perf_counter() - started)


#: Report fields that legitimately differ between identical runs.
VOLATILE_CONFIG_KEYS = frozenset({"elapsed_seconds", "tokens_per_second", "provenance", "provenance_by_worker"})


def plugin_args(fx: dict[str, Any], *, finetunes: tuple[str, ...] = ("ft",), cache: str | None = None, **overrides: Any) -> list[str]:
    """Command-line arguments of the suite's standard run; ``overrides`` map option names
    (``sae_path="..."``, ``sae_tokens="..."``) to values, None to drop the option."""
    options: dict[str, Any] = {
        "base_model": fx["base"],
        "sae_path": fx["sae"],
        "sae_dataset": fx["data"],
        "sae_tokens": str(TOKENS),
        "sae_thresholds": fx["lenient"],
        "sae_report": "r.json",
    }
    options.update(overrides)
    args: list[str] = []
    for name in finetunes:
        args += ["--finetune", fx.get(name, name)]
    for key, value in options.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    args += ["--sae-cache-dir", cache] if cache else ["--sae-no-cache"]
    return args


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """A report without the fields that differ between identical runs (timing, provenance)."""
    out = json.loads(json.dumps(report))
    for key in VOLATILE_CONFIG_KEYS:
        out["config"].pop(key, None)
    return out


def results_only(report: dict[str, Any]) -> dict[str, Any]:
    """The measured numbers and verdicts: base, finetunes (metrics, intervals, paired, checks)."""
    return {"base": report["base"], "finetunes": report["finetunes"], "passed": report["passed"]}


RTOL = 1e-5


def assert_numbers_close(a: Any, b: Any, path: str = "") -> None:
    """Same structure; numbers equal within RTOL (batch shapes change float32 summation order)."""
    __tracebackhide__ = True
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_numbers_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_numbers_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=RTOL, abs=1e-7), f"{path}: {a} vs {b}"
    elif isinstance(a, str) and path.endswith(".message"):
        pass  # check messages print the values; compared through "value" instead
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
