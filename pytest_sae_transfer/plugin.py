"""pytest wiring: hooks that hand off to the run's state, and the fixtures.

Nothing here imports torch: ``pytest --help`` and runs without ``--finetune``
stay as light as pytest itself.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import pytest

from . import config as config_mod
from .errors import InputError
from .gate import GateItem, finetune_scheduler, gate_collectors, nodeid_prefix
from .loading import check_inputs, plan_sae_keys, zoo_typos
from .state import STATE_KEY, PluginState, Target

pytest.register_assert_rewrite("pytest_sae_transfer.assertions")

#: Fixtures that need a configuration; tests using any of them get parametrized.
TARGET_FIXTURES = frozenset({"sae_transfer_config", "sae_transfer_session", "sae", "base_model", "sae_tokens",
                             "finetune_name", "finetune_model", "transfer_result"})

MARKER_HELP = (
    "sae_transfer(release=None, sae_id=None, sae_path=None, base_model=None, finetune=None, dataset=None, n_tokens=None, ..., "
    "skip_if_unconfigured=False): tie the test's sae-transfer fixtures (transfer_result, finetune_model, base_model, sae, "
    "sae_tokens) to this SAE and finetune(s) instead of the command line's. Without an SAE (or a finetune, for the fixtures "
    "that need one) such a test is a usage error, unless skip_if_unconfigured=True skips it"
)


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """Bad input found before any test runs: pytest's usage error (exit 4), one message, no traceback."""
    try:
        yield
    except InputError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_addoption(parser: pytest.Parser) -> None:
    config_mod.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    with _usage_errors():
        run_config = config_mod.resolve(config)
        zoo_typos(run_config)  # a misspelt zoo name is said before any hub call
        config.stash[STATE_KEY] = PluginState(config, run_config)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Under xdist the controller collects nothing: it checks the inputs' config files itself, so
    that bad input is a usage error (exit 4) there too, before any worker loads anything."""
    state = session.config.stash.get(STATE_KEY, None)
    if state is not None and state.gate_active and state.is_xdist_controller and not session.config.option.collectonly:
        assert state.run_config is not None
        with _usage_errors():
            check_inputs(state.run_config)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    """The session collects one collector per finetune beside the test files, so pytest
    counts, selects (-k, -m, --deselect) and lists the gate's items as any others."""
    report = yield
    if isinstance(collector, pytest.Session) and report.passed:
        state = collector.config.stash.get(STATE_KEY, None)
        if state is not None and state.gate_active:
            assert state.run_config is not None and state.profile is not None
            with _usage_errors():
                report.result.extend(gate_collectors(collector, state.run_config.finetunes, state.sae_keys, state.profile))
    return report


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under plain ``-n`` (xdist's ``--dist load``), one worker runs all of a finetune's gate items;
    another ``--dist`` mode is left to xdist."""
    state = config.stash.get(STATE_KEY, None)
    if state is None or not state.gate_active or config.getvalue("dist") != "load":
        return None
    assert state.run_config is not None
    prefix = nodeid_prefix(config)
    return finetune_scheduler(config, log, {prefix + ft for ft in state.run_config.finetunes})


def pytest_collection_finish(session: pytest.Session) -> None:
    """Serial runs load and evaluate here, before any test runs, so bad input is a usage error (exit 4)."""
    state = session.config.stash.get(STATE_KEY, None)
    if state is None:
        return
    state.note_selection(session.items)
    collect_only = session.config.option.collectonly
    if not collect_only and not state.is_worker:
        _refuse_unconfigured(session.items)
    if not state.gate_active or state.is_worker or collect_only or state.is_xdist_controller:
        return
    wanted = list(dict.fromkeys(item.finetune for item in session.items if isinstance(item, GateItem)))
    if wanted:
        with _usage_errors():
            state.gate_session().ensure(wanted)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    state = node.config.stash.get(STATE_KEY, None)
    if state is not None:
        state.receive_worker(node)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(STATE_KEY, None)
    if state is not None:
        state.finish(session)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is not None:
        state.write_summary(terminalreporter)
        hint = state.no_finetune_hint(int(exitstatus))
        if hint:
            terminalreporter.write_line(hint, yellow=True, bold=True)


# -- fixtures -------------------------------------------------------------------


#: Fixtures that need a finetune besides the SAE.
FINETUNE_FIXTURES = frozenset({"finetune_name", "finetune_model", "transfer_result"})

SKIP_HINT = ("To skip such tests when nothing is configured instead, mark them "
             "@pytest.mark.sae_transfer(skip_if_unconfigured=True).")


NO_SAE = ("no SAE is configured: pass --sae-release NAME or --sae-path DIR (ini key sae_release / sae_path, environment "
          "variable PYTEST_SAE_RELEASE / PYTEST_SAE_PATH), or mark the test @pytest.mark.sae_transfer(release=...)")
NO_FINETUNE = ("no finetune is configured: pass --finetune NAME (ini key sae_finetunes, environment variable "
               "PYTEST_SAE_FINETUNES), or mark the test @pytest.mark.sae_transfer(finetune=...)")


def _missing(run_config: config_mod.RunConfig, fixturenames: list[str]) -> str | None:
    """What a test's fixtures need that its configuration does not name, in words; None if nothing."""
    if not run_config.has_sae:
        return NO_SAE
    if FINETUNE_FIXTURES.intersection(fixturenames) and not run_config.finetunes:
        return NO_FINETUNE
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Point a test's fixtures at its configuration, parametrized over its finetunes.

    The test's ``sae_transfer`` markers (module, class, function) are merged, the closest
    winning. A test whose configuration lacks what its fixtures need is a usage error,
    unless its marker says ``skip_if_unconfigured=True``."""
    if not TARGET_FIXTURES.intersection(metafunc.fixturenames):
        return
    state = metafunc.config.stash[STATE_KEY]
    base = state.run_config or config_mod.RunConfig()
    where = f"{metafunc.definition.nodeid}: "
    kwargs: dict[str, Any] = {}
    for marker in reversed(list(metafunc.definition.iter_markers("sae_transfer"))):
        if marker.args:
            raise pytest.UsageError(f"{where}@pytest.mark.sae_transfer takes keyword arguments only (release=..., finetune=...)")
        kwargs.update(marker.kwargs)
    skip = kwargs.pop("skip_if_unconfigured", False)
    if not isinstance(skip, bool):
        raise pytest.UsageError(f"{where}@pytest.mark.sae_transfer(skip_if_unconfigured=...) takes True or False; got {skip!r}")
    run_config = base
    if kwargs:
        with _usage_errors():
            run_config = config_mod.from_marker(base, kwargs, where)
    missing = _missing(run_config, list(metafunc.fixturenames))
    if missing is not None:
        target = Target(-1, None, missing=missing, skip=skip)
        metafunc.parametrize("_sae_transfer_target", [target], ids=["unconfigured"], indirect=True, scope="session")
        return
    index = state.config_index(run_config)
    finetunes: list[str | None] = list(run_config.finetunes) or [None]
    with _usage_errors():
        sae_keys: list[str | None] = list(plan_sae_keys(run_config.sae_release, run_config.sae_ids, run_config.sae_paths))
    several = len(sae_keys) > 1
    targets = [Target(index, ft, key, several) for ft in finetunes for key in sae_keys]
    metafunc.parametrize("_sae_transfer_target", targets, ids=[repr(t) for t in targets], indirect=True, scope="session")


def _refuse_unconfigured(items: list[pytest.Item]) -> None:
    """Selected tests whose fixtures lack their configuration: one usage error naming the option."""
    by_reason: dict[str, list[str]] = {}
    for item in items:
        target = getattr(getattr(item, "callspec", None), "params", {}).get("_sae_transfer_target")
        if isinstance(target, Target) and target.missing and not target.skip:
            by_reason.setdefault(target.missing, []).append(item.nodeid)
    if not by_reason:
        return
    parts = []
    for reason, ids in by_reason.items():
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        parts.append(f"{len(ids)} test{'s' if len(ids) > 1 else ''} use{'' if len(ids) > 1 else 's'} the sae-transfer fixtures, "
                     f"but {reason} ({shown}).")
    raise pytest.UsageError(" ".join(parts) + " " + SKIP_HINT)


def _state(request: pytest.FixtureRequest) -> PluginState:
    return request.config.stash[STATE_KEY]


def _call(fn: Callable[[], Any]) -> Any:
    """Run a loader; bad input fails the fixture with its one-line message."""
    __tracebackhide__ = True
    try:
        return fn()
    except InputError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def _sae_transfer_target(request: pytest.FixtureRequest) -> Target:
    return request.param


@pytest.fixture(scope="session")
def sae_transfer_session(request: pytest.FixtureRequest, _sae_transfer_target: Target) -> Any:
    """The TransferSession behind this test's configuration."""
    state = _state(request)
    target = _sae_transfer_target
    if target.missing:
        if target.skip:
            pytest.skip(target.missing)
        pytest.fail(f"{target.missing}. {SKIP_HINT}", pytrace=False)  # reached under xdist, where collection cannot refuse
    return _call(lambda: state.session(target.config_index))


@pytest.fixture(scope="session")
def sae_transfer_config(sae_transfer_session: Any) -> config_mod.RunConfig:
    """The resolved, frozen run configuration."""
    return sae_transfer_session.config


@pytest.fixture(scope="session")
def sae(sae_transfer_session: Any, _sae_transfer_target: Target) -> Any:
    """The sae_lens SAE under test (parametrized over the configured SAEs)."""
    key = _sae_transfer_target.sae_key
    return _call(lambda: (sae_transfer_session.inputs.sae_by_key(key) if key else sae_transfer_session.sae).sae)


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
    """The finetune's label (its name in test ids and reports)."""
    if _sae_transfer_target.finetune is None:
        pytest.fail(f"{NO_FINETUNE}. {SKIP_HINT}", pytrace=False)
    return _sae_transfer_target.finetune


@pytest.fixture(scope="session")
def finetune_model(sae_transfer_session: Any, finetune_name: str) -> Any:
    """The finetune's HookedTransformer (parametrized over the configured finetunes)."""
    return _call(lambda: sae_transfer_session.model(finetune_name).model)


@pytest.fixture(scope="session")
def transfer_result(sae_transfer_session: Any, finetune_name: str, _sae_transfer_target: Target) -> Any:
    """A PairResult for one (finetune, SAE): every metric by attribute (result.ce_loss_delta,
    result.base.l0, result.resid_cosine_mean) and the per-feature arrays (result.activation_similarity)."""
    return _call(lambda: sae_transfer_session.pair(finetune_name, _sae_transfer_target.sae_key))
