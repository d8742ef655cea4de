"""Files written so that a reader sees the old version or the new one, never a partial one."""

from __future__ import annotations

import glob
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Any, binary: bool = False) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``.

    ``os.replace`` is atomic on POSIX and Windows, so readers see the old file or
    the new one, never a partial one. The temporary file is removed on failure.
    """
    path = Path(path)
    tmp = stage_file(path, write, binary)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise


def stage_file(path: Path, write: Any, binary: bool = False) -> Path:
    """Write a whole, fsynced temporary file beside ``path``; removed again if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        unlink_quietly(Path(tmp))
        raise
    return Path(tmp)


#: A temporary file this old beside a report was left by a killed writer (a live
#: writer finishes within seconds), so the next write of that report removes it.
STALE_TEMP_AGE_S = 3600.0


def _sweep_stale_temps(path: Path, older_than: float = STALE_TEMP_AGE_S) -> int:
    """Remove ``.{name}.*.tmp`` files beside ``path`` left by a writer that was killed."""
    removed = 0
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

