"""Building HookedTransformers from Hugging Face weights: a base with the flags its SAE asks
for, and a finetune converted into its base's architecture with the base's processing."""

from __future__ import annotations

import copy
import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..common import LoadError, torch_dtype
from .configs import (
    CFG_KWARGS,
    NO_PROCESSING,
    PROCESSING_ATTR,
    check_same_architecture,
    describe_flags,
    effective_flags,
    finish_cfg,
    flags_of,
    hf_shape,
    processing_flags,
    rope_theta,
    tl_cfg_dict,
)
from .hub import hub_error, short_text

if TYPE_CHECKING:  # pragma: no cover
    from ..models import LoadedModel

#: Attribute on a finetune built here: its own tokenizer (or None when it ships none),
#: for :func:`check_tokenizers`. The model itself carries the base tokenizer.
OWN_TOKENIZER_ATTR = "_sae_transfer_tokenizer"

#: Attribute on every model built here: where it came from (for the report).
SOURCE_ATTR = "_sae_transfer_source"


def auto_config(src: str, *, local_only: bool, trust_remote_code: bool, revision: str | None = None) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(src, local_files_only=local_only, trust_remote_code=trust_remote_code, revision=revision)


def _dtype_kwarg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    try:
        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _auto_model(src: str, dtype: str, *, local_only: bool, trust_remote_code: bool, revision: str | None = None) -> Any:
    """AutoModelForCausalLM on the CPU, safetensors first, ``.bin`` only through weights_only=True."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        _dtype_kwarg(): torch_dtype(dtype),
        "local_files_only": local_only,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": None,  # prefer safetensors; fall back to .bin, which transformers loads with weights_only=True
    }
    if revision is not None:
        kwargs["revision"] = revision
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _vocab_rows(hf_model: Any) -> tuple[int, int]:
    rows_in = int(hf_model.get_input_embeddings().weight.shape[0])
    out = hf_model.get_output_embeddings()
    rows_out = int(out.weight.shape[0]) if out is not None and getattr(out, "weight", None) is not None else rows_in
    return rows_in, rows_out


def _is_big(hf_model: Any) -> bool:
    return sum(p.numel() for p in hf_model.parameters()) >= 50_000_000


def _release(big: bool) -> None:
    """Free the transformers copy of a large model now (a 7B model is ~15 GB of host memory)."""
    if big:
        gc.collect()


def _state_dict(anchor: Path, cfg: Any, hf_model: Any, dtype: str) -> dict[str, Any]:
    from transformer_lens import loading_from_pretrained as tl_loading

    return tl_loading.get_pretrained_state_dict(str(anchor), cfg, hf_model=hf_model, dtype=torch_dtype(dtype))


def _assemble(cfg: Any, state_dict: dict[str, Any], flags: dict[str, bool], tokenizer: Any, *, reuse_tokenizer: bool) -> Any:
    """HookedTransformer(cfg) + load_and_process_state_dict with ``flags``, on cfg.device."""
    from transformer_lens import HookedTransformer

    if reuse_tokenizer:
        # The base's tokenizer object is shared as it is: no reload, no hub call.
        tokenizer_name = cfg.tokenizer_name
        cfg.tokenizer_name = None
        model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
        model.cfg.tokenizer_name = tokenizer_name
        model.tokenizer = tokenizer
    else:
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **flags)
    model.move_model_modules_to_device()
    model.eval()
    setattr(model, PROCESSING_ATTR, dict(flags))
    return model


def build_base(
    hf_config: Any,
    cfg_dir: Path,
    load_weights: Callable[[], Any],
    tokenizer: Any,
    display: str,
    device: str,
    dtype: str,
    model_kwargs: dict[str, Any],
    trust_remote_code: bool,
) -> tuple[Any, list[str]]:
    """A base model from an HF checkpoint whose config.json is in ``cfg_dir``."""
    flags, extra, notes = processing_flags(model_kwargs)
    if tokenizer is None:
        raise LoadError(
            f"base model {display!r} has no tokenizer; save it next to the weights with tokenizer.save_pretrained(DIR)"
        )
    ignored = sorted(set(extra) - CFG_KWARGS)
    if ignored:
        notes.append(f"model_from_pretrained_kwargs {ignored} do not apply to a checkpoint converted here and were ignored")
    cfg_dict = tl_cfg_dict(cfg_dir, hf_config, trust_remote_code)
    hf_model = load_weights()
    big = _is_big(hf_model)
    rows_in, rows_out = _vocab_rows(hf_model)
    cfg_dict["d_vocab"] = rows_in
    if rows_out != rows_in:
        cfg_dict["d_vocab_out"] = rows_out
    cfg = finish_cfg(cfg_dict, model_name=display.rstrip("/").split("/")[-1], flags=flags, device=device, dtype=torch_dtype(dtype), extra=extra)
    cfg.tokenizer_name = display
    flags = effective_flags(flags, cfg)
    try:
        state_dict = _state_dict(cfg_dir, cfg, hf_model, dtype)
        del hf_model
        model = _assemble(cfg, state_dict, flags, tokenizer, reuse_tokenizer=False)
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"could not convert {display!r} to a TransformerLens model: {type(exc).__name__}: {short_text(exc)}") from None
    finally:
        _release(big)
    notes.append(f"{display}: converted from its Hugging Face checkpoint with {describe_flags(flags)}")
    return model, notes


def load_hf_model(src: str, display: str, dtype: str, *, local_only: bool, trust_remote_code: bool, revision: str | None = None) -> Any:
    try:
        return _auto_model(src, dtype, local_only=local_only, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as exc:  # noqa: BLE001
        if Path(src).is_dir():
            raise LoadError(f"could not load the weights in {src!r}: {type(exc).__name__}: {short_text(exc)}") from None
        raise hub_error(exc, "model", display) from None


def build_finetune(
    hf_config: Any,
    load_weights: Any,
    anchor: Path,
    display: str,
    base: "LoadedModel",
    device: str,
    dtype: str,
    own_tokenizer: Any,
) -> tuple[Any, list[str]]:
    """Convert a finetune into the base's architecture, with the base's processing."""
    base_model = base.model
    bcfg = base_model.cfg
    check_same_architecture(bcfg, hf_shape(hf_config), display, base.name)
    flags = flags_of(base_model)
    notes: list[str] = []
    if flags is None:
        flags = dict(NO_PROCESSING)
    hf_model = load_weights()
    big = _is_big(hf_model)
    rows_in, rows_out = _vocab_rows(hf_model)
    cfg = copy.deepcopy(bcfg)
    cfg.d_vocab = rows_in
    cfg.d_vocab_out = rows_out
    cfg.dtype = torch_dtype(dtype)
    cfg.device = device
    cfg.model_name = display.rstrip("/").split("/")[-1]
    base_rows = int(bcfg.d_vocab)
    if rows_in > base_rows:
        extra = rows_in - base_rows
        notes.append(
            f"finetune has {rows_in} vocabulary rows, base {base_rows}; the {extra} extra row{'s' if extra > 1 else ''} "
            f"{'are' if extra > 1 else 'is'} ignored by shared-vocabulary metrics"
        )
    elif rows_in < base_rows:
        notes.append(
            f"finetune has {rows_in} vocabulary rows, base {base_rows}; token ids >= {rows_in} cannot be fed to it, "
            f"and shared-vocabulary metrics use the first {rows_in}"
        )
    for key, label in (("rms_norm_eps", "eps"), ("layer_norm_epsilon", "eps")):
        value = getattr(hf_config, key, None)
        if value is not None and getattr(bcfg, label, None) is not None and abs(float(value) - float(bcfg.eps)) > 1e-12:
            notes.append(f"finetune config has {key}={value}, the base {bcfg.eps}; it runs with the finetune's value")
            cfg.eps = float(value)
    theta = rope_theta(hf_config, default=float("nan"))
    if bcfg.positional_embedding_type == "rotary" and theta == theta and float(theta) != float(bcfg.rotary_base):
        notes.append(f"finetune config has rope_theta={theta}, the base {bcfg.rotary_base}; it runs with the finetune's value")
        cfg.rotary_base = theta
    try:
        state_dict = _state_dict(anchor, cfg, hf_model, dtype)
        del hf_model
        model = _assemble(cfg, state_dict, flags, base_model.tokenizer, reuse_tokenizer=True)
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise LoadError(
            f"could not convert finetune {display!r} into the base architecture ({bcfg.original_architecture}): "
            f"{type(exc).__name__}: {short_text(exc)}"
        ) from None
    finally:
        _release(big)
    setattr(model, OWN_TOKENIZER_ATTR, own_tokenizer)
    if own_tokenizer is None:
        notes.append(f"finetune {display!r} ships no tokenizer; it is fed the base tokenization")
    return model, notes

