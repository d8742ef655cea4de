"""What the configuration files alone can tell, before any dataset or weights are loaded.

A run's mistakes are often several at once (a wrong SAE *and* a finetune of another
width); loading the dataset or the weights first would show them one per run, minutes
apart. :func:`check_inputs` reads only small files (the zoo's manifest and model
configs, an SAE's ``cfg.json``, a checkpoint's ``config.json`` and tokenizer files) and
reports every problem it finds in one :class:`LoadError`, each naming the finetune, SAE
or file it is about. What it cannot read without the network (hub models, registry
SAEs) is left to the loaders, which check it again anyway.

:func:`zoo_typos` runs even earlier, at configure time: a name that is close to a zoo
name, but is neither a zoo name nor an existing path, gets a did-you-mean before the
hub is ever asked about it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any, Sequence

from .. import zoo
from ..config import RunConfig
from .common import LoadError, is_zoo_dataset, is_zoo_model, is_zoo_release
from .sae import check_sae_config
from .sae_set import expand_sae_paths, plan_sae_keys

#: Texts every tokenizer check encodes (prose and code, as the zoo's two domains).
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Sparse autoencoders read a model's residual stream.",
    "def transfer(base, finetune):\n    return {name: value for name, value in zip(base, finetune)}\n",
    "Return the number of items in a container; raise TypeError if the argument is not sized.",
)

_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_mlp_out|hook_attn_out)$")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~"))


# -- names that look like zoo names ------------------------------------------------


def _zoo_names(kind: str) -> list[str]:
    try:
        return {"model": zoo.model_names, "dataset": zoo.dataset_names, "release": zoo.release_names}[kind]()
    except FileNotFoundError:
        return []


def _typo(name: str | None, kind: str, what: str) -> str | None:
    """A message when ``name`` is not a zoo name or a path but looks like a misspelt zoo name."""
    if not name or "/" in name or _looks_like_path(name) or Path(name).expanduser().exists():
        return None
    names = _zoo_names(kind)
    if not names or name in names:
        return None
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if not close and not name.startswith("toy-"):
        return None
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (f"{what} {name!r} is not a toy-zoo {kind} ({hint}zoo {kind}s: {', '.join(names)}); "
            f"a Hugging Face id reads owner/name and a local path starts with ./ or /")


def zoo_typos(config: RunConfig) -> None:
    """Names that look like misspelt zoo names, as one error, before any hub call."""
    problems = [_typo(config.source(ft), "model", "--finetune" if config.source(ft) == ft else f"finetune {ft!r}: --finetune")
                for ft in config.finetunes]
    problems.append(_typo(config.base_model, "model", "--base-model"))
    problems.append(_typo(config.dataset, "dataset", "--sae-dataset"))
    if config.sae_release and not is_zoo_release(config.sae_release) and config.sae_release.startswith("toy-"):
        problems.append(_typo(config.sae_release, "release", "--sae-release"))
    _raise([p for p in problems if p])


def _raise(problems: list[str]) -> None:
    problems = list(dict.fromkeys(problems))
    if len(problems) == 1:
        raise LoadError(problems[0])
    if problems:
        listed = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        raise LoadError(f"{len(problems)} problems with the inputs (found in their configuration files, before loading any weights or data):\n{listed}")


# -- configuration files -----------------------------------------------------------


@dataclasses.dataclass
class SAEConfig:
    key: str
    file: str
    d_in: int
    hook_name: str | None
    model_name: str | None
    dataset: str | None


def _sae_configs(config: RunConfig, problems: list[str]) -> list[SAEConfig]:
    """The run's SAE configs that are on disk (zoo or --sae-path); registry SAEs' are on the hub."""
    if config.sae_paths:
        dirs = expand_sae_paths(config.sae_paths)
    elif config.sae_release and is_zoo_release(config.sae_release):
        dirs = [zoo.sae_dir(config.sae_release, sae_id) for sae_id in plan_sae_keys(config.sae_release, config.sae_ids, ())]
    else:
        return []
    keys = plan_sae_keys(config.sae_release, config.sae_ids, config.sae_paths)
    out = []
    for key, directory in zip(keys, dirs):
        cfg_path = Path(directory) / "cfg.json"
        if not Path(directory).is_dir():
            problems.append(f"--sae-path {str(directory)!r} does not exist; give a directory with cfg.json and sae_weights.safetensors")
            continue
        if not cfg_path.is_file():
            problems.append(f"SAE directory {str(directory)!r} has no cfg.json; --sae-path must point to a directory written by sae_lens "
                            "(cfg.json + sae_weights.safetensors)")
            continue
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
            check_sae_config(cfg, str(cfg_path))
        except LoadError as exc:
            problems.append(str(exc))
            continue
        except (OSError, ValueError) as exc:
            problems.append(f"SAE config {str(cfg_path)!r} is not valid JSON: {exc}")
            continue
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else cfg
        out.append(SAEConfig(key, str(cfg_path), int(cfg["d_in"]), meta.get("hook_name") or cfg.get("hook_name"),
                             meta.get("model_name") or cfg.get("model_name"), meta.get("dataset_path") or cfg.get("dataset_path")))
    return out


def model_shape(name: str, trust_remote_code: bool = False) -> dict[str, Any] | None:
    """A zoo model's or a local checkpoint's architecture and widths, from its config file alone;
    None when that takes more (a hub model) or the file cannot be read (the loader will say why)."""
    if is_zoo_model(name):
        cfg = json.loads((zoo.model_dir(name) / "config.json").read_text(encoding="utf-8"))
        return {"kind": "zoo", "architecture": "toy-zoo", "d_model": cfg.get("d_model"), "n_layers": cfg.get("n_layers"),
                "n_heads": cfg.get("n_heads"), "n_key_value_heads": cfg.get("n_heads"), "d_mlp": cfg.get("d_mlp"),
                "d_vocab": cfg.get("d_vocab")}
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        return None
    from .hf.build import auto_config
    from .hf.configs import hf_shape

    try:
        shape = hf_shape(auto_config(str(path), local_only=True, trust_remote_code=trust_remote_code))
    except Exception:  # noqa: BLE001 - the loader reports an unreadable config with its own message
        return None
    return {"kind": "hf", **shape}


def _tokenizer(name: str) -> Any:
    """The zoo tokenizer, or a local checkpoint's own; None when there is none to compare."""
    if is_zoo_model(name):
        return zoo.load_tokenizer()
    path = Path(name).expanduser()
    from .hf.tokenizers import has_tokenizer_files

    if not path.is_dir() or not has_tokenizer_files(path):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - the loader reports it
        return None


# -- the checks ----------------------------------------------------------------------


def _missing_paths(config: RunConfig, base_name: str | None, sae_dataset: str | None) -> list[str]:
    problems = []
    how = ("give a checkpoint directory written by save_pretrained (config.json, weights and tokenizer), "
           "a Hugging Face model id (owner/name) or a zoo model name")
    named = [(f"finetune {ft!r}: --finetune", config.source(ft)) for ft in config.finetunes]
    if config.base_model:
        named.append(("--base-model", config.base_model))
    elif base_name:
        named.append(("the base model named in the SAE's metadata (override with --base-model)", base_name))
    for flag, name in named:
        if _looks_like_path(name) and not Path(name).expanduser().exists() and not is_zoo_model(name):
            problems.append(f"{flag} {name!r} does not exist; {how}")
    dataset = config.dataset or sae_dataset
    if dataset and _looks_like_path(dataset) and not Path(dataset).expanduser().exists() and not is_zoo_dataset(dataset):
        problems.append(f"dataset path {dataset!r} does not exist; pass --sae-dataset with a local .txt/.json/.jsonl/.parquet file, "
                        "a saved datasets directory or a hub dataset name")
    return problems


def _sae_problems(saes: Sequence[SAEConfig], base: dict[str, Any], base_name: str) -> list[str]:
    problems = []
    for sae in saes:
        where = f"SAE {sae.key!r} ({sae.file})"
        match = _HOOK.match(sae.hook_name or "")
        if match is None:
            continue  # the engine names the hooks it supports
        layer = int(match.group(1))
        if base.get("n_layers") is not None and layer >= base["n_layers"]:
            n = base["n_layers"]
            problems.append(f"{where}: hook {sae.hook_name!r} is beyond the model's depth: the base {base_name!r} ends at "
                            f"blocks.{n - 1} (it has {n} layers); "
                            "use an SAE trained on a hook of this model, or pass the base model the SAE was trained on (--base-model)")
        if base.get("d_model") is not None and sae.d_in != base["d_model"]:
            problems.append(f"{where}: the SAE reads {sae.d_in}-dimensional activations but the base model's width at "
                            f"{sae.hook_name} is {base['d_model']} (base {base_name!r}); use an SAE trained on this model "
                            "(its d_in must equal the model's d_model), or pass the base model the SAE was trained on (--base-model)")
    return problems


def _finetune_problems(config: RunConfig, finetunes: Sequence[str], base: dict[str, Any], base_name: str) -> list[str]:
    from .hf.configs import shape_mismatch

    problems = []
    for ft in finetunes:
        source = config.source(ft)
        shape = model_shape(source, config.trust_remote_code)
        if shape is None:
            continue
        named = f"{ft!r}" if source == ft else f"{ft!r} ({source})"
        if shape["kind"] != base["kind"]:
            zoo_side, other = (named, f"the base {base_name!r}") if shape["kind"] == "zoo" else (f"the base {base_name!r}", named)
            problems.append(f"finetune {named}: {zoo_side} is a toy-zoo model but {other} is not; "
                            "a finetune must have its base model's architecture (finetunes of a zoo model are zoo models)")
            continue
        message = shape_mismatch(base, shape)
        if message:
            message = message.replace("; base ", f"; base {base_name!r} ")
            problems.append(f"finetune {named} does not have the base model's architecture ({message}). "
                            "The SAE reads the base's residual stream, so a finetune must keep its architecture and width.")
    return problems


def _tokenizer_problems(config: RunConfig, finetunes: Sequence[str], base_name: str) -> list[str]:
    if config.allow_tokenizer_mismatch:
        return []
    from .hf.tokenizers import check_tokenizers

    problems = []
    base_tok = None
    for ft in finetunes:
        source = config.source(ft)
        if is_zoo_model(source) or not Path(source).expanduser().is_dir():
            continue  # zoo models share one tokenizer; hub tokenizers are compared once loaded
        ft_tok = _tokenizer(source)
        if ft_tok is None:
            continue
        base_tok = base_tok or _tokenizer(base_name)
        if base_tok is None:
            return problems
        try:
            check_tokenizers(base_tok, ft_tok, SAMPLE_TEXTS)
        except LoadError as exc:
            named = f"{ft!r}" if source == ft else f"{ft!r} ({source})"
            problems.append(f"finetune {named}: {exc}")
    return problems


def check_inputs(config: RunConfig, finetunes: Sequence[str] | None = None) -> None:
    """Every problem the configuration files show, in one LoadError (nothing when all is well)."""
    finetunes = list(config.finetunes if finetunes is None else finetunes)
    problems: list[str] = []
    saes = _sae_configs(config, problems)
    base_name = config.base_model or next((s.model_name for s in saes if s.model_name), None)
    problems += _missing_paths(config, base_name, next((s.dataset for s in saes if s.dataset), None))
    base = model_shape(base_name, config.trust_remote_code) if base_name else None
    if base is not None and base_name:
        problems += _sae_problems(saes, base, base_name)
        problems += _finetune_problems(config, finetunes, base, base_name)
    if base_name:
        problems += _tokenizer_problems(config, finetunes, base_name)
    _raise(problems)
