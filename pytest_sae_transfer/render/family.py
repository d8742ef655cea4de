"""A run of several SAEs (a release's family): per finetune, one row per SAE with its verdict
and the key transfer metrics, and the same numbers by layer for the layer profile."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from ..report import RunReport, TransferReport
from .text import finetune_verdict

_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


def as_run(report: RunReport | TransferReport) -> RunReport:
    return report if isinstance(report, RunReport) else RunReport([report])


def hook_position(hook_name: str | None) -> float | None:
    """Where a residual hook sits, in blocks: blocks.L.hook_resid_pre at L, hook_resid_post at L + 1."""
    match = _HOOK.search(hook_name or "")
    if match is None:
        return None
    return int(match.group(1)) + (1.0 if match.group(2) == "post" else 0.0)


def variant(sae_key: str, hook_name: str | None) -> str:
    """The key with its hook removed: SAEs of one variant (e.g. all "-topk" SAEs) form one line."""
    if hook_name and hook_name in sae_key:
        return sae_key.replace(hook_name, "").strip("-_/.") or "standard"
    return "standard" if hook_position(sae_key) is not None else sae_key


@dataclasses.dataclass(frozen=True)
class SAERow:
    """One (finetune, SAE): its verdict and the numbers a layer profile shows."""

    sae: str
    hook_name: str | None
    position: float | None
    variant: str
    verdict: str
    detail: str
    n_failed: int
    ce_delta_base: float | None
    ce_delta_finetune: float | None
    ev_base: float | None
    ev_finetune: float | None
    activation_similarity: float | None
    resid_cosine: float | None

    @property
    def ce_delta_increase(self) -> float | None:
        return _minus(self.ce_delta_finetune, self.ce_delta_base)

    @property
    def ev_drop(self) -> float | None:
        return _minus(self.ev_base, self.ev_finetune)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def family_rows(run: RunReport, finetune: str) -> list[SAERow]:
    """One row per SAE of the run that measured ``finetune``, ordered by hook position."""
    rows = []
    for report in run.saes:
        try:
            ft = report.finetune(finetune)
        except KeyError:
            continue
        hook = report.config.get("hook_name")
        verdict, detail = finetune_verdict(ft)
        rows.append(SAERow(
            sae=report.sae_key,
            hook_name=hook,
            position=hook_position(hook),
            variant=variant(report.sae_key, hook),
            verdict=verdict,
            detail=detail,
            n_failed=sum(1 for c in ft.checks if not c.passed and c.severity == "fail"),
            ce_delta_base=_num(report.base.metrics.get("ce_loss_delta")),
            ce_delta_finetune=_num(ft.metrics.get("ce_loss_delta")),
            ev_base=_num(report.base.metrics.get("explained_variance")),
            ev_finetune=_num(ft.metrics.get("explained_variance")),
            activation_similarity=_num(ft.paired.get("activation_similarity_mean")),
            resid_cosine=_num(ft.paired.get("resid_cosine_mean")),
        ))
    return sorted(rows, key=lambda r: (r.position if r.position is not None else math.inf, r.variant, r.sae))


def first_failing_position(rows: list[SAERow]) -> float | None:
    """The shallowest hook at which an SAE fails ("from which layer on do they break?")."""
    failing = [r.position for r in rows if r.verdict == "FAIL" and r.position is not None]
    return min(failing) if failing else None
