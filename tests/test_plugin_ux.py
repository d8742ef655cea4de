"""What a user meets on the quick start and on common mistakes, each through a real pytest
process on the toy zoo: exit code, report and summary agree under -k; the header counts
and --collect-only tell the truth; custom tests without a configuration fail loudly;
one-line hints for a release without finetune, a flag without value, ini keys and zoo
names; short ids that xdist does not change; warnings located at their check.

The runs share one result cache, so the zoo is evaluated once (at 8192 tokens) and the
other runs read it back.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from helpers import read_one_sae

pytest_plugins = ["pytester"]

ZOO = ["--sae-release", "toy-res", "--sae-tokens", "8192"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("ux-cache"))


def _gate(pytester: pytest.Pytester, cache: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*ZOO, "--sae-cache-dir", cache, "-p", "no:cacheprovider", *args)


def _outcomes(result: pytest.RunResult) -> dict[str, str]:
    """nodeid -> PASSED/FAILED from the -rA short summary."""
    out = {}
    for line in result.outlines:
        for word in ("PASSED", "FAILED"):
            if line.startswith(word + " "):
                out[line[len(word) + 1:].split(" - ")[0]] = word
    return out


# -- exit code, report, summary and counts agree -------------------------------------------


def _header_counts(result: pytest.RunResult) -> tuple[int, int, int]:
    text = result.stdout.str()
    match = re.search(r"collected (\d+) items? / (\d+) deselected / (-?\d+) selected", text)
    assert match, text
    collected, deselected, selected = (int(g) for g in match.groups())
    return collected, deselected, selected


def test_k_selection_exit_code_report_and_summary_agree(pytester: pytest.Pytester, cache: str) -> None:
    """-k nonfinite on the failing finetune: the selected checks pass, so everything says PASS."""
    result = _gate(pytester, cache, "--finetune", "toy-code", "-k", "nonfinite", "--sae-report", "k.json")
    out = result.stdout.str()
    assert result.ret == 0, out
    raw = json.loads(pytester.path.joinpath("k.json").read_text())
    assert raw["passed"] is True and raw["saes"][0]["passed"] is True
    ft = read_one_sae(pytester.path / "k.json")["finetunes"][0]
    assert ft["passed"] is True
    assert ft["checks"] and all("nonfinite" in c["id"] for c in ft["checks"])
    assert ft["deselected"] and not any("nonfinite" in d for d in ft["deselected"])
    assert "finetune.l0:ratio<=1.5" in ft["deselected"]  # a failing check, deselected: not counted
    assert "overall: PASS" in out and "overall: FAIL" not in out
    assert f"{len(ft['deselected'])} checks deselected" in out
    collected, deselected, selected = _header_counts(result)
    assert (collected, deselected, selected) == (len(ft["checks"]) + len(ft["deselected"]), len(ft["deselected"]), len(ft["checks"]))


def test_k_selection_of_a_failing_check_fails_everywhere(pytester: pytest.Pytester, cache: str) -> None:
    result = _gate(pytester, cache, "--finetune", "toy-code", "-k", "l0", "--sae-report", "l0.json")
    assert result.ret == 1, result.stdout.str()
    ft = read_one_sae(pytester.path / "l0.json")["finetunes"][0]
    assert ft["passed"] is False and all(".l0" in c["id"] for c in ft["checks"])
    assert "overall: FAIL" in result.stdout.str()


def test_collect_only_reports_the_items_it_lists(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "--finetune", "toy-code", "--finetune", "toy-prose",
                                           "--collect-only", "-q", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    listed = [line for line in result.outlines if "::" in line]
    assert listed and f"{len(listed)} tests collected" in result.stdout.str()
    assert "no tests collected" not in result.stdout.str()
    verbose = pytester.runpytest_subprocess("--sae-release", "toy-res", "--finetune", "toy-code", "--collect-only",
                                            "-p", "no:cacheprovider")
    assert f"collected {len(listed) // 2} items" in verbose.stdout.str()


# -- custom tests without a configuration ---------------------------------------------------


def test_misspelt_environment_variable_is_a_usage_error(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("def test_pair(transfer_result):\n    assert transfer_result.ce_loss_delta < 1\n")
    monkeypatch.setenv("PYTEST_SAE_RELEAS", "toy-res")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "environment variable PYTEST_SAE_RELEAS is not an option of pytest-sae-transfer (did you mean PYTEST_SAE_RELEASE?)" \
        in result.stderr.str()


def test_fixture_needing_a_finetune_names_the_missing_option(pytester: pytest.Pytester) -> None:
    """The SAE alone serves ``sae``; ``transfer_result`` needs a finetune too, and says so."""
    pytester.makepyfile(
        "def test_sae(sae):\n    assert sae.cfg.d_in == 128\n\n"
        "def test_pair(transfer_result):\n    assert False\n"
    )
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    err = result.stderr.str()
    assert "1 test uses the sae-transfer fixtures, but no finetune is configured: pass --finetune NAME" in err
    assert "test_pair[unconfigured]" in err and "test_sae" not in err
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "-p", "no:cacheprovider", "-k", "test_sae")
    result.assert_outcomes(passed=1, deselected=1)


# -- hints ------------------------------------------------------------------------------------


def test_release_without_finetune_gets_a_hint(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert "--sae-release toy-res names an SAE but no finetune is given" in result.stdout.str()
    assert "--finetune NAME" in result.stdout.str()


def test_flag_without_value_says_what_it_wants(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "--finetune")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--finetune needs a value" in err and "--finetune toy-code" in err and "expected one argument" not in err


def test_zoo_name_typo_gets_a_did_you_mean_before_the_hub(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # A hub that would never answer: reaching it at all would hang, not give this message.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://10.255.255.1")
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "--finetune", "toy-cod", timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--finetune 'toy-cod' is not a toy-zoo model (did you mean 'toy-code'?" in err
    assert "cache" not in err


@pytest.mark.parametrize("key", ["sae_finetune", "sae_finetunes"])
def test_ini_key_for_finetunes_reads_singular_or_plural(pytester: pytest.Pytester, key: str) -> None:
    pytester.makeini(f"[pytest]\nsae_release = toy-res\n{key} =\n    toy-code\n    toy-prose\n")
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    assert "toy-code::finetune.l0:ratio<=1.5" in result.stdout.str() and "toy-prose::" in result.stdout.str()
    assert "Unknown config option" not in result.stdout.str() + result.stderr.str()


def test_unknown_sae_ini_key_gets_a_did_you_mean(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsae_relase = toy-res\nsae_finetune = toy-code\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini key sae_relase is not an option of pytest-sae-transfer (did you mean sae_release?)" in result.stderr.str()


# -- short, stable ids --------------------------------------------------------------------------


def test_paths_are_shown_by_directory_name(pytester: pytest.Pytester) -> None:
    """Collect-only loads nothing, so plain directories do: ids never carry a path or '../'.
    (The ini file fixes the rootdir here, as a project's would: without one, pytest roots the run at
    the common ancestor of every existing path on the command line, and -q prints ids from there.)"""
    pytester.makeini("[pytest]\n")
    for sub in ("a/ft", "b/ft", "c/solo"):
        pytester.path.joinpath(sub).mkdir(parents=True)
    outside = pytester.path.parent / f"{pytester.path.name}-outside" / "other"
    outside.mkdir(parents=True)
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "--finetune", "a/ft", "--finetune", "./b/ft",
                                           "--finetune", "c/solo", "--finetune", str(outside), "--finetune", "named=../x",
                                           "--collect-only", "-q", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    heads = {line.split("::")[0] for line in result.outlines if "::" in line}
    assert heads == {"a/ft", "b/ft", "solo", "other", "named"}, heads


def test_xdist_keeps_the_ids_and_every_provenance(pytester: pytest.Pytester, cache: str) -> None:
    serial = _gate(pytester, cache, "--finetune", "toy-prose", "--finetune", "toy-code", "-rA", "--sae-report", "s.json")
    parallel = _gate(pytester, cache, "--finetune", "toy-prose", "--finetune", "toy-code", "-rA", "-n", "2",
                     "--sae-report", "p.json")
    assert serial.ret == parallel.ret == 1, parallel.stdout.str()
    assert _outcomes(parallel) == _outcomes(serial) and len(_outcomes(serial)) == 54  # 27 default checks per finetune
    assert not any("@" in nodeid for nodeid in _outcomes(parallel))
    s_cfg = read_one_sae(pytester.path / "s.json")["config"]
    p_cfg = read_one_sae(pytester.path / "p.json")["config"]
    assert set(s_cfg["provenance"]) == set(p_cfg["provenance"]) == {"base", "toy-prose", "toy-code"}
    assert "provenance_by_worker" not in s_cfg
    workers = p_cfg["provenance_by_worker"]
    assert len(workers) == 2 and sorted(k for w in workers for k in w if k != "base") == ["toy-code", "toy-prose"]


def test_xdist_workers_share_the_cores(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of N workers gets cores // N torch threads, not all of them."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile(
        "import os, torch\n\n"
        "def test_threads(sae, worker_id):\n"
        "    open(f'threads-{worker_id}.txt', 'w').write(str(torch.get_num_threads()))\n"
    )
    result = pytester.runpytest_subprocess("--sae-release", "toy-res", "-n", "2", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    written = list(pytester.path.glob("threads-*.txt"))
    assert written and all(int(p.read_text()) == max(1, cores // 2) for p in written)


# -- warnings -----------------------------------------------------------------------------------


def test_warn_check_points_at_its_table(pytester: pytest.Pytester, cache: str) -> None:
    profile = pytester.path / "gate.toml"
    profile.write_text('[profile]\nextends = "toy-res"\n\n[finetune.l0]\nmax = 1\nseverity = "warn"\n')
    result = _gate(pytester, cache, "--finetune", "toy-code", "--sae-thresholds", "gate.toml", "-k", "finetune.l0")
    out = result.stdout.str()
    assert result.ret == 0, out
    assert "gate.toml:4: SAETransferWarning: toy-code: finetune.l0" in out, out
    assert "gate.py" not in out


def test_written_files_fit_on_a_line_unless_verbose() -> None:
    from pytest_sae_transfer.state import written_lines

    paths = ["r.json", "r.features.npz", "out/summary.md", "out/report.html"] + [f"out/toy-code__p{i}.png" for i in range(20)]
    assert written_lines(paths, verbose=False) == [
        "sae-transfer wrote r.json, r.features.npz",
        "sae-transfer wrote out/: summary.md, report.html, 20 plots (PNG)",
    ]
    assert written_lines(paths, verbose=True) == [f"sae-transfer wrote {p}" for p in paths]
    assert written_lines(["/abs/report.json"], verbose=False) == ["sae-transfer wrote /abs/report.json"]
