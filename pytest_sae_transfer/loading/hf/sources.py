"""Where a model comes from decides how it is built (see the package docstring): a local
checkpoint directory, a hub id, or a TransformerLens official name as the base."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..common import LoadError, torch_dtype
from .build import SOURCE_ATTR, auto_config, build_base, build_finetune, load_hf_model
from .configs import PROCESSING_ATTR, describe_flags, effective_flags, processing_flags
from .hub import (
    HOW_MODEL,
    check_repo_id,
    hub_error,
    no_network,
    offline_message,
    offline_only,
    resolve_commit,
    short_text,
    snapshot_dir,
    tl_official_name,
)
from .tokenizers import checkpoint_tokenizer, has_tokenizer_files

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import HookedTransformer

    from ..models import LoadedModel


def load_local(
    path: Path,
    device: str,
    dtype: str,
    base: "LoadedModel | None",
    model_kwargs: dict[str, Any],
    trust_remote_code: bool = False,
) -> tuple["HookedTransformer", list[str]]:
    """A ``save_pretrained`` directory as a HookedTransformer, without any hub call."""
    path = Path(path).expanduser().resolve()
    display = str(path)
    if not (path / "config.json").is_file():
        raise LoadError(f"model path {display!r} has no config.json; give a directory written by transformers' save_pretrained")
    try:
        hf_config = auto_config(str(path), local_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"could not read the model config in {str(path / 'config.json')!r}: {type(exc).__name__}: {short_text(exc)}") from None
    own_tokenizer = checkpoint_tokenizer(str(path), trust_remote_code, local_only=True, files=path)
    load_weights = lambda: load_hf_model(str(path), display, dtype, local_only=True, trust_remote_code=trust_remote_code)  # noqa: E731
    if base is None:
        model, notes = build_base(hf_config, path, load_weights, own_tokenizer, display, device, dtype, model_kwargs, trust_remote_code)
        setattr(model, SOURCE_ATTR, {"kind": "local", "path": display})
        return model, notes
    model, notes = build_finetune(
        hf_config,
        load_weights,
        path,
        display,
        base,
        device,
        dtype,
        own_tokenizer,
    )
    setattr(model, SOURCE_ATTR, {"kind": "local", "path": display})
    return model, notes


def load_hub(
    name: str,
    device: str,
    dtype: str,
    base: "LoadedModel | None",
    model_kwargs: dict[str, Any],
    trust_remote_code: bool = False,
) -> tuple["HookedTransformer", list[str], str]:
    """A TransformerLens name (base) or a hub id (base or finetune); returns (model, notes, identity).

    The identity is ``hub:<repo>@<commit>``: the commit the default branch resolved to,
    from the hub or, offline, from the local cache.
    """
    official = tl_official_name(name) if base is None else None
    if official is not None:
        return _load_official_base(name, official, device, dtype, model_kwargs, trust_remote_code)
    check_repo_id(name, "model")
    what = "model" if base is None else "finetune"
    commit, local_only = resolve_commit(name, what, name)
    with no_network(local_only):
        model, notes = _load_hub_checkpoint(name, what, commit, local_only, device, dtype, base, model_kwargs, trust_remote_code)
    setattr(model, SOURCE_ATTR, {"kind": "hub", "repo": name, "commit": commit})
    return model, notes, f"hub:{name}@{commit}"


def _load_hub_checkpoint(
    name: str,
    what: str,
    commit: str,
    local_only: bool,
    device: str,
    dtype: str,
    base: "LoadedModel | None",
    model_kwargs: dict[str, Any],
    trust_remote_code: bool,
) -> tuple[Any, list[str]]:
    try:
        hf_config = auto_config(name, local_only=local_only, trust_remote_code=trust_remote_code, revision=commit)
    except Exception as exc:  # noqa: BLE001
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise LoadError(f"{what} {name!r} needs code from its repository to load; pass --sae-trust-remote-code if you trust it") from None
        raise hub_error(exc, what, name) from None
    own_tokenizer = checkpoint_tokenizer(name, trust_remote_code, local_only, revision=commit)
    snapshot = snapshot_dir(name, commit)
    if snapshot is not None and not has_tokenizer_files(snapshot):
        own_tokenizer = None
    load_weights = lambda: load_hf_model(name, name, dtype, local_only=local_only, trust_remote_code=trust_remote_code, revision=commit)  # noqa: E731
    if base is None:
        if snapshot is None:
            raise LoadError(offline_message(what, name, HOW_MODEL))
        model, notes = build_base(hf_config, snapshot, load_weights, own_tokenizer, name, device, dtype, model_kwargs, trust_remote_code)
    else:
        anchor = snapshot if snapshot is not None else Path(tempfile.gettempdir())
        model, notes = build_finetune(hf_config, load_weights, anchor, name, base, device, dtype, own_tokenizer)
    return model, notes


def _load_official_base(
    name: str, official: str, device: str, dtype: str, model_kwargs: dict[str, Any], trust_remote_code: bool
) -> tuple[Any, list[str], str]:
    """What sae_lens's load_model does: from_pretrained_no_processing(name, **model_from_pretrained_kwargs)."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading

    if official.startswith(tuple(tl_loading.NEED_REMOTE_CODE_MODELS)) and not trust_remote_code:
        raise LoadError(
            f"model {name!r} ({official}) runs code from its hub repository; pass --sae-trust-remote-code if you trust it"
        )
    if official in getattr(tl_loading, "NON_HF_HOSTED_MODEL_NAMES", ()):
        raise LoadError(f"model {name!r} is not hosted on the Hugging Face hub; convert it to a local checkpoint directory and pass that")
    flags, extra, notes = processing_flags(model_kwargs)
    display = name if name == official else f"{name} ({official})"
    needs_hub = not official.startswith(("NeelNanda", "ArthurConmy", "Baidicoot"))
    commit, local_only = resolve_commit(official, "model", display) if needs_hub else ("unversioned", offline_only())
    kwargs = dict(extra)
    if needs_hub:
        kwargs.setdefault("revision", commit)
    if local_only:
        kwargs.setdefault("local_files_only", True)
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        with no_network(local_only):
            model = HookedTransformer.from_pretrained_no_processing(
                name, device=device, dtype=torch_dtype(dtype), **flags, **kwargs
            )
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, "model", display) from None
    model.eval()
    setattr(model, PROCESSING_ATTR, effective_flags(flags, model.cfg))
    setattr(model, SOURCE_ATTR, {"kind": "hub", "repo": official, "commit": commit, "transformer_lens_name": name})
    notes.append(f"{name}: TransformerLens official model {official}@{commit[:12]} with {describe_flags(flags)} (as sae_lens loads it)")
    return model, notes, f"hub:{official}@{commit}"

