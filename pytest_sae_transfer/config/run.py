"""The resolved configuration of a run, its validation, finetune labels, and the marker's keywords."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from ..errors import InputError
from .options import OPTIONS_BY_DEST


class ConfigError(InputError):
    """An option value is invalid; the message names the option and what would be right."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that says what to evaluate and how."""

    sae_release: str | None = None
    sae_ids: tuple[str, ...] = ()
    sae_paths: tuple[str, ...] = ()
    base_model: str | None = None
    finetunes: tuple[str, ...] = ()  # each finetune's label: its name in test ids, reports and fixtures
    #: (label, model) for each finetune whose label is not the model's own name
    #: (``--finetune LABEL=MODEL``, or a path shown by its directory name).
    finetune_sources: tuple[tuple[str, str], ...] = ()
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

    def source(self, finetune: str) -> str:
        """What a finetune label names: a zoo name, a path or a hub id."""
        return dict(self.finetune_sources).get(finetune, finetune)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(root) / "pytest-sae-transfer"

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(values: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from already-typed values, rejecting invalid or contradictory ones."""
    values = {k: v for k, v in values.items() if v is not None}
    for dest in ("finetunes", "sae_ids", "sae_paths"):
        if dest in values:
            values[dest] = tuple(dict.fromkeys(values[dest]))  # repeated names run once
    if values.get("finetunes") and "finetune_sources" not in values:
        values["finetunes"], values["finetune_sources"] = finetune_labels(values["finetunes"])
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


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()


def finetune_labels(specs: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Each ``--finetune`` value as (label, model): ``LABEL=MODEL`` names it; a path is shown by its
    directory name (with parent directories added where two would collide); any other name
    (zoo name, hub id) is its own label."""
    explicit: dict[int, tuple[str, str]] = {}
    paths: dict[int, Path] = {}
    plain: dict[int, str] = {}
    for i, spec in enumerate(specs):
        label, sep, model = spec.partition("=")
        if sep and _LABEL.fullmatch(label.strip()):
            if not model.strip():
                raise ConfigError(f"--finetune {spec!r}: give the model after '=' (LABEL=MODEL, e.g. mine=./checkpoints/ft)")
            explicit[i] = (label.strip(), model.strip())
        elif sep and not label.strip():
            raise ConfigError(f"--finetune {spec!r}: give a label before '=' (LABEL=MODEL, e.g. mine=./checkpoints/ft)")
        elif _looks_like_path(spec):
            resolved = Path(spec).expanduser().resolve()
            if resolved in paths.values():
                continue  # the same directory named twice runs once
            paths[i] = resolved
        else:
            plain[i] = spec
    taken = [label for label, _ in explicit.values()] + list(plain.values())
    duplicated = sorted({label for label in taken if taken.count(label) > 1})
    if duplicated:
        raise ConfigError(f"--finetune: the label {duplicated[0]!r} names two finetunes; give each its own label (LABEL=MODEL)")
    depth = {i: 1 for i in paths}
    while True:
        shown = {i: "/".join(p.parts[-depth[i]:]) for i, p in paths.items()}
        values = list(shown.values())
        clashing = [i for i, label in shown.items() if values.count(label) > 1 or label in taken]
        growable = [i for i in clashing if depth[i] < len(paths[i].parts)]
        if not growable:
            break
        for i in growable:
            depth[i] += 1
    labels: list[str] = []
    sources: list[tuple[str, str]] = []
    for i, spec in enumerate(specs):
        if i not in explicit and i not in paths and i not in plain:
            continue
        label, model = explicit.get(i) or (shown[i] if i in paths else plain[i], spec)
        labels.append(label)
        if label != model:
            sources.append((label, model))
    clash = next((label for label in labels if labels.count(label) > 1), None)
    if clash is not None:
        raise ConfigError(f"--finetune: two finetunes would both be named {clash!r}; give one a label (LABEL=MODEL)")
    return tuple(labels), tuple(sources)


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
        if dest == "finetunes":
            values.pop("finetune_sources", None)  # the marker's finetunes get their own labels
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
