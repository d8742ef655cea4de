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
from .gate import SKIP_NO_FINETUNE, GateItem, gate_items
from .loading import plan_sae_keys
from .state import STATE_KEY, PluginState, Target

pytest.register_assert_rewrite("pytest_sae_transfer.assertions")

#: Fixtures that need a configuration; tests using any of them get parametrized.
TARGET_FIXTURES = frozenset({"sae_transfer_config", "sae_transfer_session", "sae", "base_model", "sae_tokens",
                             "finetune_name", "finetune_model", "transfer_result"})

MARKER_HELP = (
    "sae_transfer(release=None, sae_id=None, sae_path=None, base_model=None, finetune=None, dataset=None, n_tokens=None, ...): "
    "tie the test's sae-transfer fixtures (transfer_result, finetune_model, base_model, sae, sae_tokens) to this SAE and finetune(s) "
    "instead of the command line's"
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
        config.stash[STATE_KEY] = PluginState(config, run_config)
    if run_config.active:
        _group_finetunes_per_worker(config)


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
    if state is not None and state.gate_active:
        with _usage_errors():
            items.extend(gate_items(session, state.run_config.finetunes, state.sae_keys, state.profile))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Serial runs load and evaluate here, before any test runs, so bad input is a usage error (exit 4)."""
    state = session.config.stash.get(STATE_KEY, None)
    if state is None or not state.gate_active or state.is_worker:
        return
    if session.config.option.collectonly or state.is_xdist_controller:
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


# -- fixtures -------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Point a test's fixtures at its configuration, parametrized over its finetunes."""
    if not TARGET_FIXTURES.intersection(metafunc.fixturenames):
        return
    state = metafunc.config.stash[STATE_KEY]
    base = state.run_config or config_mod.RunConfig()
    marker = metafunc.definition.get_closest_marker("sae_transfer")
    where = f"{metafunc.definition.nodeid}: "
    run_config = base
    if marker is not None:
        if marker.args:
            raise pytest.UsageError(f"{where}@pytest.mark.sae_transfer takes keyword arguments only (release=..., finetune=...)")
        with _usage_errors():
            run_config = config_mod.from_marker(base, dict(marker.kwargs), where)
    index = state.config_index(run_config)
    finetunes: list[str | None] = list(run_config.finetunes) or [None]
    sae_keys: list[str | None] = [None]
    if run_config.has_sae:
        with _usage_errors():
            sae_keys = list(plan_sae_keys(run_config.sae_release, run_config.sae_ids, run_config.sae_paths))
    several = len(sae_keys) > 1
    targets = [Target(index, ft, key, several) for ft in finetunes for key in sae_keys]
    metafunc.parametrize("_sae_transfer_target", targets, ids=[repr(t) for t in targets], indirect=True, scope="session")


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
    if not state.configs[_sae_transfer_target.config_index].has_sae:
        pytest.skip("no SAE configured: pass --sae-release NAME or --sae-path DIR, or use @pytest.mark.sae_transfer(release=...)")
    return _call(lambda: state.session(_sae_transfer_target.config_index))


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
    if _sae_transfer_target.finetune is None:
        pytest.skip(SKIP_NO_FINETUNE)
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
