"""pytest wiring: options, the built-in gate, fixtures, the marker and the reports.

Nothing here imports torch: ``pytest --help`` and runs without ``--finetune``
stay as light as pytest itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import pytest

from . import config as config_mod
from .gate import (
    SKIP_NO_FINETUNE,
    GateCollector,
    GateItem,
    InputError,
    PluginState,
    Target,
    merge_reports,
    order_like,
    write_outputs,
)

pytest.register_assert_rewrite("pytest_sae_transfer.assertions")

STATE_KEY = pytest.StashKey[PluginState]()

#: Fixtures that need a configuration; tests using any of them get parametrized.
TARGET_FIXTURES = frozenset({"sae_transfer_config", "sae_transfer_session", "sae", "base_model", "sae_tokens",
                             "finetune_name", "finetune_model", "transfer_result"})

MARKER_HELP = (
    "sae_transfer(release=None, sae_id=None, sae_path=None, base_model=None, finetune=None, dataset=None, n_tokens=None, ...): "
    "tie the test's sae-transfer fixtures (transfer_result, finetune_model, base_model, sae, sae_tokens) to this SAE and finetune(s) "
    "instead of the command line's"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    config_mod.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        run_config = config_mod.resolve(config)
    except config_mod.ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    profile = None
    if run_config.active or run_config.thresholds:
        from .thresholds import ProfileError, load_profile, profile_for_release

        try:
            profile = load_profile(run_config.thresholds or profile_for_release(run_config.sae_release))
        except ProfileError as exc:
            raise pytest.UsageError(str(exc)) from None
    if run_config.active:
        _group_finetunes_per_worker(config)
    config.stash[STATE_KEY] = PluginState(config, run_config, profile)


def _group_finetunes_per_worker(config: pytest.Config) -> None:
    """Under xdist, let one worker own each finetune's gate items (their xdist_group marks).

    Plain ``-n N`` means ``--dist load``; it becomes ``loadgroup`` on the controller, and
    each worker, which rebuilds its options from the command line, turns its group marks
    into scheduling groups. An explicit other ``--dist`` mode is left alone.
    """
    args = [str(a) for a in config.invocation_params.args]
    explicit = None
    for i, arg in enumerate(args):
        if arg == "--dist" and i + 1 < len(args):
            explicit = args[i + 1]
        elif arg.startswith("--dist="):
            explicit = arg.split("=", 1)[1]
    if explicit not in (None, "load", "loadgroup"):
        return
    if hasattr(config, "workerinput"):
        config.option.loadgroup = True
    elif getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Append the gate's items (before -k/-m deselection sees them)."""
    state = config.stash.get(STATE_KEY, None)
    if state is None or state.run_config is None or not state.run_config.active:
        return
    from .thresholds import planned_checks

    planned = planned_checks(state.profile)
    # Rooted at the invocation directory, so pytest shows "toy-code::..." wherever it runs
    # (it prints nodeids relative to the working directory, not to the rootdir).
    try:
        here = config.invocation_params.dir.resolve().relative_to(config.rootpath.resolve()).as_posix()
    except ValueError:
        here = "."
    prefix = "" if here == "." else here + "/"
    for finetune in state.run_config.finetunes:
        collector = GateCollector.from_parent(session, name=finetune, nodeid=prefix + finetune, finetune=finetune, planned=planned)
        items.extend(collector.collect())


def pytest_collection_finish(session: pytest.Session) -> None:
    """Serial runs load and evaluate here, before any test runs, so bad input is a usage error (exit 4)."""
    config = session.config
    state = config.stash.get(STATE_KEY, None)
    if state is None or state.run_config is None or not state.run_config.active or state.is_worker:
        return
    if config.option.collectonly or state.is_xdist_controller:
        return
    wanted = list(dict.fromkeys(item.finetune for item in session.items if isinstance(item, GateItem)))
    if not wanted:
        return
    try:
        state.gate_session().ensure(wanted)
    except Exception as exc:  # noqa: BLE001
        error = _usage_error(exc)
        if error is None:
            raise
        raise error from None


def _usage_error(exc: BaseException) -> pytest.UsageError | None:
    from .loading import LoadError
    from .thresholds import ProfileError

    if isinstance(exc, (LoadError, ProfileError, InputError, config_mod.ConfigError)):
        return pytest.UsageError(str(exc))
    return None


# -- xdist ----------------------------------------------------------------------


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    state = node.config.stash.get(STATE_KEY, None)
    payload = getattr(node, "workeroutput", {}).get("sae_transfer_report")
    if state is not None and payload:
        state.worker_payloads.append(json.loads(payload))


# -- the end of the run -----------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    state = config.stash.get(STATE_KEY, None)
    if state is None or state.run_config is None or not state.run_config.active:
        return
    from .report import TransferReport

    if state.is_worker:
        if state.gate_reports:
            report = merge_reports(list(state.gate_reports.values()))
            assert report is not None
            # The reports were built one by one; record what this worker did over the whole run.
            report.config["provenance"] = dict(state.gate_session().provenance)
            directory = tempfile.mkdtemp(prefix="sae-transfer-worker-")
            path = report.write_json(os.path.join(directory, "report.json"))
            config.workeroutput["sae_transfer_report"] = json.dumps({"path": str(path)})
        return
    if state.is_xdist_controller:
        parts = [TransferReport.read_json(p["path"]) for p in state.worker_payloads]
        for payload in state.worker_payloads:  # read in full above: the workers' scratch copies can go
            shutil.rmtree(os.path.dirname(payload["path"]), ignore_errors=True)
        report = merge_reports(parts)
    else:
        report = merge_reports(list(state.gate_reports.values()))
        if report is not None:
            report.config["provenance"] = dict(state.gate_session().provenance)
    if report is None:
        return
    state.final_report = order_like(report, state.run_config.finetunes)
    try:
        state.written = write_outputs(state.final_report, state.run_config)
    except OSError as exc:
        # Writes are atomic: whatever report was there before is still there, whole.
        state.write_error = f"could not write the sae-transfer report: {exc}. Any earlier report at that path is intact."
        if exitstatus == 0:
            session.exitstatus = pytest.ExitCode.USAGE_ERROR


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None or state.final_report is None:
        return
    from .render import terminal_summary

    terminalreporter.write_sep("=", "sae-transfer summary")
    terminalreporter.write_line(terminal_summary(state.final_report, width=terminalreporter._tw.fullwidth))
    for path in state.written:
        terminalreporter.write_line(f"sae-transfer wrote {path}")
    if state.write_error:
        terminalreporter.write_line(f"ERROR: {state.write_error}", red=True, bold=True)


# -- fixtures -------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Point a test's fixtures at its configuration, parametrized over its finetunes."""
    if not TARGET_FIXTURES.intersection(metafunc.fixturenames):
        return
    state = metafunc.config.stash[STATE_KEY]
    base = state.run_config or config_mod.RunConfig()
    marker = metafunc.definition.get_closest_marker("sae_transfer")
    where = f"{metafunc.definition.nodeid}: "
    if marker is not None:
        if marker.args:
            raise pytest.UsageError(f"{where}@pytest.mark.sae_transfer takes keyword arguments only (release=..., finetune=...)")
        try:
            run_config = config_mod.from_marker(base, dict(marker.kwargs), where)
        except config_mod.ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
    else:
        run_config = base
    index = state.config_index(run_config)
    finetunes: list[str | None] = list(run_config.finetunes) or [None]
    targets = [Target(index, ft) for ft in finetunes]
    metafunc.parametrize("_sae_transfer_target", targets, ids=[repr(t) for t in targets], indirect=True, scope="session")


def _state(request: pytest.FixtureRequest) -> PluginState:
    return request.config.stash[STATE_KEY]


def _call(fn: Any) -> Any:
    """Run a loader; bad input fails the fixture with its one-line message."""
    __tracebackhide__ = True
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        if _usage_error(exc) is not None:
            pytest.fail(str(exc), pytrace=False)
        raise


@pytest.fixture(scope="session")
def _sae_transfer_target(request: pytest.FixtureRequest) -> Target:
    return request.param


@pytest.fixture(scope="session")
def sae_transfer_session(request: pytest.FixtureRequest, _sae_transfer_target: Target) -> Any:
    """The TransferSession behind this test's configuration."""
    session = _state(request).session(_sae_transfer_target.config_index)
    if not session.config.has_sae:
        pytest.skip("no SAE configured: pass --sae-release NAME or --sae-path DIR, or use @pytest.mark.sae_transfer(release=...)")
    return session


@pytest.fixture(scope="session")
def sae_transfer_config(sae_transfer_session: Any) -> config_mod.RunConfig:
    """The resolved, frozen run configuration."""
    return sae_transfer_session.config


@pytest.fixture(scope="session")
def sae(sae_transfer_session: Any) -> Any:
    """The sae_lens SAE under test."""
    return _call(lambda: sae_transfer_session.sae.sae)


@pytest.fixture(scope="session")
def base_model(sae_transfer_session: Any) -> Any:
    """The base HookedTransformer the SAE was trained on."""
    return _call(lambda: sae_transfer_session.model(sae_transfer_session.base_name).model)


@pytest.fixture(scope="session")
def sae_tokens(sae_transfer_session: Any) -> Any:
    """The evaluation tokens, a LongTensor [contexts, context_size] fed to every model."""
    return _call(lambda: sae_transfer_session.token_set.tokens)


@pytest.fixture(scope="session")
def finetune_name(_sae_transfer_target: Target) -> str:
    if _sae_transfer_target.finetune is None:
        pytest.skip(SKIP_NO_FINETUNE)
    return _sae_transfer_target.finetune


@pytest.fixture(scope="session")
def finetune_model(sae_transfer_session: Any, finetune_name: str) -> Any:
    """The finetune's HookedTransformer (parametrized over the configured finetunes)."""
    return _call(lambda: sae_transfer_session.model(finetune_name).model)


@pytest.fixture(scope="session")
def transfer_result(sae_transfer_session: Any, finetune_name: str) -> Any:
    """A PairResult: every SPEC metric by attribute (result.ce_loss_delta, result.base.l0,
    result.resid_cosine_mean) and the per-feature arrays (result.activation_similarity)."""
    return _call(lambda: sae_transfer_session.pair(finetune_name))

