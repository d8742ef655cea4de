"""On-disk cache of engine results, safe for concurrent processes.

An entry is a directory ``<root>/<key>/`` holding ``result.json`` and
``arrays.npz``. It is written into a temporary directory beside it and renamed
into place, so a reader sees a whole entry or none: a run killed half-way leaves
at most a stray ``.tmp-*`` directory, which is never read and is swept later.
Computing an entry is guarded by an exclusive file lock, so two processes (or
xdist workers) that need the same entry compute it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..loading import LoadError

CACHE_FORMAT = "1"


def cache_key(parts: Mapping[str, Any]) -> str:
    """A stable hash of everything that determines a result."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ResultCache:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _entry(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are hex digests; got {key!r}")  # keeps paths inside root
        return self.root / key

    def get(self, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(json payload, numpy arrays) for a complete entry, else None."""
        entry = self._entry(key)
        result = entry / "result.json"
        arrays = entry / "arrays.npz"
        if not (result.is_file() and arrays.is_file()):
            return None
        import numpy as np

        try:
            payload = json.loads(result.read_text(encoding="utf-8"))
            with np.load(arrays, allow_pickle=False) as data:
                loaded = {name: data[name] for name in data.files}
        except (OSError, ValueError, json.JSONDecodeError):
            return None  # unreadable entries are recomputed, never trusted
        if payload.get("cache_format") != CACHE_FORMAT:
            return None
        return payload, loaded

    def put(self, key: str, payload: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
        import numpy as np

        entry = self._entry(key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root))
        try:
            with open(tmp / "result.json", "w", encoding="utf-8") as fh:
                json.dump({"cache_format": CACHE_FORMAT, **payload}, fh, allow_nan=True)
                fh.flush()
                os.fsync(fh.fileno())
            with open(tmp / "arrays.npz", "wb") as fh:
                np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
                fh.flush()
                os.fsync(fh.fileno())
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            try:
                os.rename(tmp, entry)
            except OSError:
                # Another process finished the same entry first; theirs is as good as ours.
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = 6 * 3600) -> Iterator[None]:
        """An exclusive inter-process lock for computing ``key``."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{self._entry(key).name}.lock"
        with open(path, "a+") as fh:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - Windows: no cross-process lock
                yield
                return
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"waited {timeout:.0f}s for the cache lock {path}") from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def sweep(self, older_than: float = 3600.0) -> int:
        """Remove temporary directories left by killed runs; returns how many."""
        removed = 0
        if not self.root.is_dir():
            return 0
        now = time.time()
        for tmp in self.root.glob(".tmp-*"):
            try:
                if now - tmp.stat().st_mtime > older_than:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
            except OSError:
                continue
        return removed


class MemoryOnlyCache:
    """--sae-no-cache outside xdist: nothing is read or written."""

    def get(self, key: str) -> None:
        return None

    def put(self, key: str, payload: Any, arrays: Any) -> None:
        return None

    @contextlib.contextmanager
    def lock(self, key: str):
        yield


def check_writable(root: Path) -> None:
    """The cache directory must take lock files and entries: say so up front, not as a crash later."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise LoadError(
            f"the result cache directory {str(root)!r} cannot be written ({exc}); "
            "pass a writable directory with --sae-cache-dir, or --sae-no-cache"
        ) from None

