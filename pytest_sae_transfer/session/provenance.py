"""What the report says about how its numbers were made: package versions, and what the
engine did over the session (batch sizes after out-of-memory retries, timing)."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any, Sequence

from .. import __version__


def package_versions() -> dict[str, Any]:
    versions: dict[str, Any] = {"pytest_sae_transfer": __version__, "python": platform.python_version()}
    for mod, dist in (("torch", "torch"), ("sae_lens", "sae-lens"), ("transformer_lens", "transformer-lens"), ("transformers", "transformers")):
        try:
            versions[mod] = metadata.version(dist)  # transformer_lens has no __version__
        except metadata.PackageNotFoundError:
            versions[mod] = None
    return versions


def engine_summary(batch_size: int, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The engine's run configs of every compute in the session, summarised."""
    out: dict[str, Any] = {
        "batch_size": batch_size,
        "final_batch_size": min((r["final_batch_size"] for r in runs), default=None),
        "oom_batch_splits": sum(int(r.get("oom_batch_splits") or 0) for r in runs),
    }
    if runs:
        out["engine_version"] = runs[-1].get("engine_version")
        out["elapsed_seconds"] = round(sum(float(r.get("elapsed_seconds") or 0.0) for r in runs), 3)
        out["tokens_per_second"] = runs[-1].get("tokens_per_second")
    return out
