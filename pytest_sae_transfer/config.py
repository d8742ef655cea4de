"""Options, ini keys and environment variables, resolved into one frozen :class:`RunConfig`.

Every option exists three ways: ``--flag`` on the command line, an ini key
(``[tool.pytest.ini_options]`` or pytest.ini) and an environment variable.
Precedence: command line > environment > ini > default. No torch here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import pytest

from .errors import InputError

ENV_PREFIX = "PYTEST_SAE_"


class ConfigError(InputError):
    """An option value is invalid; the message names the option and what would be right."""


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
        return ENV_PREFIX + self.ini.removeprefix("sae_").upper()


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("sae_release", "--sae-release", "sae_release", "SAE release: a sae_lens registry name (e.g. gemma-2b-res-jb) or the bundled 'toy-res'", metavar="NAME"),
    OptionSpec("sae_ids", "--sae-id", "sae_id", "SAE id within the release (e.g. blocks.6.hook_resid_post), a glob over its ids ('blocks.*.hook_resid_post') or 'all'; repeat for several (ini: one per line; env: comma-separated)", kind="list", metavar="ID"),
    OptionSpec("sae_paths", "--sae-path", "sae_path", "a local SAE directory (cfg.json + sae_weights.safetensors), or a directory holding several, instead of a release; repeat for several", kind="list", metavar="DIR"),
    OptionSpec("base_model", "--base-model", "sae_base_model", "base model: a TransformerLens name, a local HF checkpoint or a zoo name (default: the model in the SAE's metadata)", metavar="MODEL"),
    OptionSpec("finetunes", "--finetune", "sae_finetunes", "a finetune to gate: HF id, local path or zoo name; repeat for several (ini: one per line; env: comma-separated)", kind="list", metavar="MODEL"),
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


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that says what to evaluate and how."""

    sae_release: str | None = None
    sae_ids: tuple[str, ...] = ()
    sae_paths: tuple[str, ...] = ()
    base_model: str | None = None
    finetunes: tuple[str, ...] = ()
    dataset: str | None = None
    n_tokens: int = 32768
    context_size: int | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    features: tuple[str, ...] = ()  # watched feature ids, as given (parsed with the profile)
    thresholds: str | None = None
    report: str | None = None
    report_dir: str | None = None
    no_cache: bool = False
    cache_dir: str | None = None
    outlier_norm: float | str | None = None  # None (the profile decides), "off", "auto" or τ
    include_special_tokens: bool = False
    shuffle_seed: int | None = None
    seed: int = 0
    n_bootstrap: int = 1000
    sequential: bool = False
    allow_tokenizer_mismatch: bool = False
    trust_remote_code: bool = False

    @property
    def active(self) -> bool:
        """The built-in gate runs when at least one finetune is named."""
        return bool(self.finetunes)

    @property
    def has_sae(self) -> bool:
        return bool(self.sae_release or self.sae_paths)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(root) / "pytest-sae-transfer"

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("sae-transfer", "SAE transferability gate (pytest-sae-transfer; metrics and profiles: docs/metrics.md)")
    for opt in OPTIONS:
        help_text = f"{opt.help} [ini: {opt.ini}; env: {opt.env}]"
        if opt.kind == "bool":
            group.addoption(opt.flag, action="store_true", default=None, dest=opt.dest, help=help_text)
            # Read as text and converted here, so a bad value's message names the key.
            parser.addini(opt.ini, help=opt.help, type="string", default="")
        elif opt.kind == "list":
            group.addoption(opt.flag, action="append", default=None, dest=opt.dest, metavar=opt.metavar, help=help_text)
            parser.addini(opt.ini, help=opt.help, type="linelist", default=[])
        else:
            group.addoption(opt.flag, action="store", default=None, dest=opt.dest, metavar=opt.metavar, help=help_text)
            parser.addini(opt.ini, help=opt.help, type="string", default="")


def _convert(opt: OptionSpec, raw: Any, source: str) -> Any:
    where = {"cli": opt.flag, "env": f"environment variable {opt.env}", "ini": f"ini key {opt.ini}"}[source]
    if opt.kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    if opt.kind == "list":
        if isinstance(raw, str):
            parts = raw.replace("\n", ",").split(",")
        else:
            parts = list(raw)
        return tuple(p.strip() for p in parts if p and p.strip())
    if opt.kind == "int":
        try:
            return int(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{where}: expected a whole number, got {raw!r}") from None
    text = str(raw).strip()
    return text or None


def _lookup(config: pytest.Config, opt: OptionSpec) -> tuple[Any, str] | None:
    cli = config.getoption(opt.dest, default=None)
    if cli is not None:
        return cli, "cli"
    env = os.environ.get(opt.env)
    if env is not None and env.strip() != "":
        return env, "env"
    try:
        ini = config.getini(opt.ini)
    except (ValueError, KeyError):
        ini = None
    if ini not in (None, "", []):
        return ini, "ini"
    return None


def resolve(config: pytest.Config) -> RunConfig:
    """Read every option from its three sources and validate the combination."""
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        found = _lookup(config, opt)
        if found is None:
            continue
        raw, source = found
        values[opt.dest] = _convert(opt, raw, source)
    return validate(values)


def validate(values: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from already-typed values, rejecting invalid or contradictory ones."""
    values = {k: v for k, v in values.items() if v is not None}
    for dest in ("finetunes", "sae_ids", "sae_paths"):
        if dest in values:
            values[dest] = tuple(dict.fromkeys(values[dest]))  # repeated names run once
    for dest in ("n_tokens", "batch_size", "context_size", "n_bootstrap"):
        value = values.get(dest)
        if value is None:
            continue
        flag = OPTIONS_BY_DEST[dest].flag
        minimum = 0 if dest == "n_bootstrap" else (2 if dest == "context_size" else 1)
        if value < minimum:
            raise ConfigError(f"{flag} must be at least {minimum}; got {value}")
    if values.get("sae_release") and values.get("sae_paths"):
        raise ConfigError("--sae-release and --sae-path both name an SAE; give one of them")
    if values.get("sae_ids") and not values.get("sae_release"):
        raise ConfigError("--sae-id needs --sae-release (a local SAE from --sae-path has no id)")
    if "outlier_norm" in values:
        values["outlier_norm"] = parse_outlier_norm(values["outlier_norm"])
    device = values.get("device", "auto")
    if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"--sae-device: unknown device {device!r}; use auto, cpu, cuda or cuda:<index>")
    dtype = values.get("dtype", "auto")
    valid_dtypes = ("auto", "float32", "bfloat16", "float16")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    dtype = aliases.get(dtype, dtype)
    if dtype not in valid_dtypes:
        raise ConfigError(f"--sae-dtype: unknown dtype {dtype!r}; use one of {', '.join(valid_dtypes)}")
    values["dtype"] = dtype
    if values.get("report") and Path(values["report"]).suffix.lower() != ".json":
        raise ConfigError(f"--sae-report {values['report']!r}: the report is JSON; give a path ending in .json")
    if values.get("report") and Path(values["report"]).is_dir():
        raise ConfigError(f"--sae-report {values['report']!r} is a directory; give a file path ending in .json")
    if values.get("report_dir") and Path(values["report_dir"]).exists() and not Path(values["report_dir"]).is_dir():
        raise ConfigError(f"--sae-report-dir {values['report_dir']!r} exists and is not a directory")
    if values.get("finetunes") and not (values.get("sae_release") or values.get("sae_paths")):
        raise ConfigError("--finetune needs an SAE: pass --sae-release NAME (for example toy-res) or --sae-path DIR")
    return RunConfig(**values)


def parse_outlier_norm(raw: Any) -> float | str | None:
    if raw is None:
        return None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    else:
        text = str(raw).strip().lower()
        if text == "":
            return None
        if text in ("off", "none", "false", "0"):
            return "off"  # asked for explicitly: overrides a profile's mask (None would defer to it)
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"--sae-outlier-norm: expected off, auto or a positive number; got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--sae-outlier-norm: the norm threshold must be a positive finite number; got {raw!r}")
    return value


#: Marker keyword → RunConfig field, for @pytest.mark.sae_transfer(...).
MARKER_KEYS: dict[str, str] = {
    "release": "sae_release",
    "sae_release": "sae_release",
    "sae_id": "sae_ids",
    "sae_ids": "sae_ids",
    "sae_path": "sae_paths",
    "sae_paths": "sae_paths",
    "base_model": "base_model",
    "finetune": "finetunes",
    "finetunes": "finetunes",
    "dataset": "dataset",
    "n_tokens": "n_tokens",
    "tokens": "n_tokens",
    "context_size": "context_size",
    "batch_size": "batch_size",
    "outlier_norm": "outlier_norm",
    "include_special_tokens": "include_special_tokens",
}


def from_marker(base: RunConfig, kwargs: dict[str, Any], where: str = "") -> RunConfig:
    """The session config overridden by a test's ``@pytest.mark.sae_transfer(...)`` keywords."""
    import difflib

    values = dataclasses.asdict(base)
    explicit_sae = False
    for key, value in kwargs.items():
        dest = MARKER_KEYS.get(key)
        if dest is None:
            close = difflib.get_close_matches(key, list(MARKER_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}@pytest.mark.sae_transfer: unknown keyword {key!r}{hint}; valid: {', '.join(sorted(set(MARKER_KEYS)))}")
        if dest in ("finetunes", "sae_ids", "sae_paths"):
            value = (value,) if isinstance(value, str) else tuple(value)
        if dest in ("sae_release", "sae_paths"):
            explicit_sae = True
        values[dest] = value
    if explicit_sae:
        # A marker naming its own SAE replaces the command line's SAE entirely.
        named = {MARKER_KEYS.get(k) for k in kwargs}
        if "sae_paths" not in named:
            values["sae_paths"] = ()
        if "sae_release" not in named:
            values["sae_release"] = None
        if "sae_ids" not in named:
            values["sae_ids"] = ()
    try:
        return validate(values)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None

