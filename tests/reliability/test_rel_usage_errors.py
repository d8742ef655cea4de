"""Bad input: one clear pytest usage error (exit 4) that names the problem and the fix.

Never an INTERNALERROR, never a traceback. Cases already covered by
tests/test_plugin_options.py are not repeated here: --sae-tokens 0 / -5,
--sae-batch-size 0, non-numeric --sae-tokens, unknown --sae-device (tpu) and
--sae-dtype (float64), and a threshold file with an unknown metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from rel_fixtures import CONTEXT, HIDDEN, HOOK, LAYERS, TOKENS
from rel_runner import plugin_args


def _release(fx: dict[str, Any], tmp: Path) -> list[str]:
    return plugin_args(fx, sae_path=None) + ["--sae-release", "gemma-2b-res-jbb"]


def _sae_id(fx: dict[str, Any], tmp: Path) -> list[str]:
    return plugin_args(fx, sae_path=None) + ["--sae-release", "gemma-2b-res-jb", "--sae-id", "blocks.6.hook_resid_pots"]


def _cache_under_a_file(fx: dict[str, Any], tmp: Path) -> list[str]:
    blocker = tmp / "not-a-directory"
    blocker.write_text("x", encoding="utf-8")
    return plugin_args(fx, cache=str(blocker / "cache"))


def _profile(text: str) -> Callable[[dict[str, Any], Path], list[str]]:
    def args(fx: dict[str, Any], tmp: Path) -> list[str]:
        path = tmp / "gate.toml"
        path.write_text(text, encoding="utf-8")
        return plugin_args(fx, sae_thresholds=str(path))

    return args


def _with(**overrides: Any) -> Callable[[dict[str, Any], Path], list[str]]:
    def args(fx: dict[str, Any], tmp: Path) -> list[str]:
        resolved = {k: (fx[v[3:]] if isinstance(v, str) and v.startswith("fx:") else v) for k, v in overrides.items()}
        finetunes = resolved.pop("finetunes", ("ft",))
        return plugin_args(fx, finetunes=finetunes, **resolved)

    return args


CASES: dict[str, tuple[Callable[[dict[str, Any], Path], list[str]], tuple[str, ...]]] = {
    # names that do not exist: the nearest valid names are suggested
    "unknown-release": (_release, ("unknown SAE release 'gemma-2b-res-jbb'", "did you mean 'gemma-2b-res-jb'", "--sae-path")),
    "unknown-sae-id": (_sae_id, ("unknown SAE id 'blocks.6.hook_resid_pots'", "did you mean 'blocks.6.hook_resid_post'")),
    # local paths that do not exist
    "missing-sae-path": (_with(sae_path="/nonexistent/sae"), ("--sae-path '/nonexistent/sae' does not exist", "cfg.json")),
    "missing-base-model": (_with(base_model="/nonexistent/base"), ("--base-model '/nonexistent/base' does not exist", "save_pretrained")),
    "missing-finetune": (_with(finetunes=("/nonexistent/ft",)), ("--finetune '/nonexistent/ft' does not exist", "save_pretrained")),
    "missing-dataset": (_with(sae_dataset="/nonexistent/data.jsonl"), ("dataset path '/nonexistent/data.jsonl' does not exist", "--sae-dataset")),
    # shapes that do not fit
    "sae-width": (_with(sae_path="fx:sae_wide"), (f"the SAE reads {HIDDEN + 16}-dimensional activations",
                                                  f"width at {HOOK} is {HIDDEN}", "d_in must equal")),
    "hook-too-deep": (_with(sae_path="fx:sae_deep"), ("beyond the model's depth", f"it has {LAYERS} layers", "--base-model")),
    "finetune-width": (_with(finetunes=("ft_wide",)), ("does not have the base model's architecture", f"d_model={HIDDEN + 16}",
                                                       f"d_model={HIDDEN}", "must keep its architecture and width")),
    "finetune-architecture": (_with(finetunes=("ft_arch",)), ("does not have the base model's architecture", "MistralForCausalLM",
                                                              "GPT2LMHeadModel")),
    "tokenizer-mismatch": (_with(finetunes=("ft_tok",)), ("finetune 'ft_tok'", "the finetune tokenizer does not match the base tokenizer",
                                                          "encode differently", "--sae-allow-tokenizer-mismatch")),
    # datasets that cannot supply the tokens
    "too-few-tokens": (_with(sae_dataset="fx:small"), ("has only {small_tokens} tokens", f"--sae-tokens asks for {TOKENS}",
                                                       "--sae-context-size")),
    "fewer-tokens-than-asked": (_with(sae_tokens="100000"), ("has only {data_tokens} tokens", "--sae-tokens asks for 100000",
                                                             "lower --sae-tokens to at most")),
    "only-empty-rows": (_with(sae_dataset="fx:empty"), ("has no tokens to evaluate", "2 rows, 2 of them empty")),
    "no-rows": (_with(sae_dataset="fx:nothing"), ("has no rows", "nothing to evaluate")),
    "only-special-tokens": (_with(sae_dataset="fx:special"), ("every token is a special token", "nothing to evaluate")),
    # sizes (zero/negative tokens and batch size 0 are in test_plugin_options.py)
    "negative-batch-size": (_with(sae_batch_size="-3"), ("--sae-batch-size must be at least 1; got -3",)),
    "context-size-one": (_with(sae_context_size="1"), ("--sae-context-size must be at least 2; got 1",)),
    # devices that are not there
    "cuda-without-cuda": (_with(sae_device="cuda"), ("device 'cuda' was asked for, but CUDA is not available here", "--sae-device cpu")),
    "cuda-index-without-cuda": (_with(sae_device="cuda:1"), ("device 'cuda:1'", "--sae-device cpu")),
    "mps-without-mps": (_with(sae_device="mps"), ("device 'mps' was asked for", "--sae-device cpu")),
    "bad-cuda-index": (_with(sae_device="cuda:x"), ("--sae-device: unknown device 'cuda:x'", "cuda:<index>")),
    # a cache directory that cannot be written
    "cache-dir-unwritable": (_cache_under_a_file, ("the result cache directory", "cannot be written", "--sae-cache-dir",
                                                   "--sae-no-cache")),
    # malformed threshold files (an unknown metric is in test_plugin_options.py)
    "thresholds-syntax": (_profile("[finetune.ce_loss_delta\nmax = 0.5\n"), ("gate.toml: TOML syntax error", "line 1")),
    "thresholds-operator": (_profile("[finetune.ce_loss_delta]\nmaximum = 0.5\n"), ("gate.toml", "key 'maximum'", "did you mean 'max'")),
    "thresholds-not-a-number": (_profile('[finetune.ce_loss_delta]\nmax = "0.5"\n'), ("gate.toml", "key 'max'", "must be a number")),
    "thresholds-nan-bound": (_profile("[finetune.ce_loss_delta]\nmax = nan\n"), ("gate.toml", "key 'max'", "must be finite")),
    "thresholds-unknown-scope": (_profile("[finetuned.ce_loss_delta]\nmax = 0.5\n"), ("gate.toml", "unknown scope 'finetuned'", "did you mean 'finetune'")),
}

NEEDS_ABSENT = {"cuda-without-cuda": "cuda", "cuda-index-without-cuda": "cuda", "mps-without-mps": "mps"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_usage_error(case: str, fx: dict[str, Any], run_plugin: Any, tmp_path: Path) -> None:
    backend = NEEDS_ABSENT.get(case)
    if backend == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if backend == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    make_args, needles = CASES[case]
    run = run_plugin(*make_args(fx, tmp_path))
    run.assert_clean_usage_error(*(n.format(**fx) for n in needles))
    assert not list(run.cwd.glob("r.json")), "a failed run must not write a report"


def test_every_problem_the_configs_show_comes_in_one_message(fx: dict[str, Any], run_plugin: Any) -> None:
    """A wrong SAE width, a finetune of another width, one of another architecture, one with another
    tokenizer and a hook beyond the model: one usage error lists them all, each naming its SAE or
    finetune, before the dataset (which does not exist either) or any weight is read."""
    run = run_plugin(*plugin_args(fx, finetunes=("ft_wide", "ft_arch", "ft_tok"), sae_path=fx["sae_wide"],
                                  sae_dataset="/nonexistent/data.jsonl"), "--sae-path", fx["sae_deep"])
    run.assert_clean_usage_error(
        "problems with the inputs",
        f"SAE 'sae_wide' ({fx['sae_wide']}/cfg.json): the SAE reads {HIDDEN + 16}-dimensional activations",
        "SAE 'sae_deep'", "beyond the model's depth",
        "finetune 'ft_wide'", f"d_model={HIDDEN + 16}",
        "finetune 'ft_arch'", "MistralForCausalLM",
        "finetune 'ft_tok'", "does not match the base tokenizer",
        "dataset path '/nonexistent/data.jsonl' does not exist",
    )


def test_bad_input_under_xdist_is_a_usage_error_too(fx: dict[str, Any], tmp_path: Path) -> None:
    """The xdist controller collects nothing, but reads the config files itself: exit 4, not test errors."""
    from rel_runner import finish, start_subprocess

    cwd = tmp_path / "xdist"
    run = finish(start_subprocess(cwd, *plugin_args(fx, finetunes=("ft_wide",), sae_path=fx["sae_wide"]), "-n", "2"), cwd)
    run.assert_clean_usage_error(f"the SAE reads {HIDDEN + 16}-dimensional activations", "finetune 'ft_wide'")


def test_finetune_labels_name_the_report_and_the_ids(fx: dict[str, Any], run_plugin: Any) -> None:
    """``--finetune LABEL=PATH`` names a finetune; a path without a label is shown by its directory name."""
    run = run_plugin(*plugin_args(fx, finetunes=()), "--finetune", f"calm={fx['ft']}", "--finetune", fx["ft2"], "-rA")
    assert run.ret == 0, run.text
    report = run.report()
    assert [ft["model"] for ft in report["finetunes"]] == ["calm", "ft2"]
    assert report["config"]["finetunes"] == ["calm", "ft2"]
    assert report["config"]["finetune_sources"] == {"calm": fx["ft"], "ft2": fx["ft2"]}
    assert set(report["config"]["provenance"]) == {"base", "calm", "ft2"}
    assert "provenance_by_worker" not in report["config"]  # a serial run has no workers
    assert "PASSED calm::finetune.nonfinite_fraction<=0" in run.text
    assert "PASSED ft2::finetune.nonfinite_fraction<=0" in run.text
    assert fx["root"] not in "\n".join(line for line in run.out.splitlines() if line.startswith("PASSED"))


def test_handled_sae_lens_warning_is_not_shown(fx: dict[str, Any], run_plugin: Any, tmp_path: Path) -> None:
    """An SAE with model_from_pretrained_kwargs: sae_lens warns on every load, but the plugin honours them."""
    import json
    import shutil

    sae = tmp_path / "sae_kwargs"
    shutil.copytree(fx["sae"], sae)
    cfg = json.loads((sae / "cfg.json").read_text())
    cfg["metadata"]["model_from_pretrained_kwargs"] = {"center_writing_weights": False}
    (sae / "cfg.json").write_text(json.dumps(cfg))
    run = run_plugin(*plugin_args(fx, sae_path=str(sae)))
    assert run.ret == 0, run.text
    assert "model_from_pretrained_kwargs" not in run.text, run.text


def test_tokenizer_mismatch_allowed_becomes_a_note(fx: dict[str, Any], run_plugin: Any) -> None:
    run = run_plugin(*plugin_args(fx, finetunes=("ft_tok",), sae_allow_tokenizer_mismatch=True))
    assert run.ret == 0, run.text
    notes = run.report()["config"]["notes"]
    assert any("does not match the base tokenizer" in n and "Evaluated anyway" in n for n in notes), notes
    assert "does not match the base tokenizer" in run.text  # the terminal summary shows it too


def test_empty_rows_are_skipped_and_counted(fx: dict[str, Any], canonical: Any) -> None:
    tokens = canonical.report()["config"]["tokens"]
    assert tokens["rows_empty"] == 2, tokens  # the data set's first two rows are empty
    assert tokens["n_tokens"] == TOKENS and tokens["n_contexts"] == TOKENS // CONTEXT
    assert tokens["rows_read"] > tokens["rows_empty"]
