"""The built-in gate: one test item per (finetune, check), plus the plugin's run state.

Items are created from the threshold profile alone, so collection needs no
model. Each item's id reads like ``toy-code::finetune.ce_loss_delta<=0.5``.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest

from .config import RunConfig
from .report import CheckResult, TransferReport

SKIP_NO_FINETUNE = "no finetune configured: pass --finetune (with --sae-release or --sae-path), or mark the test with @pytest.mark.sae_transfer(release=..., finetune=...)"


class SAETransferWarning(UserWarning):
    """A warn-severity check did not hold."""


class GateFailure(Exception):
    """A fail-severity check did not hold; shown as its one-line message."""


class InputError(Exception):
    """Bad input found while evaluating (after collection); shown without traceback."""


@dataclasses.dataclass
class Target:
    """What a test's fixtures point at: a configuration and (maybe) one finetune."""

    config_index: int
    finetune: str | None

    def __repr__(self) -> str:
        return self.finetune or "no-finetune"


class PluginState:
    """Session-wide state, kept in ``config.stash``."""

    def __init__(self, pytest_config: pytest.Config, run_config: RunConfig | None, profile: Any) -> None:
        self.pytest_config = pytest_config
        self.run_config = run_config
        self.profile = profile
        workerinput = getattr(pytest_config, "workerinput", None)
        self.worker_id: str | None = workerinput.get("workerid") if workerinput else None
        self.run_id: str | None = workerinput.get("testrunuid") if workerinput else (uuid.uuid4().hex if run_config and run_config.no_cache else None)
        self.configs: list[RunConfig] = []
        self.sessions: dict[int, Any] = {}
        self.gate_reports: dict[str, TransferReport] = {}
        self.final_report: TransferReport | None = None
        self.worker_payloads: list[dict[str, Any]] = []
        self.written: list[str] = []
        self.write_error: str | None = None

    @property
    def is_worker(self) -> bool:
        return self.worker_id is not None

    @property
    def is_xdist_controller(self) -> bool:
        return not self.is_worker and bool(getattr(self.pytest_config.option, "numprocesses", None)) and \
            getattr(self.pytest_config.option, "dist", "no") != "no"

    def config_index(self, config: RunConfig) -> int:
        for i, known in enumerate(self.configs):
            if known == config:
                return i
        self.configs.append(config)
        return len(self.configs) - 1

    def session(self, index: int) -> Any:
        if index not in self.sessions:
            from .session import TransferSession

            self.sessions[index] = TransferSession(
                self.configs[index], worker_id=self.worker_id, run_id=self.run_id,
                quiet_context=self.output_context, progress_stream=self.progress_stream(),
            )
        return self.sessions[index]

    def gate_session(self) -> Any:
        assert self.run_config is not None
        return self.session(self.config_index(self.run_config))

    def progress_stream(self) -> Any:
        import sys

        return None if self.is_worker else sys.__stderr__

    def output_context(self) -> Any:
        """Let progress reach the terminal while pytest captures output."""
        import contextlib

        capman = self.pytest_config.pluginmanager.getplugin("capturemanager")
        if capman is None or self.is_worker:
            return contextlib.nullcontext()
        return capman.global_and_fixture_disabled()

    def gate_report(self, finetune: str) -> TransferReport:
        if finetune not in self.gate_reports:
            self.gate_reports[finetune] = self.gate_session().report([finetune])
        return self.gate_reports[finetune]


class GateCollector(pytest.Collector):
    """All checks for one finetune."""

    def __init__(self, *, finetune: str, planned: list[tuple[str, str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.finetune = finetune
        self.planned = planned

    def collect(self) -> list[pytest.Item]:
        items = []
        # Under xdist --dist loadgroup (which the plugin sets for plain -n), one worker owns
        # each finetune's items. xdist reads the group from a "@group" nodeid suffix; its own
        # rewrite of xdist_group marks runs before these items exist, so it is applied here.
        group = f"@sae-transfer-{self.finetune}" if getattr(self.config.option, "loadgroup", False) else ""
        for check_id, metric, severity in self.planned:
            item = GateItem.from_parent(self, name=check_id, nodeid=f"{self.nodeid}::{check_id}{group}", finetune=self.finetune,
                                        check_id=check_id, metric=metric, severity=severity)
            items.append(item)
        return items

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"sae-transfer gate for {self.finetune}"


class GateItem(pytest.Item):
    def __init__(self, *, finetune: str, check_id: str, metric: str, severity: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.finetune = finetune
        self.check_id = check_id
        self.metric = metric
        self.severity = severity

    def runtest(self) -> None:
        from .plugin import STATE_KEY

        state = self.config.stash[STATE_KEY]
        try:
            report = state.gate_report(self.finetune)
        except Exception as exc:  # noqa: BLE001
            raise _as_input_error(exc) from None
        check = _find_check(report, self.finetune, self.check_id)
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
            return f"{self.finetune}: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        # Not a suffix of the nodeid: pytest would rewrite its dots as "::" for display.
        return self.path, None, f"sae-transfer check {self.check_id} of {self.finetune}"


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


def _as_input_error(exc: BaseException) -> BaseException:
    from .loading import LoadError
    from .thresholds import ProfileError

    if isinstance(exc, (LoadError, ProfileError)):
        return InputError(str(exc))
    return exc


def merge_reports(parts: list[TransferReport]) -> TransferReport | None:
    """One report from the per-worker reports of an xdist run (finetunes in first-seen order)."""
    if not parts:
        return None
    from .report import FeatureArrays

    first = parts[0]
    features = FeatureArrays()
    finetunes = []
    seen: set[str] = set()
    for part in parts:
        if part.features is not None:
            features.histograms.update(part.features.histograms)
            features.vectors.update(part.features.vectors)
        for ft in part.finetunes:
            if ft.model not in seen:
                seen.add(ft.model)
                finetunes.append(ft)
    config = dict(first.config)
    if len(parts) > 1:
        # Under xdist: which worker computed what (the base must be computed once).
        config["provenance_by_worker"] = [part.config.get("provenance", {}) for part in parts]
    return TransferReport(config=config, base=first.base, finetunes=finetunes, features=features)


def order_like(report: TransferReport, names: tuple[str, ...]) -> TransferReport:
    rank = {name: i for i, name in enumerate(names)}
    report.finetunes.sort(key=lambda ft: rank.get(ft.model, len(rank)))
    return report


def write_outputs(report: TransferReport, run_config: RunConfig) -> list[str]:
    """The JSON report, the report directory and the GitHub step summary, as asked for."""
    written: list[str] = []
    if run_config.report:
        path = report.write_json(Path(run_config.report))
        written.append(str(path))
        if report.features_file:
            written.append(str(path.with_name(report.features_file)))
    if run_config.report_dir:
        from .render import write_report_dir

        paths = write_report_dir(report, Path(run_config.report_dir))
        written.extend(str(p) for p in paths.values())
    from .render import append_github_step_summary

    if append_github_step_summary(report):
        written.append("$GITHUB_STEP_SUMMARY")
    return written
