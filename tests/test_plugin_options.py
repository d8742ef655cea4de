"""Options, ini keys, environment variables and usage errors (no model is loaded here)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SHOW_CONFIG = """
import json
from pytest_sae_transfer.state import STATE_KEY

def pytest_sessionstart(session):
    cfg = session.config.stash[STATE_KEY].run_config
    print("RUNCONFIG " + json.dumps({k: v for k, v in cfg.describe().items()}))
"""


def _config(result: pytest.RunResult) -> dict:
    import json

    for line in result.outlines:
        if line.startswith("RUNCONFIG "):
            return json.loads(line[len("RUNCONFIG "):])
    raise AssertionError("no RUNCONFIG line in output:\n" + result.stdout.str() + result.stderr.str())


def test_help_lists_the_option_group(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0
    out = result.stdout.str()
    assert "SAE transferability gate (pytest-sae-transfer)" in out
    for flag in ("--sae-release", "--sae-id", "--sae-path", "--base-model", "--finetune", "--sae-dataset", "--sae-tokens",
                 "--sae-context-size", "--sae-batch-size", "--sae-device", "--sae-dtype", "--sae-thresholds", "--sae-report",
                 "--sae-report-dir", "--sae-no-cache", "--sae-outlier-norm", "--sae-include-special-tokens"):
        assert flag in out, flag


def test_help_does_not_import_torch(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
import sys
def pytest_unconfigure(config):
    print("TORCH_LOADED=" + str("torch" in sys.modules))
""")
    result = pytester.runpytest_subprocess("--help")
    assert "TORCH_LOADED=False" in result.stdout.str()


def test_command_line_beats_env_beats_ini(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest(SHOW_CONFIG)
    pytester.makeini("""
[pytest]
sae_release = from-ini
sae_tokens = 111
sae_batch_size = 3
sae_finetunes =
    ini-a
    ini-b
sae_no_cache = true
""")
    monkeypatch.setenv("PYTEST_SAE_TOKENS", "222")
    monkeypatch.setenv("PYTEST_SAE_DTYPE", "bf16")
    result = pytester.runpytest_subprocess("--sae-tokens", "333", "--collect-only", "-p", "no:randomly")
    cfg = _config(result)
    assert cfg["n_tokens"] == 333  # command line wins
    assert cfg["dtype"] == "bfloat16"  # env (alias normalised)
    assert cfg["batch_size"] == 3  # ini
    assert cfg["sae_release"] == "from-ini"
    assert cfg["finetunes"] == ["ini-a", "ini-b"]
    assert cfg["no_cache"] is True

    monkeypatch.setenv("PYTEST_SAE_FINETUNES", "env-x, env-y")
    cfg = _config(pytester.runpytest_subprocess("--collect-only"))
    assert cfg["finetunes"] == ["env-x", "env-y"]
    assert cfg["n_tokens"] == 222

    cfg = _config(pytester.runpytest_subprocess("--collect-only", "--finetune", "cli-1", "--finetune", "cli-2", "--finetune", "cli-1"))
    assert cfg["finetunes"] == ["cli-1", "cli-2"]  # repeated names run once


def test_defaults_without_any_option(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SHOW_CONFIG)
    cfg = _config(pytester.runpytest_subprocess("--collect-only"))
    assert cfg["finetunes"] == [] and cfg["n_tokens"] == 32768 and cfg["device"] == "auto" and cfg["dtype"] == "auto"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sae-tokens", "0", "--sae-release", "toy-res"], "--sae-tokens must be at least 1; got 0"),
        (["--sae-tokens", "-5", "--sae-release", "toy-res"], "--sae-tokens must be at least 1; got -5"),
        (["--sae-batch-size", "0"], "--sae-batch-size must be at least 1; got 0"),
        (["--sae-tokens", "many"], "--sae-tokens: expected a whole number, got 'many'"),
        (["--sae-release", "toy-res", "--sae-path", "somewhere"], "--sae-release and --sae-path both name an SAE"),
        (["--sae-id", "blocks.1.hook_resid_post"], "--sae-id needs --sae-release"),
        (["--finetune", "toy-code"], "--finetune needs an SAE"),
        (["--sae-dtype", "float64"], "--sae-dtype: unknown dtype 'float64'"),
        (["--sae-device", "tpu"], "--sae-device: unknown device 'tpu'"),
        (["--sae-outlier-norm", "-3"], "--sae-outlier-norm: the norm threshold must be a positive finite number"),
        (["--sae-outlier-norm", "big"], "--sae-outlier-norm: expected off, auto or a positive number"),
        (["--sae-report", "report.txt"], "the report is JSON; give a path ending in .json"),
        (["--sae-release", "toy-res", "--finetune", "toy-code", "--sae-thresholds", "no-such-profile"], "unknown threshold profile 'no-such-profile'"),
    ],
)
def test_invalid_options_are_usage_errors(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    err = result.stderr.str()
    assert message in err
    assert "Traceback" not in err and "INTERNALERROR" not in err


def test_env_and_ini_errors_name_their_source(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_SAE_TOKENS", "lots")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "environment variable PYTEST_SAE_TOKENS: expected a whole number, got 'lots'" in result.stderr.str()
    monkeypatch.delenv("PYTEST_SAE_TOKENS")
    pytester.makeini("[pytest]\nsae_no_cache = maybe\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini key sae_no_cache: expected true or false, got 'maybe'" in result.stderr.str()


def test_bad_threshold_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.path.joinpath("gate.toml").write_text("[finetune.ce_loss_detla]\nmax = 0.5\n")
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "--finetune", "toy-code", "--sae-thresholds", "gate.toml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "gate.toml" in err and "ce_loss_detla" in err and "ce_loss_delta" in err
    assert "Traceback" not in err


def test_gate_items_are_collected_without_loading_models(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
import sys
def pytest_collection_finish(session):
    print("TORCH_LOADED=" + str("torch" in sys.modules))
""")
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "--finetune", "toy-prose", "--finetune", "toy-code", "--collect-only", "-q")
    out = result.stdout.str()
    assert result.ret == 0
    assert "toy-code::finetune.ce_loss_delta:increase<=" in out
    assert "toy-prose::paired.resid_cosine_mean>=" in out
    assert "TORCH_LOADED=False" in out


def test_readme_documents_every_option() -> None:
    from pathlib import Path

    from pytest_sae_transfer.config import OPTIONS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for opt in OPTIONS:
        for name in (opt.flag, f"`{opt.ini}`", f"`{opt.env}`"):
            assert name in readme, f"README lacks {name}"


@pytest.mark.parametrize(("given", "profile", "expected"), [
    ("off", "auto", None), (None, "auto", "auto"), ("auto", None, "auto"), ("250", "auto", 250.0), (None, None, None),
])
def test_outlier_norm_off_overrides_a_profiles_mask(given, profile, expected):
    """--sae-outlier-norm off turns off a release profile's mask; no option defers to the profile."""
    from pytest_sae_transfer.config import validate
    from pytest_sae_transfer.session.inputs import Inputs

    config = validate({"outlier_norm": given} if given is not None else {})
    settings = {"outlier_norm": profile} if profile is not None else {}
    assert Inputs(config, settings, []).outlier_norm == expected
