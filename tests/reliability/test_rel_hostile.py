"""Hostile or untrusted files: no code runs from a checkpoint, a profile or a config, and
nothing is written outside the directories the user named."""

from __future__ import annotations

import os
import pickle
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rel_fixtures import _evil_pickle
from rel_runner import plugin_args


def test_pickle_only_checkpoint_never_runs_its_payload(fx: dict[str, Any], run_plugin: Any) -> None:
    """A finetune with only a pytorch_model.bin whose pickle calls os.system on load."""
    marker = Path(fx["pickle_marker"])
    run = run_plugin(*plugin_args(fx, finetunes=("ft_pickle",)))
    assert not marker.exists(), "the checkpoint's pickle payload ran"
    # refused by torch.load(weights_only=True), as one clear usage error
    run.assert_clean_usage_error("could not load the weights", fx["ft_pickle"], "Weights only load failed")
    # control: the payload is live, unpickling the file the unsafe way does run it
    pickle.loads((Path(fx["ft_pickle"]) / "pytorch_model.bin").read_bytes())
    assert marker.exists()
    marker.unlink()


def test_sae_weights_are_only_read_from_safetensors(fx: dict[str, Any], run_plugin: Any, tmp_path: Path) -> None:
    sae = tmp_path / "sae_pickle"
    sae.mkdir()
    shutil.copy(Path(fx["sae"]) / "cfg.json", sae / "cfg.json")
    marker = tmp_path / "PWNED-sae"
    (sae / "sae_weights.pt").write_bytes(_evil_pickle(marker))
    run = run_plugin(*plugin_args(fx, sae_path=str(sae)))
    run.assert_clean_usage_error("has no sae_weights.safetensors", "only safetensors weights are loaded")
    assert not marker.exists()


def test_remote_code_stays_off_unless_trusted(fx: dict[str, Any], run_plugin: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose config.json has an auto_map pointing at its own evil_config.py."""
    marker = Path(fx["remote_marker"])
    run = run_plugin(*plugin_args(fx, finetunes=("ft_remote",)))
    assert run.ret == 0, run.text  # loaded as the plain GPT-2 it declares (model_type), without its code
    assert not marker.exists(), "the checkpoint's custom code ran without --sae-trust-remote-code"

    # control: with the flag, transformers does import the checkpoint's code
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    run_plugin(*plugin_args(fx, finetunes=("ft_remote",), sae_trust_remote_code=True))
    assert marker.exists(), "control failed: the payload never runs, so the first half proves nothing"
    marker.unlink()


def test_threshold_files_are_data_never_code(fx: dict[str, Any], run_plugin: Any, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED-toml"
    code = f"__import__('os').system('touch {marker}')"
    evil_py = tmp_path / "evil.py"
    evil_py.write_text(code + "\n", encoding="utf-8")
    profiles = {
        "expression.toml": f"[finetune.ce_loss_delta]\nmax = {code}\n",
        "extends-python.toml": '[profile]\nextends = "./evil.py"\n',
    }
    for name, text in profiles.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        run = run_plugin(*plugin_args(fx, sae_thresholds=str(tmp_path / name)))
        run.assert_clean_usage_error("TOML syntax error")
        assert not marker.exists(), name
    # valid TOML that holds code in a string is read as a string
    from pytest_sae_transfer.thresholds import load_profile

    (tmp_path / "string.toml").write_text(f'[profile]\ndescription = "{code}"\n[finetune.l0]\nmax = 1e9\n', encoding="utf-8")
    assert load_profile(str(tmp_path / "string.toml")).description == code
    assert not marker.exists()


def test_report_files_stay_inside_the_report_directory(fx: dict[str, Any], run_plugin: Any, tmp_path: Path) -> None:
    """A finetune given as '../ft' (a relative path with '..' and '/') is named 'ft', and writes
    its plots and pages into --sae-report-dir, and nothing anywhere else."""
    top = tmp_path / "top"
    work = top / "a" / "work"
    work.mkdir(parents=True)
    (top / "a" / "ft").symlink_to(fx["ft"], target_is_directory=True)
    before = {p for p in top.rglob("*")}
    run = run_plugin(*plugin_args(fx, finetunes=("../ft",), sae_report_dir="out"), cwd=work)
    assert run.ret == 0, run.text
    assert run.report()["finetunes"][0]["model"] == "ft"
    assert run.report()["config"]["finetune_sources"] == {"ft": "../ft"}
    new = {p for p in top.rglob("*")} - before
    out = work / "out"
    allowed = {work / "r.json", work / "r.features.npz", out}
    outside = sorted(str(p) for p in new if p not in allowed and out not in p.parents)
    assert outside == [], outside
    pngs = [p.name for p in out.iterdir() if p.suffix == ".png"]
    assert pngs and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.png", n) and ".." not in n for n in pngs), pngs


def test_report_file_names_are_safe_for_any_finetune_name() -> None:
    from types import SimpleNamespace

    from pytest_sae_transfer.render.plots import finetune_slugs

    names = ["../../etc/passwd", "/abs/model", "..", ".", "a/b", "A/B", "C:\\x\\..\\y", "x" * 300, ""]
    report = SimpleNamespace(finetunes=[SimpleNamespace(model=n) for n in names])
    slugs = finetune_slugs(report)
    assert len({s.lower() for s in slugs.values()}) == len(names)  # unique, even on case-insensitive disks
    for slug in slugs.values():
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", slug) and len(slug) <= 90, slug


def test_cache_keys_are_hex_and_stay_inside_the_cache(tmp_path: Path) -> None:
    from pytest_sae_transfer.session.cache import ResultCache, cache_key

    key = cache_key({"finetune": "../../etc", "base": "/abs/path"})
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    cache = ResultCache(tmp_path / "cache")
    for bad in ("../x", "/etc/passwd", "..", "ABC", "", "a/b", "0" * 31 + "g"):
        with pytest.raises(ValueError, match="hex"):
            cache.get(bad)
        with pytest.raises(ValueError, match="hex"):
            cache.put(bad, {}, {})
        with pytest.raises(ValueError, match="hex"):
            with cache.lock(bad):
                pass
    assert {p.name for p in tmp_path.iterdir()} <= {"cache"}
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("case, needle", [
    ("sae_huge", "d_sae=5000000 is larger than this plugin accepts"),
    ("sae_negative", "d_in must be a positive integer; got -32"),
    ("sae_zero", "d_sae must be a positive integer; got 0"),
    ("sae_text", "d_sae must be a positive integer; got '64'"),
])
def test_crafted_sae_config_is_rejected_before_any_allocation(case: str, needle: str, fx: dict[str, Any], run_plugin: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import sae_lens

    built: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        built.append(repr(args)[:200])
        raise AssertionError("the SAE was constructed from a hostile config")

    monkeypatch.setattr(sae_lens.SAE, "load_from_disk", classmethod(refuse))
    monkeypatch.setattr(sae_lens.SAE, "from_dict", classmethod(refuse))
    run_plugin(*plugin_args(fx, sae_path=fx[case]))  # warm-up: first-call imports are not measured below
    peak_before, rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _rss_bytes()
    started = time.perf_counter()
    run = run_plugin(*plugin_args(fx, sae_path=fx[case]))
    elapsed = time.perf_counter() - started
    run.assert_clean_usage_error(str(Path(fx[case]) / "cfg.json"), needle)
    assert built == [], built  # rejected from cfg.json alone: no SAE object, no weight tensor
    assert elapsed < 15, f"rejecting a bad config took {elapsed:.1f}s"
    assert _rss_bytes() - rss_before < 64 << 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 64 << 10  # ru_maxrss is in KiB
