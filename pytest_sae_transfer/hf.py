"""Hugging Face checkpoints as TransformerLens models: the base and its finetunes.

Where a model comes from decides how it is built:

* **A TransformerLens official name as the base** (``gemma-2b``, ``mistral-7b``,
  ``gpt2-small`` ...): ``HookedTransformer.from_pretrained_no_processing(name,
  **model_from_pretrained_kwargs)``, exactly what sae_lens does for the default
  ``HookedTransformer`` model class (``sae_lens/load_model.py`` and
  ``sae_lens/evals.py``), so the SAE sees activations processed the way it was
  trained on them.
* **A local checkpoint directory as the base** (a ``save_pretrained`` directory):
  built without any hub call. The TransformerLens config comes from the
  directory's ``config.json`` (``convert_hf_model_config`` on a neutrally named
  copy of it, or, for the Gemma family, which TransformerLens configures by
  official name only, from :func:`_gemma_cfg_dict`), the weights from
  ``AutoModelForCausalLM.from_pretrained(dir, local_files_only=True)`` through
  ``get_pretrained_state_dict(..., hf_model=...)``, and the weight processing
  follows the same flags as above.
* **A finetune** (local directory or hub id): loaded with transformers and
  converted *into the base model's architecture*: the base's TransformerLens
  config (``base.model.cfg``, with ``d_vocab`` following the finetune's
  embedding rows) and the base's processing flags, read from the attribute
  :data:`PROCESSING_ATTR` that every model built here carries. No hub call is
  needed for the config.

Weights load only through safetensors, or ``torch.load(weights_only=True)`` for
``.bin`` checkpoints (transformers' own safe path); ``trust_remote_code`` is off
unless the caller turns it on. Anything that is not cached while the hub is
offline or unreachable becomes one :class:`~pytest_sae_transfer.loading.LoadError`
that says what is missing and how to provide it locally.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .loading import LoadError, _chain, _is_network_error, hub_offline, nearest, offline_message, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import HookedTransformer

    from .loading import LoadedModel

#: TransformerLens weight-processing flags, in ``load_and_process_state_dict`` order.
PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases", "refactor_factored_attn_matrices")

#: What ``HookedTransformer.from_pretrained_no_processing`` uses, and therefore what
#: sae_lens's ``load_model`` uses unless the SAE's ``model_from_pretrained_kwargs``
#: override a flag (e.g. ``{"center_writing_weights": True}`` for gpt2-small-mlp-tm).
NO_PROCESSING: dict[str, bool] = {flag: False for flag in PROCESSING_FLAGS}

#: ``HookedTransformer.from_pretrained``'s defaults, for reference (not used by default).
FROM_PRETRAINED_PROCESSING: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}

#: Attribute on every model built here: the processing flags it was built with.
#: A finetune reads the base's and is processed identically.
PROCESSING_ATTR = "_sae_transfer_processing"
#: Attribute on a finetune built here: its own tokenizer (or None when it ships none),
#: for :func:`check_tokenizers`. The model itself carries the base tokenizer.
OWN_TOKENIZER_ATTR = "_sae_transfer_tokenizer"
#: Attribute on every model built here: where it came from (for the report).
SOURCE_ATTR = "_sae_transfer_source"

#: model_from_pretrained_kwargs (besides the processing flags) that a converted checkpoint honours.
_CFG_KWARGS = frozenset({"n_devices", "default_prepend_bos", "first_n_layers", "n_ctx"})

#: model_from_pretrained_kwargs that the plugin's own options decide.
_OWNED_KWARGS = ("device", "dtype", "torch_dtype", "move_to_device", "tokenizer", "hf_model")

#: The study's two systems (seed/sae-transfer-blog-post.md) and what their SAEs are.
#: The registry (sae_lens/pretrained_saes.yaml, installed with sae_lens) holds the model,
#: repo, folder, expected L0/variance explained and config overrides offline, but not
#: d_in, d_sae, context size or dataset: those live in each SAE's cfg.json on the hub.
#: The values below are copied from SAELens's generated table of those cfg.json files,
#: docs/sae_table.md in jbloomAus/SAELens ("gemma-2b-res-jb" and "mistral-7b-res-wg"
#: sections), and agree with the study's table (16384 / 65536 features) and its datasets
#: (FineWeb for Gemma-2b, monology/pile-uncopyrighted for Mistral-7B). d_in is the
#: models' hidden size (google/gemma-2b and mistralai/Mistral-7B-v0.1 config.json).
STUDY_PAIRS: dict[str, dict[str, Any]] = {
    "gemma-2b": {
        "release": "gemma-2b-res-jb",
        "sae_id": "blocks.6.hook_resid_post",
        "model": "gemma-2b",
        "hf_model": "google/gemma-2b",
        "finetune": "shahdishank/gemma-2b-it-finetune-python-codes",
        "hook_name": "blocks.6.hook_resid_post",
        "d_in": 2048,
        "d_sae": 16384,
        "context_size": 1024,
        "dataset_path": "HuggingFaceFW/fineweb",
        "n_layers": 18,
        "d_vocab": 256000,
        "n_params": 2.51e9,
        "outlier_norm_study": 290.0,
    },
    "mistral-7b": {
        "release": "mistral-7b-res-wg",
        "sae_id": "blocks.8.hook_resid_pre",
        "model": "mistral-7b",
        "hf_model": "mistralai/Mistral-7B-v0.1",
        "finetune": "meta-math/MetaMath-Mistral-7B",
        "hook_name": "blocks.8.hook_resid_pre",
        "d_in": 4096,
        "d_sae": 65536,
        "context_size": 256,
        "dataset_path": "monology/pile-uncopyrighted",
        "n_layers": 32,
        "d_vocab": 32000,
        "n_params": 7.24e9,
        "outlier_norm_study": 200.0,
    },
}

_HOW_MODEL = (
    "Download it once on a machine with hub access (it lands in the HF cache; copy that cache here or set HF_HOME), "
    "or save it with transformers' save_pretrained(DIR) and pass the directory instead."
)
_HOW_TOKENIZER = (
    "Download it once on a machine with hub access, or save it with tokenizer.save_pretrained(DIR) and pass the directory."
)

_EXTRA_NETWORK_MARKERS = {
    "RevisionResolutionError",
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "ConnectionError",
    "Timeout",
}
_EXTRA_NETWORK_TEXT = (
    "could not be reached",
    "name or service not known",
    "temporary failure in name resolution",
    "couldn't connect",
    "could not connect",
    "connection refused",
    "network is unreachable",
    "local_files_only",
    "in the local cache",
    "in the disk cache",
    "cannot find the requested files",
    "outgoing traffic has been disabled",
)


# -- small helpers ----------------------------------------------------------------


def _unreachable(exc: BaseException) -> bool:
    """The hub was offline or unreachable, or a file was not cached."""
    if _is_network_error(exc):
        return True
    names = {type(e).__name__ for e in _chain(exc)}
    if names & _EXTRA_NETWORK_MARKERS:
        return True
    text = " ".join(str(e) for e in _chain(exc)).lower()
    return any(marker in text for marker in _EXTRA_NETWORK_TEXT)


def _names(exc: BaseException) -> set[str]:
    return {type(e).__name__ for e in _chain(exc)}


def _hub_error(exc: BaseException, what: str, name: str, how: str = _HOW_MODEL) -> LoadError:
    """One LoadError for a failed hub access."""
    names = _names(exc)
    if "GatedRepoError" in names:
        return LoadError(
            f"{what} {name!r} is a gated repository on the Hugging Face hub: accept its licence on the model page, "
            "then log in (`hf auth login`, or set HF_TOKEN) and run again"
        )
    if "RepositoryNotFoundError" in names and not hub_offline():
        return LoadError(
            f"{what} {name!r} does not exist on the Hugging Face hub (or is private: log in with `hf auth login` or set HF_TOKEN); "
            "check the id, or pass a local directory"
        )
    if "RevisionNotFoundError" in names and not hub_offline():
        return LoadError(f"{what} {name!r}: the requested revision does not exist on the hub")
    if hub_offline() or _unreachable(exc):
        return LoadError(offline_message(what, name, how))
    return LoadError(f"could not load {what} {name!r}: {type(exc).__name__}: {_short(exc)}")


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _local_only() -> bool:
    if hub_offline():
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def _no_network(active: bool) -> Iterator[None]:
    """While active, huggingface_hub (and transformers through it) serves files from the cache only.

    Used once the hub did not answer: without it, every optional file transformers
    probes for would be retried over a dead connection.
    """
    if not active:
        yield
        return
    try:
        from huggingface_hub import constants
    except Exception:  # noqa: BLE001
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _dtype_kwarg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    try:
        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


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


def _flags_of(model: Any) -> dict[str, bool] | None:
    flags = getattr(model, PROCESSING_ATTR, None)
    return dict(flags) if isinstance(flags, dict) else None


def _describe_flags(flags: dict[str, bool]) -> str:
    on = [k for k, v in flags.items() if v]
    return "no weight processing" if not on else "weight processing " + ", ".join(on)


def _tl_official_name(name: str) -> str | None:
    """The HF repo id behind a TransformerLens official name or alias (no network)."""
    from transformer_lens import loading_from_pretrained as tl_loading

    try:
        return tl_loading.get_official_model_name(name)
    except ValueError:
        return None


def _tl_model_names() -> list[str]:
    from transformer_lens import loading_from_pretrained as tl_loading

    names = list(tl_loading.OFFICIAL_MODEL_NAMES)
    for aliases in tl_loading.MODEL_ALIASES.values():
        names.extend(aliases)
    return names


_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _check_repo_id(name: str, what: str) -> None:
    if not _REPO_ID_RE.match(name) or ".." in name or len(name) > 96:
        raise LoadError(
            f"{what} {name!r} is neither an existing directory nor a valid Hugging Face model id (owner/name)"
            f"{nearest(name, _tl_model_names())}"
        )


def resolve_hub_revision(repo_id: str, what: str = "model", display: str | None = None, how: str = _HOW_MODEL) -> str:
    """The commit ``repo_id``'s default branch points to, from the hub or (offline) the local cache.

    Fails fast, without the retries a file download makes, with one LoadError when
    the repository is neither reachable nor cached.
    """
    return _resolve(repo_id, what, display or repo_id, how)[0]


def _resolve(repo_id: str, what: str, display: str, how: str = _HOW_MODEL) -> tuple[str, bool]:
    """(commit, local_only): the hub's answer when it can be reached, else the cache's refs/main.

    ``local_only`` is True when the rest of the load must not touch the network
    (offline mode, or the hub did not answer): every later file then comes from the
    cache, with no per-file retries.
    """
    if not _local_only():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(repo_id).sha
            if sha:
                return str(sha), False
        except Exception as exc:  # noqa: BLE001
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if (isinstance(status, int) and status < 500) or "ProxyError" in _names(exc):
                raise _hub_error(exc, what, display, how) from None
            # unreachable or down: fall back on the cache, like huggingface_hub's resolve_revision
    commit = cached_commit(repo_id)
    if commit is None:
        raise LoadError(offline_message(what, display, how))
    return commit, True


@contextlib.contextmanager
def hub_access(repo_id: str, what: str = "model", display: str | None = None, how: str = _HOW_MODEL) -> Iterator[str]:
    """Guard any hub download (an SAE's files, a dataset, a model): yields the commit.

    Resolves ``repo_id`` first, which fails fast with one LoadError when the repository is
    neither reachable nor cached; when the hub did not answer but the cache has it, the body
    runs with huggingface_hub in offline mode, so no file is retried over a dead connection.
    """
    commit, local_only = _resolve(repo_id, what, display or repo_id, how)
    with _no_network(local_only):
        yield commit


def hub_repo_id(name: str) -> str:
    """The hub repository behind a model name: a TransformerLens alias ('gemma-2b') maps to its
    official id ('google/gemma-2b'); anything else is returned as it is (no network)."""
    return _tl_official_name(name) or name


def cached_commit(repo_id: str, revision: str = "main") -> str | None:
    """The commit the local HF cache records for ``repo_id``'s ``revision`` (no network).

    The cache is where huggingface_hub puts it (HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub), read from its own constants rather than recomputed.
    """
    try:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        return None
    ref = cache / ("models--" + repo_id.replace("/", "--")) / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit or None


def _snapshot_dir(repo_id: str, commit: str) -> Path | None:
    """The cache directory holding ``repo_id`` at ``commit`` (after its config.json was fetched)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json", revision=commit)
    except Exception:  # noqa: BLE001
        return None
    return Path(cached).parent if isinstance(cached, str) else None


# -- tokenizers --------------------------------------------------------------------


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, *, revision: str | None = None) -> Any:
    """``AutoTokenizer`` for a directory, a hub id or a TransformerLens name; offline-safe.

    A tokenizer that is not cached while the hub is offline or unreachable is one
    LoadError with the fix.
    """
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not _has_tokenizer_files(path):
            raise LoadError(
                f"{str(path)!r} has no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json ...); "
                "save the tokenizer next to the weights with tokenizer.save_pretrained(DIR)"
            )
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001
            raise LoadError(
                f"could not load a tokenizer from {str(path)!r} ({type(exc).__name__}: {_short(exc)}); "
                "the directory needs the files tokenizer.save_pretrained writes (tokenizer.json or tokenizer.model, tokenizer_config.json)"
            ) from None
    if _is_zoo_model(name_or_path):
        from . import zoo

        return zoo.load_tokenizer()
    repo = _tl_official_name(name_or_path) or name_or_path
    _check_repo_id(repo, "tokenizer")
    if revision is None:
        revision, local_only = _resolve(repo, "tokenizer", name_or_path, _HOW_TOKENIZER)
    else:
        local_only = _local_only()
    try:
        with _no_network(local_only):
            tokenizer = AutoTokenizer.from_pretrained(
                repo, local_files_only=local_only, trust_remote_code=trust_remote_code, revision=revision
            )
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, "tokenizer", name_or_path, _HOW_TOKENIZER) from None
    snapshot = _snapshot_dir(repo, revision)
    if snapshot is not None and not _has_tokenizer_files(snapshot):
        raise LoadError(f"hub repository {repo!r} ships no tokenizer files; save one with tokenizer.save_pretrained(DIR) and load from that directory")
    return tokenizer


def _is_zoo_model(name: str) -> bool:
    try:
        from . import zoo

        return bool(zoo.is_zoo_model(name))
    except Exception:  # noqa: BLE001 - a missing zoo must not break hub loading
        return False


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
)


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES) or any(directory.glob("*.tiktoken"))


def _maybe_tokenizer(src: str, trust_remote_code: bool, local_only: bool, revision: str | None = None, files: Path | None = None) -> Any:
    """The checkpoint's own tokenizer, or None when it ships none.

    ``files`` is the directory the checkpoint's files are in (the snapshot, for a hub
    id): transformers 5 builds an *empty* tokenizer of the config's class from a
    directory with no tokenizer files, which must not pass for the checkpoint's own.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=local_only, trust_remote_code=trust_remote_code, revision=revision)
    except Exception:  # noqa: BLE001
        return None
    if files is not None and not _has_tokenizer_files(files):
        return None
    return tokenizer


def check_tokenizers(base_tokenizer: Any, ft_tokenizer: Any, sample_texts: Sequence[str], allow_mismatch: bool = False) -> list[str]:
    """Notes when the finetune tokenizer encodes ``sample_texts`` exactly as the base does.

    Every model is fed the base tokenization; a finetune whose tokenizer encodes
    the same text differently would be evaluated on ids it does not use that way.
    That is a LoadError unless ``allow_mismatch``, in which case it becomes a note.
    """
    if ft_tokenizer is None:
        return ["the finetune ships no tokenizer; it is evaluated with the base tokenizer (nothing to compare)"]
    if base_tokenizer is None:
        return ["the base model has no tokenizer; the finetune tokenizer was not compared"]
    problems: list[str] = []
    for attr in ("bos_token_id",):
        a, b = getattr(base_tokenizer, attr, None), getattr(ft_tokenizer, attr, None)
        if a is not None and b is not None and a != b:
            problems.append(f"{attr.replace('_token_id', '').upper()} id differs (base {a}, finetune {b})")
    n_diff = 0
    first: str | None = None
    n_checked = 0
    for i, text in enumerate(sample_texts):
        if not isinstance(text, str) or not text:
            continue
        n_checked += 1
        a = list(base_tokenizer(text, add_special_tokens=False)["input_ids"])
        b = list(ft_tokenizer(text, add_special_tokens=False)["input_ids"])
        if a == b:
            continue
        n_diff += 1
        if first is None:
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            first = (
                f"sample {i} first differs at token {j}: base {a[j:j + 6]} vs finetune {b[j:j + 6]}"
                f" ({len(a)} vs {len(b)} tokens)"
            )
    if n_diff:
        problems.append(f"{n_diff} of {n_checked} sample texts encode differently; {first}")
    notes: list[str] = []
    len_b, len_f = _tok_len(base_tokenizer), _tok_len(ft_tokenizer)
    if not problems:
        if len_b is not None and len_f is not None and len_b != len_f:
            notes.append(
                f"the finetune tokenizer has {len_f} tokens, the base {len_b}; the {n_checked} sample texts encode identically"
            )
        return notes
    message = (
        "the finetune tokenizer does not match the base tokenizer: " + "; ".join(problems) + ". "
        "Every model is fed the base tokenization, so the finetune would be evaluated on token ids it reads differently."
    )
    if not allow_mismatch:
        raise LoadError(message + " Pass --sae-allow-tokenizer-mismatch to evaluate anyway.")
    return [message + " Evaluated anyway (--sae-allow-tokenizer-mismatch)."]


def _tok_len(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)
    except Exception:  # noqa: BLE001
        return None


# -- configs -----------------------------------------------------------------------

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


def _rope_theta(hf_config: Any, default: float = 10000.0) -> float:
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
        "rotary_base": _rope_theta(c),
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


def _tl_cfg_dict(path: Path, hf_config: Any, trust_remote_code: bool) -> dict[str, Any]:
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
            raise LoadError(f"could not build a TransformerLens config from {str(path / 'config.json')!r}: {type(exc).__name__}: {_short(exc)}") from None
        finally:
            shutil.rmtree(neutral.parent, ignore_errors=True)
        cfg.pop("trust_remote_code", None)
    cfg["tokenizer_name"] = str(path)
    return cfg


def _finish_cfg(
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


def _effective_flags(flags: dict[str, bool], cfg: Any) -> dict[str, bool]:
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


def _hf_shape(hf_config: Any) -> dict[str, Any]:
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


def _check_same_architecture(base_cfg: Any, ft_shape: dict[str, Any], ft_name: str, base_name: str) -> None:
    base = _base_shape(base_cfg)
    if base["architecture"] is None:
        raise LoadError(
            f"finetune {ft_name!r} is a Hugging Face checkpoint, but the base {base_name!r} is not one TransformerLens "
            "converted from Hugging Face (a toy-zoo model?); finetunes of a zoo model must be zoo models"
        )
    mismatched = []
    if ft_shape["architecture"] is not None and ft_shape["architecture"] != base["architecture"]:
        mismatched.append("architecture")
    for key in ("d_model", "n_layers", "n_heads", "n_key_value_heads", "d_mlp"):
        if ft_shape.get(key) is not None and base.get(key) is not None and ft_shape[key] != base[key]:
            mismatched.append(key)
    if mismatched:
        raise LoadError(
            f"finetune {ft_name!r} does not have the base model's architecture ({', '.join(mismatched)} differ(s)): "
            f"finetune {_shape_text(ft_shape)}; base {base_name!r} {_shape_text(base)}. "
            "The SAE reads the base's residual stream, so a finetune must keep its architecture and width."
        )


# -- building models ---------------------------------------------------------------


def _auto_config(src: str, *, local_only: bool, trust_remote_code: bool, revision: str | None = None) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(src, local_files_only=local_only, trust_remote_code=trust_remote_code, revision=revision)


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


def _build_base(
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
    ignored = sorted(set(extra) - _CFG_KWARGS)
    if ignored:
        notes.append(f"model_from_pretrained_kwargs {ignored} do not apply to a checkpoint converted here and were ignored")
    cfg_dict = _tl_cfg_dict(cfg_dir, hf_config, trust_remote_code)
    hf_model = load_weights()
    big = _is_big(hf_model)
    rows_in, rows_out = _vocab_rows(hf_model)
    cfg_dict["d_vocab"] = rows_in
    if rows_out != rows_in:
        cfg_dict["d_vocab_out"] = rows_out
    cfg = _finish_cfg(cfg_dict, model_name=display.rstrip("/").split("/")[-1], flags=flags, device=device, dtype=torch_dtype(dtype), extra=extra)
    cfg.tokenizer_name = display
    flags = _effective_flags(flags, cfg)
    try:
        state_dict = _state_dict(cfg_dir, cfg, hf_model, dtype)
        del hf_model
        model = _assemble(cfg, state_dict, flags, tokenizer, reuse_tokenizer=False)
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"could not convert {display!r} to a TransformerLens model: {type(exc).__name__}: {_short(exc)}") from None
    finally:
        _release(big)
    notes.append(f"{display}: converted from its Hugging Face checkpoint with {_describe_flags(flags)}")
    return model, notes


def _load_hf_model(src: str, display: str, dtype: str, *, local_only: bool, trust_remote_code: bool, revision: str | None = None) -> Any:
    try:
        return _auto_model(src, dtype, local_only=local_only, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as exc:  # noqa: BLE001
        if Path(src).is_dir():
            raise LoadError(f"could not load the weights in {src!r}: {type(exc).__name__}: {_short(exc)}") from None
        raise _hub_error(exc, "model", display) from None


def _build_finetune(
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
    _check_same_architecture(bcfg, _hf_shape(hf_config), display, base.name)
    flags = _flags_of(base_model)
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
    theta = _rope_theta(hf_config, default=float("nan"))
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
            f"{type(exc).__name__}: {_short(exc)}"
        ) from None
    finally:
        _release(big)
    setattr(model, OWN_TOKENIZER_ATTR, own_tokenizer)
    if own_tokenizer is None:
        notes.append(f"finetune {display!r} ships no tokenizer; it is fed the base tokenization")
    return model, notes


# -- public entry points -----------------------------------------------------------


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
        hf_config = _auto_config(str(path), local_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"could not read the model config in {str(path / 'config.json')!r}: {type(exc).__name__}: {_short(exc)}") from None
    own_tokenizer = _maybe_tokenizer(str(path), trust_remote_code, local_only=True, files=path)
    load_weights = lambda: _load_hf_model(str(path), display, dtype, local_only=True, trust_remote_code=trust_remote_code)  # noqa: E731
    if base is None:
        model, notes = _build_base(hf_config, path, load_weights, own_tokenizer, display, device, dtype, model_kwargs, trust_remote_code)
        setattr(model, SOURCE_ATTR, {"kind": "local", "path": display})
        return model, notes
    model, notes = _build_finetune(
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
    official = _tl_official_name(name) if base is None else None
    if official is not None:
        return _load_official_base(name, official, device, dtype, model_kwargs, trust_remote_code)
    _check_repo_id(name, "model")
    what = "model" if base is None else "finetune"
    commit, local_only = _resolve(name, what, name)
    with _no_network(local_only):
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
        hf_config = _auto_config(name, local_only=local_only, trust_remote_code=trust_remote_code, revision=commit)
    except Exception as exc:  # noqa: BLE001
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise LoadError(f"{what} {name!r} needs code from its repository to load; pass --sae-trust-remote-code if you trust it") from None
        raise _hub_error(exc, what, name) from None
    own_tokenizer = _maybe_tokenizer(name, trust_remote_code, local_only, revision=commit)
    snapshot = _snapshot_dir(name, commit)
    if snapshot is not None and not _has_tokenizer_files(snapshot):
        own_tokenizer = None
    load_weights = lambda: _load_hf_model(name, name, dtype, local_only=local_only, trust_remote_code=trust_remote_code, revision=commit)  # noqa: E731
    if base is None:
        if snapshot is None:
            raise LoadError(offline_message(what, name, _HOW_MODEL))
        model, notes = _build_base(hf_config, snapshot, load_weights, own_tokenizer, name, device, dtype, model_kwargs, trust_remote_code)
    else:
        anchor = snapshot if snapshot is not None else Path(tempfile.gettempdir())
        model, notes = _build_finetune(hf_config, load_weights, anchor, name, base, device, dtype, own_tokenizer)
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
    commit, local_only = _resolve(official, "model", display) if needs_hub else ("unversioned", _local_only())
    kwargs = dict(extra)
    if needs_hub:
        kwargs.setdefault("revision", commit)
    if local_only:
        kwargs.setdefault("local_files_only", True)
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        with _no_network(local_only):
            model = HookedTransformer.from_pretrained_no_processing(
                name, device=device, dtype=torch_dtype(dtype), **flags, **kwargs
            )
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, "model", display) from None
    model.eval()
    setattr(model, PROCESSING_ATTR, _effective_flags(flags, model.cfg))
    setattr(model, SOURCE_ATTR, {"kind": "hub", "repo": official, "commit": commit, "transformer_lens_name": name})
    notes.append(f"{name}: TransformerLens official model {official}@{commit[:12]} with {_describe_flags(flags)} (as sae_lens loads it)")
    return model, notes, f"hub:{official}@{commit}"
