"""Reading each option from the command line, the environment and the ini file."""

from __future__ import annotations

import os
from typing import Any

import pytest

from .options import ENV_PREFIX, INI_ALIASES, OPTIONS, OptionSpec, env_name
from .run import ConfigError, RunConfig, validate


#: What a value-taking flag given without its value is told.
_WANTED = {
    "finetunes": "the finetune to gate: a zoo name, a local checkpoint directory or a Hugging Face id (owner/name), "
                 "optionally labelled LABEL=MODEL; e.g. --finetune toy-code or --finetune mine=./checkpoints/ft",
    "sae_release": "an SAE release: a sae_lens registry name or the bundled toy-res; e.g. --sae-release toy-res",
}


def _missing_value(opt: OptionSpec) -> ConfigError:
    wanted = _WANTED.get(opt.dest) or opt.help.split(";")[0].split(" (")[0]
    return ConfigError(f"{opt.flag} needs a value ({opt.metavar or 'VALUE'}): {wanted}")


def _convert(opt: OptionSpec, raw: Any, source: str) -> Any:
    where = {"cli": opt.flag, "env": f"environment variable {opt.env}", "ini": f"ini key {opt.ini}"}[source]
    if source == "cli" and opt.kind != "bool" and (raw == "" or (isinstance(raw, list) and "" in raw)):
        raise _missing_value(opt)
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
    names = [opt.ini, *(alias for alias, target in INI_ALIASES.items() if target == opt.ini)]
    envs = {name: os.environ.get(env_name(name)) for name in names}
    envs = {name: value for name, value in envs.items() if value is not None and value.strip() != ""}
    if len(envs) > 1:
        raise ConfigError(f"environment variables {' and '.join(env_name(n) for n in envs)} both set {opt.flag}; keep one of them")
    if envs:
        return next(iter(envs.values())), "env"
    inis = {}
    for name in names:
        try:
            value = config.getini(name)
        except (ValueError, KeyError):
            value = None
        if value not in (None, "", []):
            inis[name] = value
    if len(inis) > 1:
        raise ConfigError(f"ini keys {' and '.join(inis)} both set {opt.flag}; keep one of them")
    if inis:
        return next(iter(inis.values())), "ini"
    return None


def _ini_keys(config: pytest.Config) -> set[str]:
    """The keys of the ini file (and of -o overrides), as pytest read them."""
    raw = getattr(config, "_inicfg", None)
    if raw is None:  # pytest 8 names it inicfg
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = getattr(config, "inicfg", None) or {}
    return {str(k) for k in raw}


def check_unknown_names(config: pytest.Config) -> None:
    """A misspelled ``sae_*`` ini key or ``PYTEST_SAE_*`` variable must not silently turn the gate off."""
    import difflib

    known_ini = [o.ini for o in OPTIONS] + list(INI_ALIASES)
    problems = []
    for key in sorted(_ini_keys(config)):
        if key.startswith("sae_") and key not in known_ini:
            close = difflib.get_close_matches(key, known_ini, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"ini keys of this plugin: {', '.join(o.ini for o in OPTIONS)}"
            problems.append(f"ini key {key} is not an option of pytest-sae-transfer ({hint})")
    known_env = [env_name(n) for n in known_ini]
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIX) and name not in known_env:
            close = difflib.get_close_matches(name, known_env, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"variables of this plugin: {', '.join(o.env for o in OPTIONS)}"
            problems.append(f"environment variable {name} is not an option of pytest-sae-transfer ({hint})")
    if problems:
        raise ConfigError("; ".join(problems))


def resolve(config: pytest.Config) -> RunConfig:
    """Read every option from its three sources and validate the combination."""
    check_unknown_names(config)
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        found = _lookup(config, opt)
        if found is None:
            continue
        raw, source = found
        values[opt.dest] = _convert(opt, raw, source)
    return validate(values)
