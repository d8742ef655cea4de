"""Tokenizers: loading one offline-safely, and checking that a finetune's tokenizer reads
the evaluation text as the base's does (every model is fed the base tokenization)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ... import zoo
from ..common import LoadError, is_zoo_model
from .hub import (
    HOW_TOKENIZER,
    check_repo_id,
    hub_error,
    no_network,
    offline_only,
    resolve_commit,
    short_text,
    snapshot_dir,
    tl_official_name,
)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, *, revision: str | None = None) -> Any:
    """``AutoTokenizer`` for a directory, a hub id or a TransformerLens name; offline-safe.

    A tokenizer that is not cached while the hub is offline or unreachable is one
    LoadError with the fix.
    """
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not has_tokenizer_files(path):
            raise LoadError(
                f"{str(path)!r} has no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json ...); "
                "save the tokenizer next to the weights with tokenizer.save_pretrained(DIR)"
            )
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001
            raise LoadError(
                f"could not load a tokenizer from {str(path)!r} ({type(exc).__name__}: {short_text(exc)}); "
                "the directory needs the files tokenizer.save_pretrained writes (tokenizer.json or tokenizer.model, tokenizer_config.json)"
            ) from None
    if is_zoo_model(name_or_path):
        return zoo.load_tokenizer()
    repo = tl_official_name(name_or_path) or name_or_path
    check_repo_id(repo, "tokenizer")
    if revision is None:
        revision, local_only = resolve_commit(repo, "tokenizer", name_or_path, HOW_TOKENIZER)
    else:
        local_only = offline_only()
    try:
        with no_network(local_only):
            tokenizer = AutoTokenizer.from_pretrained(
                repo, local_files_only=local_only, trust_remote_code=trust_remote_code, revision=revision
            )
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, "tokenizer", name_or_path, HOW_TOKENIZER) from None
    snapshot = snapshot_dir(repo, revision)
    if snapshot is not None and not has_tokenizer_files(snapshot):
        raise LoadError(f"hub repository {repo!r} ships no tokenizer files; save one with tokenizer.save_pretrained(DIR) and load from that directory")
    return tokenizer


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


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES) or any(directory.glob("*.tiktoken"))


def checkpoint_tokenizer(src: str, trust_remote_code: bool, local_only: bool, revision: str | None = None, files: Path | None = None) -> Any:
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
    if files is not None and not has_tokenizer_files(files):
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

