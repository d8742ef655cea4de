"""The run's state: configurations, their sessions and profiles, the gate's reports, and
the end of the run (publishing a worker's report under xdist, merging the workers'
reports on the controller, writing the outputs). Kept in ``config.stash[STATE_KEY]``.

Nothing here imports torch at import time: the session (and with it the engine) is
imported when a result is first needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from .config import RunConfig
from .loading import plan_sae_keys
from .report import FeatureArrays, RunReport, TransferReport
from .thresholds import Profile, load_profile, planned_checks, profile_for_release
from .thresholds.watchlist import add_watch_ids, parse_feature_ids


@dataclasses.dataclass
class Target:
    """What a test's fixtures point at: a configuration, (maybe) one finetune, and one of its
    SAEs (``sae_key``; None: the configuration's first). ``several``: the configuration has
    more than one SAE, so the test id names it. ``missing``: what the configuration lacks
    for the test's fixtures (then ``skip`` says whether the test asked to be skipped)."""

    config_index: int
    finetune: str | None
    sae_key: str | None = None
    several: bool = False
    missing: str | None = None
    skip: bool = False

    def __repr__(self) -> str:
        if self.missing:
            return "unconfigured"
        name = self.finetune or "no-finetune"
        return f"{name}-{self.sae_key}" if self.several else name


class PluginState:
    """Session-wide state of the plugin."""

    def __init__(self, pytest_config: pytest.Config, run_config: RunConfig | None) -> None:
        self.pytest_config = pytest_config
        self.run_config = run_config
        workerinput = getattr(pytest_config, "workerinput", None)
        self.worker_id: str | None = workerinput.get("workerid") if workerinput else None
        self.run_id: str | None = workerinput.get("testrunuid") if workerinput else (uuid.uuid4().hex if run_config and run_config.no_cache else None)
        self.configs: list[RunConfig] = []
        self.sessions: dict[int, Any] = {}
        self._profiles: dict[tuple[str, tuple[str, ...]], Profile] = {}
        self.gate_reports: dict[str, RunReport] = {}
        self.final_report: RunReport | None = None
        self._sae_keys: list[str] | None = None
        self.worker_payloads: list[dict[str, Any]] = []
        self.written: list[str] = []
        self.write_error: str | None = None
        #: (finetune, SAE key, check id) of the gate items pytest selected; None before collection ends.
        self.selected: set[tuple[str, str, str]] | None = None
        self.fixture_tests = 0  # selected tests whose sae-transfer fixtures have their configuration
        # The gate's profile is read at configure time, so a bad profile is a usage error up front.
        self.profile = self.profile_for(run_config) if run_config is not None and (run_config.active or run_config.thresholds) else None

    @property
    def is_worker(self) -> bool:
        return self.worker_id is not None

    @property
    def is_xdist_controller(self) -> bool:
        return not self.is_worker and bool(getattr(self.pytest_config.option, "numprocesses", None)) and \
            getattr(self.pytest_config.option, "dist", "no") != "no"

    @property
    def gate_active(self) -> bool:
        return self.run_config is not None and self.run_config.active

    def profile_for(self, config: RunConfig) -> Profile:
        """The threshold profile of a configuration: the one named, else its release's, else the default."""
        name = config.thresholds or profile_for_release(config.sae_release)
        key = (name, config.features)
        if key not in self._profiles:
            profile = load_profile(name)
            if config.features:
                # Watched from the command line: added to the profile's watchlist, with its defaults.
                ids = [i for text in config.features for i in parse_feature_ids(text)]
                profile = dataclasses.replace(profile, features=add_watch_ids(profile.features, ids))
            self._profiles[key] = profile
        return self._profiles[key]

    def config_index(self, config: RunConfig) -> int:
        for i, known in enumerate(self.configs):
            if known == config:
                return i
        self.configs.append(config)
        return len(self.configs) - 1

    def note_selection(self, items: list[pytest.Item]) -> None:
        """What pytest selected, once collection (with -k, -m and --deselect) is over."""
        self.selected = {(item.finetune, item.sae_key, item.check_id) for item in items  # type: ignore[attr-defined]
                         if hasattr(item, "check_id") and hasattr(item, "sae_key")}
        targets = [getattr(getattr(item, "callspec", None), "params", {}).get("_sae_transfer_target") for item in items]
        self.fixture_tests = sum(1 for t in targets if isinstance(t, Target) and not t.missing)

    def session(self, index: int) -> Any:
        if index not in self.sessions:
            from .session import TransferSession

            if self.is_worker and not self.sessions:
                cap_worker_threads(self.pytest_config)
            config = self.configs[index]
            self.sessions[index] = TransferSession(
                config, self.profile_for(config), worker_id=self.worker_id, run_id=self.run_id,
                quiet_context=self.output_context, progress_stream=None if self.is_worker else sys.__stderr__,
            )
        # Every problem the config files show, before any data or weights load (again after a failure).
        self.sessions[index].inputs.preflight()
        return self.sessions[index]

    def gate_session(self) -> Any:
        assert self.run_config is not None
        return self.session(self.config_index(self.run_config))

    def output_context(self) -> Any:
        """Let progress reach the terminal while pytest captures output."""
        capman = self.pytest_config.pluginmanager.getplugin("capturemanager")
        if capman is None or self.is_worker:
            return contextlib.nullcontext()
        return capman.global_and_fixture_disabled()

    @property
    def sae_keys(self) -> list[str]:
        """The gate's SAEs, named from the configuration alone (no weights loaded)."""
        if self._sae_keys is None:
            assert self.run_config is not None
            c = self.run_config
            self._sae_keys = plan_sae_keys(c.sae_release, c.sae_ids, c.sae_paths)
        return self._sae_keys

    def gate_report(self, finetune: str) -> RunReport:
        if finetune not in self.gate_reports:
            self.gate_reports[finetune] = self.gate_session().report([finetune])
        return self.gate_reports[finetune]

    # -- the end of the run ---------------------------------------------------------

    def receive_worker(self, node: Any) -> None:
        """On the xdist controller: a worker finished and published its report's path."""
        payload = getattr(node, "workeroutput", {}).get("sae_transfer_report")
        if payload:
            self.worker_payloads.append(json.loads(payload))

    def finish(self, session: pytest.Session) -> None:
        """Publish (on a worker) or merge and write (serial run, xdist controller) the report."""
        if not self.gate_active:
            return
        if self.is_worker:
            self._publish()
            return
        if self.is_xdist_controller:
            parts = [RunReport.read_json(p["path"]) for p in self.worker_payloads]
            for payload in self.worker_payloads:  # read in full above: the workers' scratch copies can go
                shutil.rmtree(os.path.dirname(payload["path"]), ignore_errors=True)
            report = merge_reports(parts, from_workers=True)
        else:
            report = self._own_report()
        if report is None:
            return
        assert self.run_config is not None
        self.final_report = order_like(report, self.run_config.finetunes, self.sae_keys)
        try:
            self.written = write_outputs(self.final_report, self.run_config)
        except OSError as exc:
            # Writes are atomic: whatever report was there before is still there, whole.
            self.write_error = f"could not write the sae-transfer report: {exc}. Any earlier report at that path is intact."
            if session.exitstatus == 0:
                session.exitstatus = pytest.ExitCode.USAGE_ERROR

    def _own_report(self) -> RunReport | None:
        report = merge_reports(list(self.gate_reports.values()))
        if report is not None:
            assert self.run_config is not None
            # The reports were built one by one; record what this process did over the whole run.
            provenance = self.gate_session().provenance
            for sae_report in report.saes:
                sae_report.config["provenance"] = dict(provenance.get(sae_report.sae_key, {}))
                if self.run_config.finetune_sources:
                    sae_report.config["finetune_sources"] = dict(self.run_config.finetune_sources)
            self._drop_deselected(report)
        return report

    def _drop_deselected(self, report: RunReport) -> None:
        """The verdict covers the checks pytest selected: the others move to ``deselected``."""
        if self.selected is None or self.profile is None:
            return
        planned = {check_id for check_id, _, _ in planned_checks(self.profile)}
        for sae_report in report.saes:
            for ft in sae_report.finetunes:
                ran = {check for name, key, check in self.selected if name == ft.model and key == sae_report.sae_key}
                left_out = planned - ran  # a check that is no gate item (none today) stays judged
                ft.deselected = [c.id for c in ft.checks if c.id in left_out]
                ft.checks = [c for c in ft.checks if c.id not in left_out]

    def no_finetune_hint(self, exitstatus: int) -> str | None:
        """A one-line hint when an SAE is named but nothing (no finetune, no fixture test) uses it."""
        c = self.run_config
        if c is None or not c.has_sae or c.finetunes or self.is_worker:
            return None
        if self.fixture_tests or (self.is_xdist_controller and exitstatus != pytest.ExitCode.NO_TESTS_COLLECTED):
            return None
        named = f"--sae-release {c.sae_release}" if c.sae_release else "--sae-path"
        example = " (the zoo's: toy-prose, toy-code)" if c.sae_release and c.sae_release.startswith("toy-") else ""
        return (f"sae-transfer: {named} names an SAE but no finetune is given, so the gate has nothing to check: "
                f"add --finetune NAME{example}")

    def _publish(self) -> None:
        report = self._own_report()
        if report is None:
            return
        directory = tempfile.mkdtemp(prefix="sae-transfer-worker-")
        path = report.write_json(os.path.join(directory, "report.json"))
        self.pytest_config.workeroutput["sae_transfer_report"] = json.dumps({"path": str(path)})  # type: ignore[attr-defined]

    def write_summary(self, terminalreporter: Any) -> None:
        if self.final_report is None:
            return
        from .render import terminal_summary

        terminalreporter.write_sep("=", "sae-transfer summary")
        verbose = self.pytest_config.get_verbosity() > 0
        terminalreporter.write_line(terminal_summary(self.final_report, width=terminalreporter._tw.fullwidth, verbose=verbose))
        deselected = sum(len(ft.deselected) for r in self.final_report.saes for ft in r.finetunes)
        if deselected:
            terminalreporter.write_line(f"{deselected} check{'s' if deselected > 1 else ''} deselected (-k/-m/--deselect): "
                                        "not part of the verdict; the JSON report lists them under \"deselected\"")
        for line in written_lines(self.written, verbose):
            terminalreporter.write_line(line)
        if self.write_error:
            terminalreporter.write_line(f"ERROR: {self.write_error}", red=True, bold=True)


def written_lines(paths: list[Any], verbose: bool) -> list[str]:
    """What the run wrote: every file with -v; otherwise the files of one directory on one
    line, plots counted rather than listed (a family run writes dozens)."""
    if verbose:
        return [f"sae-transfer wrote {p}" for p in paths]
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(os.path.dirname(str(p)), []).append(os.path.basename(str(p)))
    lines = []
    for directory, names in by_dir.items():
        n_png = sum(1 for n in names if n.endswith(".png"))
        shown = [n for n in names if not n.endswith(".png")] + ([f"{n_png} plot{'s' if n_png != 1 else ''} (PNG)"] if n_png else [])
        listing = ", ".join(shown)
        if directory and len(names) > 1:
            lines.append(f"sae-transfer wrote {os.path.join(directory, '')}: {listing}")
        else:
            lines.append(f"sae-transfer wrote {', '.join(os.path.join(directory, n) for n in names) if n_png == 0 else listing}")
    return lines


STATE_KEY = pytest.StashKey[PluginState]()


def cap_worker_threads(config: pytest.Config) -> None:
    """On an xdist worker, share the cores between the workers (torch would give each all of
    them, and N workers x all cores oversubscribe the CPU). An explicit OMP_NUM_THREADS or
    MKL_NUM_THREADS is left alone."""
    if any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return
    workerinput = getattr(config, "workerinput", None) or {}
    workers = int(workerinput.get("workercount") or os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    import torch

    torch.set_num_threads(max(1, cores // max(1, workers)))


def merge_reports(parts: list[RunReport], from_workers: bool = False) -> RunReport | None:
    """One report from per-finetune or per-worker reports: per SAE, finetunes in first-seen order.

    Under xdist each worker's report holds the finetunes it owned; every SAE's config
    records which worker computed what (``provenance_by_worker``: the base must be
    computed once)."""
    if not parts:
        return None
    merged: dict[str, TransferReport] = {}
    seen: dict[str, set[str]] = {}
    provenance: dict[str, list[dict[str, str]]] = {}
    for part in parts:
        for report in part.saes:
            key = report.sae_key
            if key not in merged:
                merged[key] = TransferReport(config=dict(report.config), base=report.base, finetunes=[], features=FeatureArrays())
                seen[key] = set()
                provenance[key] = []
            target = merged[key]
            provenance[key].append(dict(report.config.get("provenance") or {}))
            if report.features is not None:
                assert target.features is not None
                target.features.histograms.update(report.features.histograms)
                target.features.vectors.update(report.features.vectors)
                target.features.topk.update(report.features.topk)
            for ft in report.finetunes:
                if ft.model not in seen[key]:
                    seen[key].add(ft.model)
                    target.finetunes.append(ft)
    if from_workers:
        for key, target in merged.items():
            target.config["provenance_by_worker"] = provenance[key]
            target.config["provenance"] = _union(provenance[key])
    return RunReport(list(merged.values()))


def _union(provenances: list[dict[str, str]]) -> dict[str, str]:
    """Every model's provenance over the workers: "computed" where any worker computed it."""
    out: dict[str, str] = {}
    for prov in provenances:
        for name, how in prov.items():
            if out.get(name) != "computed":
                out[name] = how
    return out


def order_like(report: RunReport, finetunes: tuple[str, ...], sae_keys: list[str]) -> RunReport:
    """SAEs in the run's order, and each SAE's finetunes in the order they were named."""
    rank = {name: i for i, name in enumerate(finetunes)}
    sae_rank = {key: i for i, key in enumerate(sae_keys)}
    report.saes.sort(key=lambda r: sae_rank.get(r.sae_key, len(sae_rank)))
    for sae_report in report.saes:
        sae_report.finetunes.sort(key=lambda ft: rank.get(ft.model, len(rank)))
    return report


def write_outputs(report: RunReport, run_config: RunConfig) -> list[str]:
    """The JSON report, the report directory and the GitHub step summary, as asked for."""
    from .render import append_github_step_summary, write_report_dir

    written: list[str] = []
    if run_config.report:
        path = report.write_json(Path(run_config.report))
        written.append(str(path))
        if report.features_file:
            written.append(str(path.with_name(report.features_file)))
    if run_config.report_dir:
        paths = write_report_dir(report, Path(run_config.report_dir))
        written.extend(str(p) for p in paths.values())
    if append_github_step_summary(report):
        written.append("$GITHUB_STEP_SUMMARY")
    return written
