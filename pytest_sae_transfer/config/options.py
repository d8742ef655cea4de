"""The plugin's options: one table, each option a flag, an ini key and an environment variable."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

ENV_PREFIX = "PYTEST_SAE_"


def env_name(ini: str) -> str:
    """The environment variable of an ini key: ``sae_tokens`` -> ``PYTEST_SAE_TOKENS``."""
    return ENV_PREFIX + ini.removeprefix("sae_").upper()


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    dest: str
    flag: str
    ini: str
    help: str
    kind: str = "str"  # str | int | float | bool | list
    default: Any = None
    metavar: str | None = None

    @property
    def env(self) -> str:
        return env_name(self.ini)


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("sae_release", "--sae-release", "sae_release", "SAE release: a sae_lens registry name (e.g. gemma-2b-res-jb) or the bundled 'toy-res'", metavar="NAME"),
    OptionSpec("sae_ids", "--sae-id", "sae_id", "SAE id within the release (e.g. blocks.6.hook_resid_post), a glob over its ids ('blocks.*.hook_resid_post') or 'all'; repeat for several (ini: one per line; env: comma-separated)", kind="list", metavar="ID"),
    OptionSpec("sae_paths", "--sae-path", "sae_path", "a local SAE directory (cfg.json + sae_weights.safetensors), or a directory holding several, instead of a release; repeat for several", kind="list", metavar="DIR"),
    OptionSpec("base_model", "--base-model", "sae_base_model", "base model: a TransformerLens name, a local HF checkpoint or a zoo name (default: the model in the SAE's metadata)", metavar="MODEL"),
    OptionSpec("finetunes", "--finetune", "sae_finetunes", "a finetune to gate: HF id, local path or zoo name, optionally named as LABEL=MODEL (the label is its id in test ids and reports; a path is shown by its directory name otherwise); repeat for several (ini: one per line, also as sae_finetune; env: comma-separated)", kind="list", metavar="[LABEL=]MODEL"),
    OptionSpec("dataset", "--sae-dataset", "sae_dataset", "eval text: hub dataset, local .txt/.json/.jsonl/.parquet, or saved datasets dir (default: the SAE's metadata dataset)", metavar="DATASET"),
    OptionSpec("n_tokens", "--sae-tokens", "sae_tokens", "tokens to evaluate, rounded up to whole contexts (default 32768)", kind="int", default=32768, metavar="N"),
    OptionSpec("context_size", "--sae-context-size", "sae_context_size", "tokens per context (default: the SAE's metadata context size)", kind="int", metavar="N"),
    OptionSpec("batch_size", "--sae-batch-size", "sae_batch_size", "contexts per forward batch (default 8)", kind="int", default=8, metavar="N"),
    OptionSpec("device", "--sae-device", "sae_device", "auto, cpu, cuda or cuda:N (default auto: CUDA when present)", default="auto", metavar="DEVICE"),
    OptionSpec("dtype", "--sae-dtype", "sae_dtype", "auto, float32, bfloat16 or float16 (default auto: bfloat16 on CUDA, float32 on CPU)", default="auto", metavar="DTYPE"),
    OptionSpec("features", "--sae-features", "sae_features", "feature ids to watch, comma-separated (e.g. 12,40,311): each gets gate checks with the profile's default feature bounds and a card in the report", kind="list", metavar="IDS"),
    OptionSpec("thresholds", "--sae-thresholds", "sae_thresholds", "threshold profile: a bundled name (default, toy-res, ...) or a TOML file (default: the release's own profile, else 'default')", metavar="PROFILE"),
    OptionSpec("report", "--sae-report", "sae_report", "write the JSON report (and its .features.npz sidecar) to this path", metavar="PATH"),
    OptionSpec("report_dir", "--sae-report-dir", "sae_report_dir", "write plots (PNG), an HTML page and a markdown summary into this directory", metavar="DIR"),
    OptionSpec("no_cache", "--sae-no-cache", "sae_no_cache", "do not reuse cached results from earlier runs", kind="bool", default=False),
    OptionSpec("cache_dir", "--sae-cache-dir", "sae_cache_dir", "result cache directory (default $XDG_CACHE_HOME/pytest-sae-transfer)", metavar="DIR"),
    OptionSpec("outlier_norm", "--sae-outlier-norm", "sae_outlier_norm", "outlier mask: off (default), auto (2 x mean base norm), or a norm threshold", metavar="off|auto|NORM"),
    OptionSpec("include_special_tokens", "--sae-include-special-tokens", "sae_include_special_tokens", "count BOS/EOS/PAD positions in the statistics (default: excluded, as in sae_lens)", kind="bool", default=False),
    OptionSpec("shuffle_seed", "--sae-shuffle-seed", "sae_shuffle_seed", "shuffle dataset rows with this seed (default: rows in order)", kind="int", metavar="SEED"),
    OptionSpec("seed", "--sae-seed", "sae_seed", "seed for the bootstrap (default 0)", kind="int", default=0, metavar="SEED"),
    OptionSpec("n_bootstrap", "--sae-bootstrap", "sae_bootstrap", "bootstrap resamples for the 95%% intervals; 0 turns them off (default 1000)", kind="int", default=1000, metavar="N"),
    OptionSpec("sequential", "--sae-sequential", "sae_sequential", "load the base and each finetune one after the other, spilling the base's activations to disk (automatic on CUDA when they do not fit together)", kind="bool", default=False),
    OptionSpec("allow_tokenizer_mismatch", "--sae-allow-tokenizer-mismatch", "sae_allow_tokenizer_mismatch", "accept a finetune tokenizer that encodes the eval text differently from the base tokenizer", kind="bool", default=False),
    OptionSpec("trust_remote_code", "--sae-trust-remote-code", "sae_trust_remote_code", "allow transformers to run code shipped with a hub model (off by default)", kind="bool", default=False),
)

OPTIONS_BY_DEST = {o.dest: o for o in OPTIONS}


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("sae-transfer", "SAE transferability gate (pytest-sae-transfer) — metrics, JSON layout and profiles: docs/metrics.md")
    for opt in OPTIONS:
        help_text = f"{opt.help} [ini: {opt.ini}; env: {opt.env}]"
        if opt.kind == "bool":
            group.addoption(opt.flag, action="store_true", default=None, dest=opt.dest, help=help_text)
            # Read as text and converted here, so a bad value's message names the key.
            parser.addini(opt.ini, help=opt.help, type="string", default="")
        elif opt.kind == "list":
            # nargs="?": a flag given without its value reads as "" and gets a message that says what it wants.
            group.addoption(opt.flag, action="append", nargs="?", const="", default=None, dest=opt.dest, metavar=opt.metavar, help=help_text)
            parser.addini(opt.ini, help=opt.help, type="linelist", default=[])
        else:
            group.addoption(opt.flag, action="store", nargs="?", const="", default=None, dest=opt.dest, metavar=opt.metavar, help=help_text)
            parser.addini(opt.ini, help=opt.help, type="string", default="")
    for alias, target in INI_ALIASES.items():
        parser.addini(alias, help=f"same as {target}", type="linelist", default=[])


#: Other spellings accepted for an ini key (and its environment variable).
INI_ALIASES: dict[str, str] = {"sae_finetune": "sae_finetunes"}
