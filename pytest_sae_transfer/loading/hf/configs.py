"""TransformerLens configs for Hugging Face checkpoints, the weight-processing flags an SAE's
metadata asks for, and the architecture check that a finetune must pass against its base."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..common import LoadError
from .hub import short_text

#: TransformerLens weight-processing flags, in ``load_and_process_state_dict`` order.
PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases", "refactor_factored_attn_matrices")


#: What ``HookedTransformer.from_pretrained_no_processing`` uses, and therefore what
#: sae_lens's ``load_model`` uses unless the SAE's ``model_from_pretrained_kwargs``
#: override a flag (e.g. ``{"center_writing_weights": True}`` for gpt2-small-mlp-tm).
NO_PROCESSING: dict[str, bool] = {flag: False for flag in PROCESSING_FLAGS}


#: Attribute on every model built here: the processing flags it was built with.
#: A finetune reads the base's and is processed identically.
PROCESSING_ATTR = "_sae_transfer_processing"


#: model_from_pretrained_kwargs (besides the processing flags) that a converted checkpoint honours.
CFG_KWARGS = frozenset({"n_devices", "default_prepend_bos", "first_n_layers", "n_ctx"})


#: model_from_pretrained_kwargs that the plugin's own options decide.
_OWNED_KWARGS = ("device", "dtype", "torch_dtype", "move_to_device", "tokenizer", "hf_model")


def processing_flags(model_kwargs: dict[str, Any] | None) -> tuple[dict[str, bool], dict[str, Any], list[str]]:
    """Split SAE metadata ``model_from_pretrained_kwargs`` into (processing flags, other kwargs, notes).

    The flags start from ``from_pretrained_no_processing`` (all False), as sae_lens's
    ``load_model`` does, and take any flag the SAE's metadata sets.
    """
    flags = dict(NO_PROCESSING)
    rest: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in (model_kwargs or {}).items():
        if key in flags:
            flags[key] = bool(value)
        elif key in _OWNED_KWARGS:
            notes.append(f"the SAE's model_from_pretrained_kwargs sets {key}={value!r}; the plugin's own --sae-device/--sae-dtype decide it instead")
        else:
            rest[key] = value
    return flags, rest, notes


def flags_of(model: Any) -> dict[str, bool] | None:
    flags = getattr(model, PROCESSING_ATTR, None)
    return dict(flags) if isinstance(flags, dict) else None


def describe_flags(flags: dict[str, bool]) -> str:
    on = [k for k, v in flags.items() if v]
    return "no weight processing" if not on else "weight processing " + ", ".join(on)


#: Substrings that make TransformerLens's convert_hf_model_config pick a config by
#: *name* instead of reading config.json; a local path must not contain them.
_NAME_TRIGGERS = re.compile(r"llama|gemma|wav2vec2|tinystories", re.IGNORECASE)


def _neutral_config_dir(path: Path) -> Path:
    """A temporary directory with a copy of ``path``'s config (and remote code), under a neutral name."""
    candidates = [tempfile.gettempdir(), "/tmp", os.getcwd(), str(Path.home())]
    parent = next((c for c in candidates if os.path.isdir(c) and not _NAME_TRIGGERS.search(c)), None)
    if parent is None:
        raise LoadError(
            f"cannot build a TransformerLens config for {str(path)!r}: every temporary directory's path contains a "
            "model-family name that TransformerLens matches by name; set TMPDIR to a neutral path"
        )
    tmp = Path(tempfile.mkdtemp(prefix="sae-transfer-cfg-", dir=parent))
    target = tmp / "checkpoint"
    target.mkdir()
    for item in path.iterdir():
        if item.is_file() and (item.name == "config.json" or item.suffix == ".py"):
            shutil.copy2(item, target / item.name)
    # TransformerLens reads GPT-2's context length from n_ctx, which the hub's gpt2 configs
    # carry as an extra key but transformers no longer writes; it equals n_positions.
    config_path = target / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return target
    if isinstance(raw, dict) and raw.get("model_type") == "gpt2" and "n_ctx" not in raw and "n_positions" in raw:
        raw["n_ctx"] = raw["n_positions"]
        config_path.write_text(json.dumps(raw), encoding="utf-8")
    return target


def rope_theta(hf_config: Any, default: float = 10000.0) -> float:
    try:
        from transformer_lens.loading_from_pretrained import _get_rope_theta

        return _get_rope_theta(hf_config, default)
    except ImportError:  # pragma: no cover - older TransformerLens
        value = getattr(hf_config, "rope_theta", None)
        if value is None:
            value = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", default)
        return value


def _gemma_cfg_dict(hf_config: Any) -> dict[str, Any]:
    """TransformerLens config for a Gemma (v1) or Gemma-2 checkpoint, read from its config.

    TransformerLens configures these only by official name (google/gemma-2b ...);
    this mirrors those entries field for field, with the values taken from the
    checkpoint's config.json instead of a table.
    """
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None) or "gelu_pytorch_tanh"
    if act == "gelu":  # transformers reads a legacy "gelu" in Gemma configs as the tanh approximation
        act = "gelu_pytorch_tanh"
    cfg: dict[str, Any] = {
        "d_model": c.hidden_size,
        "d_head": head_dim,
        "n_heads": c.num_attention_heads,
        "d_mlp": c.intermediate_size,
        "n_layers": c.num_hidden_layers,
        "n_ctx": c.max_position_embeddings,
        "eps": c.rms_norm_eps,
        "d_vocab": c.vocab_size,
        "act_fn": act,
        "initializer_range": getattr(c, "initializer_range", 0.02),
        "normalization_type": "RMS",
        "rotary_base": rope_theta(c),
        "rotary_dim": head_dim,
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "n_key_value_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        "gated_mlp": True,
        "final_rms": True,
        "original_architecture": "GemmaForCausalLM",
    }
    if c.model_type == "gemma2":
        layer_types = getattr(c, "layer_types", None) or ["sliding_attention", "full_attention"] * ((c.num_hidden_layers + 1) // 2)
        scalar = getattr(c, "query_pre_attn_scalar", None)
        cfg.update(
            {
                "original_architecture": "Gemma2ForCausalLM",
                "window_size": getattr(c, "sliding_window", None),
                "use_local_attn": True,
                "attn_types": ["local" if t == "sliding_attention" else "global" for t in layer_types[: c.num_hidden_layers]],
                "attn_scores_soft_cap": getattr(c, "attn_logit_softcapping", None) or -1.0,
                "output_logits_soft_cap": getattr(c, "final_logit_softcapping", None) or -1.0,
                "use_normalization_before_and_after": True,
            }
        )
        if scalar is not None and scalar != head_dim:
            cfg["attn_scale"] = float(scalar) ** 0.5
    return cfg


def tl_cfg_dict(path: Path, hf_config: Any, trust_remote_code: bool) -> dict[str, Any]:
    """The TransformerLens config dict (before processing) for a local checkpoint directory."""
    model_type = getattr(hf_config, "model_type", "")
    if model_type in ("gemma", "gemma2"):
        cfg = _gemma_cfg_dict(hf_config)
    else:
        from transformer_lens import loading_from_pretrained as tl_loading

        neutral = _neutral_config_dir(path)
        try:
            cfg = tl_loading.convert_hf_model_config(str(neutral), local_files_only=True, trust_remote_code=trust_remote_code)
        except NotImplementedError:
            archs = getattr(hf_config, "architectures", None) or [model_type]
            raise LoadError(
                f"{str(path)!r} is a {archs[0]} checkpoint, which TransformerLens cannot convert; "
                "supported architectures include GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, GemmaForCausalLM, "
                "Gemma2ForCausalLM, Qwen2ForCausalLM, GPTNeoXForCausalLM"
            ) from None
        except LoadError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise LoadError(f"could not build a TransformerLens config from {str(path / 'config.json')!r}: {type(exc).__name__}: {short_text(exc)}") from None
        finally:
            shutil.rmtree(neutral.parent, ignore_errors=True)
        cfg.pop("trust_remote_code", None)
    cfg["tokenizer_name"] = str(path)
    return cfg


def finish_cfg(
    cfg_dict: dict[str, Any], *, model_name: str, flags: dict[str, bool], device: str, dtype: Any, extra: dict[str, Any]
) -> Any:
    """What ``get_pretrained_model_config`` does after the architecture dict: names, dtype, device, folding."""
    from transformer_lens import HookedTransformerConfig

    cfg = dict(cfg_dict)
    cfg["model_name"] = model_name
    cfg["init_weights"] = False
    if flags["fold_ln"]:
        if cfg["normalization_type"] in ("LN", "LNPre"):
            cfg["normalization_type"] = "LNPre"
        elif cfg["normalization_type"] in ("RMS", "RMSPre"):
            cfg["normalization_type"] = "RMSPre"
    cfg["device"] = device
    cfg["dtype"] = dtype
    cfg["n_devices"] = int(extra.get("n_devices", 1) or 1)
    cfg["from_checkpoint"] = False
    prepend = extra.get("default_prepend_bos")
    if prepend is not None:
        cfg["default_prepend_bos"] = bool(prepend)
    else:
        cfg.setdefault("default_prepend_bos", True)
    if extra.get("first_n_layers") is not None:
        cfg["n_layers"] = int(extra["first_n_layers"])
    if extra.get("n_ctx") is not None:
        cfg["n_ctx"] = int(extra["n_ctx"])
    return HookedTransformerConfig.from_dict(cfg)


def effective_flags(flags: dict[str, bool], cfg: Any) -> dict[str, bool]:
    """The flags TransformerLens's from_pretrained would actually apply to this architecture."""
    flags = dict(flags)
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:  # pragma: no cover
        POST_NORM_ARCHITECTURES = ()
    if cfg.positional_embedding_type == "shortformer":
        flags.update(fold_ln=False, center_unembed=False, center_writing_weights=False)
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        flags.update(fold_ln=False, center_writing_weights=False)
    softcap = getattr(cfg, "output_logits_soft_cap", -1.0)
    if flags["center_unembed"] and softcap is not None and softcap > 0:
        flags["center_unembed"] = False
    return flags


def hf_shape(hf_config: Any) -> dict[str, Any]:
    """Architecture and widths from an HF config (attribute_map covers GPT-2's n_embd etc.)."""
    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    d_model = getattr(c, "hidden_size", None)
    d_mlp = getattr(c, "intermediate_size", None)
    if d_mlp is None and getattr(c, "model_type", "") in ("gpt2", "gpt_neo", "gptj"):
        d_mlp = getattr(c, "n_inner", None) or (4 * d_model if d_model else None)
    n_heads = getattr(c, "num_attention_heads", None)
    archs = getattr(hf_config, "architectures", None) or []
    return {
        "architecture": archs[0] if archs else None,
        "model_type": getattr(hf_config, "model_type", None),
        "d_model": d_model,
        "n_layers": getattr(c, "num_hidden_layers", None),
        "n_heads": n_heads,
        "n_key_value_heads": getattr(c, "num_key_value_heads", None) or n_heads,
        "d_mlp": d_mlp,
        "d_vocab": getattr(c, "vocab_size", None),
    }


def _base_shape(cfg: Any) -> dict[str, Any]:
    return {
        "architecture": cfg.original_architecture,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads or cfg.n_heads,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
    }


def _shape_text(shape: dict[str, Any]) -> str:
    keys = ("architecture", "d_model", "n_layers", "n_heads", "n_key_value_heads", "d_mlp")
    return ", ".join(f"{k}={shape.get(k)}" for k in keys)


def shape_mismatch(base: dict[str, Any], ft: dict[str, Any]) -> str | None:
    """What differs between two shapes (``hf_shape``'s keys), in words; None when nothing does."""
    mismatched = []
    if ft.get("architecture") is not None and base.get("architecture") is not None and ft["architecture"] != base["architecture"]:
        mismatched.append("architecture")
    for key in ("d_model", "n_layers", "n_heads", "n_key_value_heads", "d_mlp"):
        if ft.get(key) is not None and base.get(key) is not None and ft[key] != base[key]:
            mismatched.append(key)
    if not mismatched:
        return None
    return f"{', '.join(mismatched)} differ(s): finetune {_shape_text(ft)}; base {_shape_text(base)}"


def check_same_architecture(base_cfg: Any, ft_shape: dict[str, Any], ft_name: str, base_name: str) -> None:
    base = _base_shape(base_cfg)
    if base["architecture"] is None:
        raise LoadError(
            f"finetune {ft_name!r} is a Hugging Face checkpoint, but the base {base_name!r} is not one TransformerLens "
            "converted from Hugging Face (a toy-zoo model?); finetunes of a zoo model must be zoo models"
        )
    message = shape_mismatch(base, ft_shape)
    if message:
        raise LoadError(
            f"finetune {ft_name!r} does not have the base model's architecture ({message.replace('; base ', f'; base {base_name!r} ')}). "
            "The SAE reads the base's residual stream, so a finetune must keep its architecture and width."
        )
