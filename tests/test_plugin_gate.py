"""The built-in gate, reports, fixtures and marker, end to end through pytest on the toy zoo.

Every run goes through a real pytest subprocess in an empty directory. The runs
share one result cache (``--sae-cache-dir``), so the zoo is evaluated once per
configuration and later runs read it back, as a user's re-run would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import read_one_sae

from pytest_sae_transfer.metrics.keys import PAIRED_EXTRA_KEYS
from pytest_sae_transfer.report import MODEL_METRIC_KEYS, PAIRED_METRIC_KEYS

pytest_plugins = ["pytester"]

TOKENS = "8192"
ZOO = ["--sae-release", "toy-res", "--sae-tokens", TOKENS]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("sae-cache"))


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: str) -> tuple[pytest.RunResult, Path]:
    """The issue's headline command, in an empty directory."""
    import subprocess
    import sys

    workdir = tmp_path_factory.mktemp("empty")
    args = [sys.executable, "-m", "pytest", *ZOO, "--finetune", "toy-prose", "--finetune", "toy-code",
            "--sae-report", "r.json", "--sae-report-dir", "out", "--sae-cache-dir", shared_cache, "-p", "no:cacheprovider",
            "--junitxml", "junit.xml", "-rA"]
    env = {**__import__("os").environ, "GITHUB_STEP_SUMMARY": str(workdir / "step_summary.md")}
    proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True, env=env, timeout=900)
    result = pytest.RunResult(proc.returncode, proc.stdout.splitlines(), proc.stderr.splitlines(), 0.0)
    return result, workdir


def _outcomes(result: pytest.RunResult) -> dict[str, str]:
    """nodeid -> PASSED/FAILED from the -rA short summary.

    pytest shows a nodeid relative to the invocation directory when the rootdir differs
    ("../toy-code::..."); the finetune part is normalised back to its name."""
    out = {}
    for line in result.outlines:
        for word in ("PASSED", "FAILED"):
            if line.startswith(word + " "):
                nodeid = line[len(word) + 1 :].split(" - ")[0]
                head, sep, tail = nodeid.partition("::")
                out[Path(head).name + sep + tail] = word
    return out


def test_gate_passes_prose_and_fails_code(gate_run: tuple[pytest.RunResult, Path]) -> None:
    result, _ = gate_run
    text = "\n".join(result.outlines + result.errlines)
    assert result.ret == 1, text
    outcomes = _outcomes(result)
    prose = {k: v for k, v in outcomes.items() if k.startswith("toy-prose::")}
    code = {k: v for k, v in outcomes.items() if k.startswith("toy-code::")}
    assert prose and code, text
    assert set(prose.values()) == {"PASSED"}, prose
    assert "FAILED" in code.values(), code
    assert outcomes["toy-code::paired.feature_transfer_rate>=0.5"] == "FAILED"
    assert outcomes["toy-code::finetune.l0:ratio<=1.5"] == "FAILED"
    assert outcomes["toy-prose::finetune.ce_loss_delta:increase<=0.3"] == "PASSED"
    assert "sae-transfer summary" in text and "toy-prose: PASS" in text and "toy-code: FAIL" in text


def test_failure_message_shows_value_bound_base_and_interval(gate_run: tuple[pytest.RunResult, Path]) -> None:
    result, workdir = gate_run
    report = read_one_sae(workdir / "r.json")
    code = next(ft for ft in report["finetunes"] if ft["model"] == "toy-code")
    failed = [c for c in code["checks"] if not c["passed"] and c["severity"] == "fail"]
    assert failed
    text = "\n".join(result.outlines)
    for check in failed:
        assert check["message"] in text  # the message pytest shows is the check's own
    # A relative check quotes the paired interval of what it checks, never the finetune's own.
    relative = [c for c in failed if c["op"].startswith(("increase", "decrease", "ratio"))]
    assert relative
    for check in relative:
        key = check["metric"].split(".", 1)[1]
        if check["op"].startswith("ratio"):
            expected = code["ratio_ci95"][key]
        elif check["op"].startswith("increase"):
            expected = code["delta_ci95"][key]
        else:
            expected = [-code["delta_ci95"][key][1], -code["delta_ci95"][key][0]]
        assert check["ci95"] == pytest.approx(expected), check
        assert "paired ci95" in check["message"] and "base" in check["message"], check["message"]


def test_report_json_follows_the_spec_layout(gate_run: tuple[pytest.RunResult, Path]) -> None:
    _, workdir = gate_run
    raw = json.loads((workdir / "r.json").read_text())
    assert raw["schema_version"] == 2 and [entry["sae"] for entry in raw["saes"]] == ["blocks.1.hook_resid_post"]
    assert raw["passed"] is False and raw["saes"][0]["passed"] is False
    assert "hook_name" in raw["saes"][0]["config"] and "base_model" in raw["config"]
    data = read_one_sae(workdir / "r.json")
    cfg = data["config"]
    for key in ("sae_release", "sae_id", "sae_path", "hook_name", "base_model", "dataset", "n_tokens", "context_size",
                "device", "dtype", "seed", "versions"):
        assert key in cfg, key
    assert cfg["sae_release"] == "toy-res" and cfg["base_model"] == "toy-base"
    assert cfg["n_tokens"] >= int(TOKENS) and cfg["n_tokens"] % cfg["context_size"] == 0
    assert set(MODEL_METRIC_KEYS) <= set(data["base"]["metrics"])
    assert [ft["model"] for ft in data["finetunes"]] == ["toy-prose", "toy-code"]
    for ft in data["finetunes"]:
        assert set(MODEL_METRIC_KEYS) <= set(ft["metrics"])
        assert set(PAIRED_METRIC_KEYS) <= set(ft["paired"])
        assert len(ft["paired"]["resid_cosine_by_position"]) == cfg["context_size"]
        for key in ("ce_loss_delta", "explained_variance", "l0"):
            lo, hi = ft["ci95"][key]
            assert lo <= ft["metrics"][key] <= hi
        lo, hi = ft["paired_ci95"]["resid_cosine_mean"]
        assert lo <= ft["paired"]["resid_cosine_mean"] <= hi
        assert set(PAIRED_EXTRA_KEYS) <= set(ft["paired"])
        for key in ("ce_loss_delta", "explained_variance", "l0"):
            lo, hi = ft["delta_ci95"][key]
            assert lo <= ft["metrics"][key] - data["base"]["metrics"][key] <= hi
            lo, hi = ft["ratio_ci95"][key]
            assert lo <= ft["metrics"][key] / data["base"]["metrics"][key] <= hi
        for check in ft["checks"]:
            assert {"id", "metric", "op", "bound", "value", "passed"} <= set(check)
        assert isinstance(ft["passed"], bool)
    assert [ft["passed"] for ft in data["finetunes"]] == [True, False]
    sidecar = workdir / data["features_file"]
    import numpy as np

    with np.load(sidecar) as arrays:
        names = set(arrays.files)
    for ft in ("toy-prose", "toy-code"):
        for key in ("density_base", "density_finetune", "activation_similarity", "logit_similarity", "dead_activation_error"):
            assert f"s0::vec::{ft}::{key}" in names


def test_zoo_numbers_tell_the_two_finetunes_apart(gate_run: tuple[pytest.RunResult, Path]) -> None:
    _, workdir = gate_run
    data = read_one_sae(workdir / "r.json")
    prose, code = data["finetunes"]
    assert prose["metrics"]["ce_loss_delta"] < code["metrics"]["ce_loss_delta"]
    assert prose["metrics"]["explained_variance"] > code["metrics"]["explained_variance"]
    assert prose["paired"]["resid_cosine_mean"] > code["paired"]["resid_cosine_mean"]
    assert prose["paired"]["activation_similarity_mean"] > code["paired"]["activation_similarity_mean"]


def test_report_dir_holds_plots_html_and_markdown(gate_run: tuple[pytest.RunResult, Path]) -> None:
    _, workdir = gate_run
    out = workdir / "out"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert any("resid_cosine_hist" in n for n in pngs) and any("density" in n for n in pngs), pngs
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "toy-code" in html and 'src="http' not in html
    md = (out / "summary.md").read_text()
    assert "toy-code" in md and "FAIL" in md
    assert (workdir / "step_summary.md").read_text() == md or "toy-code" in (workdir / "step_summary.md").read_text()
    assert not list(out.glob(".*.tmp"))


def test_junit_carries_metric_values(gate_run: tuple[pytest.RunResult, Path]) -> None:
    import xml.etree.ElementTree as ET

    _, workdir = gate_run
    tree = ET.parse(workdir / "junit.xml")
    cases = [c for c in tree.iter("testcase") if c.get("name") == "finetune.l0:ratio<=1.5"]
    assert len(cases) == 2
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert props["sae_check"] == "finetune.l0:ratio<=1.5"
        assert float(props["sae_bound"]) == 1.5 and "sae_value" in props and "sae_base_value" in props
        assert "sae_ci95" in props  # the paired interval of the ratio


def test_rerun_after_threshold_edit_reads_the_cache(pytester: pytest.Pytester, shared_cache: str, gate_run: tuple[pytest.RunResult, Path]) -> None:
    pytester.path.joinpath("loose.toml").write_text(
        '[profile]\nextends = "toy-res"\n\n[finetune.ce_loss_delta]\nmax = 1000.0\n'
    )
    result = pytester.runpytest_subprocess(*ZOO, "--finetune", "toy-code", "--sae-cache-dir", shared_cache,
                                           "--sae-thresholds", "loose.toml", "--sae-report", "again.json", "-k", "ce_loss_delta")
    assert result.ret == 0, result.stdout.str()
    data = read_one_sae(pytester.path.joinpath("again.json"))
    assert data["config"]["provenance"] == {"base": "cache", "toy-code": "cache"}
    first = read_one_sae(gate_run[1] / "r.json")
    assert data["finetunes"][0]["metrics"] == first["finetunes"][1]["metrics"]


def test_k_selects_one_finetune(pytester: pytest.Pytester, shared_cache: str, gate_run: tuple[pytest.RunResult, Path]) -> None:
    result = pytester.runpytest_subprocess(*ZOO, "--finetune", "toy-prose", "--finetune", "toy-code",
                                           "--sae-cache-dir", shared_cache, "-k", "toy-prose")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=len([c for c in read_one_sae(gate_run[1] / "r.json")["finetunes"][0]["checks"]
                                       if c["severity"] in ("fail", "warn")]))


def test_marker_and_fixtures_in_a_user_test_file(pytester: pytest.Pytester, shared_cache: str) -> None:
    pytester.makeini(f"[pytest]\nsae_cache_dir = {shared_cache}\n")
    pytester.makepyfile(
        test_mine=f"""
import pytest
import torch
from pytest_sae_transfer.assertions import assert_features_similar, assert_metric, assert_close_to_base

pytestmark = pytest.mark.sae_transfer(release="toy-res", finetune=["toy-prose", "toy-code"], n_tokens={TOKENS})

def test_fixtures(transfer_result, finetune_name, finetune_model, base_model, sae, sae_tokens, sae_transfer_config):
    assert transfer_result.name == finetune_name
    assert sae_tokens.shape[1] == sae.cfg.metadata.context_size
    assert finetune_model.cfg.d_model == base_model.cfg.d_model == sae.cfg.d_in
    assert sae_transfer_config.sae_release == "toy-res"
    assert transfer_result.base.l0 == transfer_result.report.base.metrics["l0"]
    assert transfer_result.activation_similarity.shape == (sae.cfg.d_sae,)
    assert -1 <= transfer_result.resid_cosine_mean <= 1

def test_prose_features_keep_their_activations(transfer_result):
    if transfer_result.name != "toy-prose":
        pytest.skip("only for the mild finetune")
    assert_features_similar(transfer_result, min_similarity=0.5, min_fraction=0.8)
    assert_close_to_base(transfer_result, "ce_loss_delta", max_increase=0.3)

def test_reconstruction_holds(transfer_result):
    assert_metric(transfer_result, "explained_variance", min=0.6)
"""
    )
    result = pytester.runpytest_subprocess("-rA")
    out = result.stdout.str()
    assert "test_fixtures[toy-prose] PASSED" in out or "PASSED test_mine.py::test_fixtures[toy-prose]" in out, out
    assert "PASSED test_mine.py::test_fixtures[toy-code]" in out
    assert "PASSED test_mine.py::test_prose_features_keep_their_activations[toy-prose]" in out
    assert "PASSED test_mine.py::test_reconstruction_holds[toy-prose]" in out
    assert "FAILED test_mine.py::test_reconstruction_holds[toy-code]" in out
    # The helper's message shows what was obtained and what was expected.
    assert "obtained:" in out and "expected: >= 0.6" in out
    assert result.ret == 1


def test_fixtures_without_a_configuration_are_a_usage_error(pytester: pytest.Pytester) -> None:
    """A missing SAE must not turn a custom test into a skip (a misspelt variable would make CI green)."""
    pytester.makepyfile("def test_needs_pair(transfer_result):\n    assert False\n")
    result = pytester.runpytest_subprocess("-rs")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    err = result.stderr.str()
    assert "no SAE is configured" in err and "--sae-release" in err and "test_needs_pair" in err
    assert "skip_if_unconfigured=True" in err and "Traceback" not in err


def test_fixtures_skip_when_the_marker_asks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "import pytest\n\n"
        "@pytest.mark.sae_transfer(skip_if_unconfigured=True)\n"
        "def test_needs_pair(transfer_result):\n    assert False\n"
    )
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(skipped=1)
    assert "no SAE is configured" in result.stdout.str()


def test_xdist_gives_the_serial_report(pytester: pytest.Pytester, tmp_path: Path, gate_run: tuple[pytest.RunResult, Path]) -> None:
    fresh_cache = tmp_path / "xdist-cache"
    result = pytester.runpytest_subprocess(*ZOO, "--finetune", "toy-prose", "--finetune", "toy-code", "-n", "2",
                                           "--sae-cache-dir", str(fresh_cache), "--sae-report", "x.json")
    assert result.ret == 1, result.stdout.str()
    parallel = read_one_sae(pytester.path.joinpath("x.json"))
    serial = read_one_sae(gate_run[1] / "r.json")
    assert [f["model"] for f in parallel["finetunes"]] == ["toy-prose", "toy-code"]
    # Each worker runs torch on its share of the cores, the serial run on all of them: another
    # float32 summation order, hence a 1e-6 tolerance (the verdicts must agree exactly).
    rel = 1e-6
    assert parallel["base"]["metrics"] == pytest.approx(serial["base"]["metrics"], rel=rel)
    for p, s in zip(parallel["finetunes"], serial["finetunes"]):
        assert p["metrics"] == pytest.approx(s["metrics"], rel=rel)
        for key, value in s["paired"].items():
            if value is None or isinstance(value, list):
                assert p["paired"][key] == value or value is not None, key  # nulls stay null
                if isinstance(value, list):
                    assert [v is None for v in p["paired"][key]] == [v is None for v in value], key
            else:
                assert p["paired"][key] == pytest.approx(value, rel=rel), key
        assert [c["passed"] for c in p["checks"]] == [c["passed"] for c in s["checks"]]
    # Each pair was evaluated once; the base was computed by one worker and read from the cache by the other.
    workers = parallel["config"]["provenance_by_worker"]
    assert len(workers) == 2
    assert sorted(w["base"] for w in workers) == ["cache", "computed"]
    assert sorted(k for w in workers for k, v in w.items() if v == "computed" and k != "base") == ["toy-code", "toy-prose"]


def test_too_few_tokens_fails_loudly(pytester: pytest.Pytester) -> None:
    """127 tokens are too few to judge: the gate fails on the evidence check, saying so,
    instead of passing a finetune on noise."""
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "--finetune", "toy-prose", "--sae-tokens", "100",
                                           "-p", "no:randomly", "-p", "no:cacheprovider", "--sae-no-cache")
    text = "\n".join(result.outlines + result.errlines)
    assert result.ret == 1, text
    assert "FAILED toy-prose::finetune.n_tokens>=1000" in text
    assert "measured on only 127 tokens, too few to judge" in text
