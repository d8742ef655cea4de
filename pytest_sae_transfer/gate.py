"""The built-in gate: one test item per (finetune, SAE, check).

Items are created from the threshold profile and the SAEs' names alone, so
collection needs no model. An item's id reads ``toy-code::finetune.ce_loss_delta<=0.5``
with one SAE, and ``toy-code::blocks.2.hook_resid_post::finetune.ce_loss_delta<=0.5``
when the run gates several (``-k blocks.2`` then selects an SAE).
"""

from __future__ import annotations

import json
import re
import warnings
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
        # Under xdist --dist loadgroup (which the plugin sets for plain -n), one worker owns
        # each finetune's items. xdist reads the group from a "@group" nodeid suffix; its own
        # rewrite of xdist_group marks runs before these items exist, so it is applied here.
        group = f"@sae-transfer-{self.finetune}" if getattr(self.config.option, "loadgroup", False) else ""
        several = len(self.sae_keys) > 1
        for sae_key in self.sae_keys:
            for check_id, metric, severity in self.planned:
                name = f"{sae_key}::{_item_name(check_id)}" if several else _item_name(check_id)
                items.append(GateItem.from_parent(self, name=name, nodeid=f"{self.nodeid}::{name}{group}", finetune=self.finetune,
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
            warnings.warn(SAETransferWarning(f"{self.finetune}: {check.message}"), stacklevel=1)
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


def gate_items(session: pytest.Session, finetunes: tuple[str, ...], sae_keys: list[str], profile: Profile) -> list[pytest.Item]:
    """Every (finetune, SAE)'s gate items, from the profile's planned checks."""
    planned = planned_checks(profile)
    config = session.config
    # Rooted at the invocation directory, so pytest shows "toy-code::..." wherever it runs
    # (it prints nodeids relative to the working directory, not to the rootdir).
    try:
        here = config.invocation_params.dir.resolve().relative_to(config.rootpath.resolve()).as_posix()
    except ValueError:
        here = "."
    prefix = "" if here == "." else here + "/"
    items: list[pytest.Item] = []
    for finetune in finetunes:
        collector = GateCollector.from_parent(session, name=finetune, nodeid=prefix + finetune, finetune=finetune,
                                              sae_keys=sae_keys, planned=planned)
        items.extend(collector.collect())
    return items
