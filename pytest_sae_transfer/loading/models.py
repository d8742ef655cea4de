"""Models: a zoo name, a local checkpoint directory, or a hub name/id, as a HookedTransformer,
and what identifies a model's weights for the result cache without loading them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .. import zoo
from . import hf
from .common import LoadError, file_identity, is_zoo_model


@dataclasses.dataclass
class LoadedModel:
    name: str
    model: Any
    identity: str
    source: str  # "zoo", "local" or "hub"
    notes: list[str] = dataclasses.field(default_factory=list)


def load_model(
    name: str,
    device: str,
    dtype: str,
    *,
    base: LoadedModel | None = None,
    model_kwargs: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """A zoo name, a local checkpoint directory, or a hub name/id, as a HookedTransformer.

    ``base`` is None when loading the base model; for a finetune it is the loaded
    base, whose architecture the finetune is converted into.
    """
    if is_zoo_model(name):
        model = zoo.load_model(name, device=device, dtype=dtype)
        return LoadedModel(name, model, file_identity(zoo.model_files(name)), "zoo")
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and path.exists()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LoadError(f"model path {name!r} has no config.json; give a directory written by transformers' save_pretrained")
        model, notes = hf.load_local(path, device=device, dtype=dtype, base=base, model_kwargs=model_kwargs or {}, trust_remote_code=trust_remote_code)
        weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".json", ".bin")]
        return LoadedModel(name, model, file_identity(weights), "local", notes)
    if looks_like_path:
        raise LoadError(f"model path {name!r} does not exist")
    model, notes, identity = hf.load_hub(name, device=device, dtype=dtype, base=base, model_kwargs=model_kwargs or {}, trust_remote_code=trust_remote_code)
    return LoadedModel(name, model, identity, "hub", notes)


def model_identity(name: str) -> str:
    """What identifies a model's weights, without loading them (for the cache key).

    Zoo models and local checkpoints: a hash of their files. Hub models: the id
    plus the commit of the locally cached snapshot when there is one.
    """
    if is_zoo_model(name):
        return "zoo:" + file_identity(zoo.model_files(name))
    path = Path(name).expanduser()
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".bin", ".model")]
        return "local:" + file_identity(files)
    repo_id = hf.hub_repo_id(name)  # a TransformerLens alias ('gemma-2b') names the repo 'google/gemma-2b'
    return f"hub:{repo_id}@{hf.cached_commit(repo_id) or 'unresolved'}"

