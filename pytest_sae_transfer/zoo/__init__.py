"""The bundled toy zoo: a tiny base LM, two finetunes, base-model SAEs and
held-out eval text, all shipped inside the package so that everything works
offline.

Built by ``scripts/build_zoo.py`` from text that ships with every CPython
(stdlib docstrings, ``pydoc_data.topics`` and stdlib source code).

* models    ``toy-base`` (trained on stdlib prose), ``toy-prose`` (a mild prose
            finetune: base SAEs transfer) and ``toy-code`` (a heavy finetune on
            stdlib code: base SAEs do not transfer).
* release   ``toy-res``: sae_lens SAEs trained on ``toy-base`` at
            ``blocks.1.hook_resid_post`` (a standard L1 SAE, the default, and a
            topk SAE, sae_id ``blocks.1.hook_resid_post-topk``).
* datasets  ``toy-eval`` (held-out prose) and ``toy-eval-code`` (held-out
            code), JSON lines with a ``text`` field.

Importing this module is cheap: torch, transformers and transformer_lens are
imported only inside the loaders.  Nothing here touches the network.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformer_lens import HookedTransformer

__all__ = [
    "ZOO_DIR",
    "manifest",
    "model_names",
    "is_zoo_model",
    "release_names",
    "is_zoo_release",
    "sae_ids",
    "sae_dir",
    "dataset_names",
    "is_zoo_dataset",
    "dataset_path",
    "tokenizer_dir",
    "load_tokenizer",
    "model_files",
    "model_dir",
    "load_model",
    "load_sae",
]

ZOO_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent / "data"
MANIFEST_FILE = "zoo.json"


@functools.lru_cache(maxsize=1)
def _manifest_cached() -> dict[str, Any]:
    path = ZOO_DIR / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"toy zoo manifest not found at {path}; rebuild it with `python scripts/build_zoo.py`"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def manifest() -> dict[str, Any]:
    """The parsed ``zoo.json`` (cached; do not mutate)."""
    return _manifest_cached()


def _unknown(kind: str, name: object, valid: list[str]) -> KeyError:
    return KeyError(f"unknown toy-zoo {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


# ---------------------------------------------------------------- models


def model_names() -> list[str]:
    return sorted(manifest()["models"])


def is_zoo_model(name: str) -> bool:
    return isinstance(name, str) and name in manifest()["models"]


def _model_entry(name: str) -> dict[str, Any]:
    if not is_zoo_model(name):
        raise _unknown("model", name, model_names())
    return manifest()["models"][name]


def model_dir(name: str) -> pathlib.Path:
    return ZOO_DIR / _model_entry(name)["dir"]


def model_files(name: str) -> list[pathlib.Path]:
    """The files that make up a model (weights, config and the shared tokenizer), sorted."""
    d = model_dir(name)
    files = [d / "config.json", d / "model.safetensors"]
    tdir = tokenizer_dir()
    files += sorted(p for p in tdir.iterdir() if p.is_file())
    return files


def _model_config(name: str) -> dict[str, Any]:
    with open(model_dir(name) / "config.json", encoding="utf-8") as f:
        return json.load(f)


def load_model(name: str, device: str = "cpu", dtype: "torch.dtype | str" = "float32") -> "HookedTransformer":
    """Rebuild a zoo model as a TransformerLens ``HookedTransformer``.

    The weights are used exactly as trained: no LayerNorm folding, no weight
    centring.  The stored fp16 weights are converted to ``dtype``.
    """
    entry = _model_entry(name)  # raises KeyError for unknown names
    import torch
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if isinstance(dtype, str):
        dt = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = dt
    cfg = _model_config(name)
    cfg["dtype"] = dtype
    cfg["device"] = str(device)
    cfg["init_weights"] = False  # every parameter is overwritten below
    model = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=load_tokenizer(), move_to_device=False)
    state = load_file(str(ZOO_DIR / entry["dir"] / "model.safetensors"), device="cpu")
    state = {k: v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {k for k, _ in model.named_buffers()}
    if unexpected or not set(missing) <= buffers:
        raise RuntimeError(
            f"toy-zoo model {name!r} does not match its config: missing={sorted(set(missing) - buffers)}, "
            f"unexpected={sorted(unexpected)}"
        )
    model.to(device, print_details=False)  # no "Moving model to device" line
    model.eval()
    return model


# ---------------------------------------------------------------- SAEs


def release_names() -> list[str]:
    return sorted(manifest()["saes"])


def is_zoo_release(name: str) -> bool:
    return isinstance(name, str) and name in manifest()["saes"]


def sae_ids(release: str) -> list[str]:
    if not is_zoo_release(release):
        raise _unknown("release", release, release_names())
    return sorted(manifest()["saes"][release])


def _default_sae_id(release: str) -> str:
    ids = manifest()["saes"][release]
    for sid, entry in ids.items():
        if entry.get("default"):
            return sid
    return sorted(ids)[0]


def sae_dir(release: str, sae_id: str | None = None) -> pathlib.Path:
    """Directory of one SAE (``cfg.json`` + ``sae_weights.safetensors``), loadable
    with ``sae_lens.SAE.load_from_disk``.  ``sae_id=None`` gives the release's
    standard SAE."""
    ids = sae_ids(release)
    if sae_id is None:
        sae_id = _default_sae_id(release)
    if sae_id not in ids:
        raise _unknown(f"sae_id (release {release!r})", sae_id, ids)
    return ZOO_DIR / manifest()["saes"][release][sae_id]["dir"]


def load_sae(release: str, sae_id: str | None = None, device: str = "cpu", dtype: str = "float32"):
    """Convenience: ``sae_lens.SAE.load_from_disk(sae_dir(release, sae_id))``."""
    path = sae_dir(release, sae_id)
    from sae_lens import SAE

    return SAE.load_from_disk(str(path), device=device, dtype=dtype)


# ---------------------------------------------------------------- datasets


def dataset_names() -> list[str]:
    return sorted(manifest()["datasets"])


def is_zoo_dataset(name: str) -> bool:
    return isinstance(name, str) and name in manifest()["datasets"]


def dataset_path(name: str) -> pathlib.Path:
    """Path of a JSON-lines file, one ``{"text": ...}`` object per line."""
    if not is_zoo_dataset(name):
        raise _unknown("dataset", name, dataset_names())
    return ZOO_DIR / manifest()["datasets"][name]["file"]


# ---------------------------------------------------------------- tokenizer


def tokenizer_dir() -> pathlib.Path:
    return ZOO_DIR / manifest()["tokenizer"]["dir"]


def load_tokenizer():
    """The zoo's byte-level BPE tokenizer as a ``transformers.PreTrainedTokenizerFast``
    (``<bos>``/``<eos>``/``<pad>`` = 0/1/2, padding on the right; it does not add
    BOS by itself)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(
        str(tokenizer_dir()),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
        local_files_only=True,
    )
