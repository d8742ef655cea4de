"""The built-in gate: one test item per (finetune, SAE, check).

Items are created from the threshold profile and the SAEs' names alone, so
collection needs no model. An item's id reads ``toy-code::finetune.ce_loss_delta<=0.5``
with one SAE, and ``toy-code::blocks.2.hook_resid_post::finetune.ce_loss_delta<=0.5``
when the run gates several (``-k blocks.2`` then selects an SAE). ``toy-code`` is the
finetune's label (``--finetune LABEL=MODEL``, or a path's directory name).

Each finetune is a collector the session collects like any other (so pytest counts,
deselects and lists its items as it does test files'), and ids are the same with and
without xdist. A warn-severity check that does not hold is a warning located at its
table in the threshold file, not at a line of this module.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from .errors import InputError
from .report import CheckResult, TransferReport
from .state import STATE_KEY
from .thresholds import Profile, planned_checks

SKIP_NO_FINETUNE = "no finetune configured: pass --finetune (with --sae-release or --sae-path), or mark the test with @pytest.mark.sae_transfer(release=..., finetune=...)"


class SAETransferWarning(UserWarning):
    """A warn-severity check did not hold."""


class GateFailure(Exception):
    """A fail-severity check did not hold; shown as its one-line message."""


class GateCollector(pytest.Collector):
    """All checks for one finetune."""

    def __init__(self, *, finetune: str, sae_keys: list[str], planned: list[tuple[str, str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.finetune = finetune
        self.sae_keys = sae_keys
        self.planned = planned

    def collect(self) -> list[pytest.Item]:
        items = []
        several = len(self.sae_keys) > 1
        for sae_key in self.sae_keys:
            for check_id, metric, severity in self.planned:
                name = f"{sae_key}::{_item_name(check_id)}" if several else _item_name(check_id)
                items.append(GateItem.from_parent(self, name=name, nodeid=f"{self.nodeid}::{name}", finetune=self.finetune,
                                                  sae_key=sae_key, check_id=check_id, metric=metric, severity=severity))
        return items

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"sae-transfer gate for {self.finetune}"


class GateItem(pytest.Item):
    def __init__(self, *, finetune: str, sae_key: str, check_id: str, metric: str, severity: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.finetune = finetune
        self.sae_key = sae_key
        self.check_id = check_id
        self.metric = metric
        self.severity = severity

    def runtest(self) -> None:
        report = self.config.stash[STATE_KEY].gate_report(self.finetune)
        check = _find_check(report.sae(self.sae_key), self.finetune, self.check_id)
        for key, value in _properties(check).items():
            self.user_properties.append((key, value))
        if check.passed:
            return
        if check.severity == "warn":
            filename, lineno = check_location(self.config.stash[STATE_KEY].profile, self.metric)
            warnings.warn_explicit(SAETransferWarning(f"{self.finetune}: {check.message}"), SAETransferWarning, filename, lineno)
            return
        raise GateFailure(check.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, (GateFailure, InputError)):
            several = len(getattr(self.parent, "sae_keys", ())) > 1
            return f"{self.finetune} @ {self.sae_key}: {excinfo.value}" if several else f"{self.finetune}: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        # Not a suffix of the nodeid: pytest would rewrite its dots as "::" for display.
        return self.path, None, f"sae-transfer check {self.check_id} of {self.finetune} with {self.sae_key}"


_WATCHED = re.compile(r"^feature\[(?P<which>[^\]]*)\]\.(?P<rest>.*)$")


def _item_name(check_id: str) -> str:
    """A check id as a pytest item name. pytest reads ``[...]`` in a node id as its
    parameters, so a watched feature's ``feature[311 'def'].stays_alive`` becomes
    ``feature.stays_alive[311 'def']``: a parametrized-looking item, shown intact."""
    match = _WATCHED.match(check_id)
    return f"feature.{match['rest']}[{match['which']}]" if match else check_id


def _find_check(report: TransferReport, finetune: str, check_id: str) -> CheckResult:
    for check in report.finetune(finetune).checks:
        if check.id == check_id:
            return check
    raise InputError(f"check {check_id!r} was not evaluated for {finetune!r}")


def _properties(check: CheckResult) -> dict[str, Any]:
    props: dict[str, Any] = {"sae_check": check.id, "sae_metric": check.metric, "sae_value": check.value,
                             "sae_bound": check.bound, "sae_passed": check.passed, "sae_severity": check.severity}
    if check.base_value is not None:
        props["sae_base_value"] = check.base_value
    if check.ci95 is not None:
        props["sae_ci95"] = json.dumps(list(check.ci95))
    return props


def check_location(profile: Profile | None, metric: str) -> tuple[str, int]:
    """Where a check is written: its ``[scope.metric]`` table in the threshold file it came from
    (shown relative to the working directory when it is under it)."""
    spec = profile.check(metric) if profile is not None else None
    source = (spec.source if spec is not None and spec.source else None) or (profile.path if profile is not None else None)
    if not source:
        return f"<threshold profile: {metric}>", 1
    lineno = 1
    try:
        for i, line in enumerate(Path(source).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip().replace(" ", "").startswith(f"[{metric}]"):
                lineno = i
                break
    except OSError:
        pass
    try:
        shown = os.path.relpath(source)
        source = shown if not shown.startswith("..") else source
    except ValueError:
        pass
    return source, lineno


def gate_collectors(session: pytest.Session, finetunes: tuple[str, ...], sae_keys: list[str], profile: Profile) -> list[GateCollector]:
    """One collector per finetune, holding its (SAE, check) items, from the profile's planned checks."""
    planned = planned_checks(profile)
    prefix = nodeid_prefix(session.config)
    return [GateCollector.from_parent(session, name=finetune, nodeid=prefix + finetune, finetune=finetune,
                                      sae_keys=sae_keys, planned=planned) for finetune in finetunes]


def nodeid_prefix(config: pytest.Config) -> str:
    """Gate nodeids are rooted at the invocation directory, so pytest shows "toy-code::..."
    wherever it runs (it prints nodeids relative to the working directory, not to the rootdir)."""
    try:
        here = config.invocation_params.dir.resolve().relative_to(config.rootpath.resolve()).as_posix()
    except ValueError:
        here = "."
    return "" if here == "." else here + "/"


def planned_ids(finetunes: tuple[str, ...], sae_keys: list[str], profile: Profile) -> set[tuple[str, str, str]]:
    """(finetune, SAE key, check id) of every gate item the run collects."""
    planned = planned_checks(profile)
    return {(ft, key, check_id) for ft in finetunes for key in sae_keys for check_id, _, _ in planned}


def finetune_scheduler(config: pytest.Config, log: Any, scopes: set[str]) -> Any:
    """xdist's ``--dist load``, except that one worker runs all of a finetune's gate items.

    A finetune's items share one evaluation: on one worker it runs once, beside the other
    workers' finetunes. ``scopes`` are the finetune collectors' nodeids; every other test is
    its own scope (as under ``load``). Nodeids are left as they are, so ``-n`` changes no id.
    """
    from xdist.scheduler import LoadScopeScheduling

    class FinetuneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            head = nodeid.split("::", 1)[0]
            return head if head in scopes else nodeid

    return FinetuneScheduling(config, log)
