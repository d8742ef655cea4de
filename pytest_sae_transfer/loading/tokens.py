"""Evaluation tokens: dataset rows read in order and packed into contexts the way sae_lens's
ActivationsStore packs them, with everything skipped or cut counted in the token set's info."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

from .. import zoo
from .common import LoadError, is_zoo_dataset
from .hf.hub import hub_offline, is_network_error, offline_message


@dataclasses.dataclass
class TokenSet:
    tokens: Any  # LongTensor [contexts, context_size]
    info: dict[str, Any]


def special_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's BOS, EOS and PAD ids, sorted: the positions left out of every statistic by default."""
    if tokenizer is None:
        return ()
    ids = {getattr(tokenizer, attr, None) for attr in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return tuple(sorted(i for i in ids if i is not None))


def _text_rows_from_file(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md"):
        # One document per line, as datasets' "text" builder reads it; empty lines are skipped and counted.
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                yield {"text": line.rstrip("\n")}
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            first = fh.read(1)
            fh.seek(0)
            if suffix == ".json" and first == "[":
                rows = json.load(fh)
                if not isinstance(rows, list):
                    raise LoadError(f"{path}: a .json dataset must be a list of objects or JSON lines")
                yield from rows
                return
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LoadError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be an object with a 'text' or 'input_ids' field") from None
    elif suffix == ".parquet":
        import datasets

        yield from datasets.load_dataset("parquet", data_files=str(path), split="train")
    else:
        raise LoadError(f"dataset file {str(path)!r} has an unsupported type; use .txt, .json, .jsonl or .parquet, or a saved datasets directory")


def iter_dataset_rows(dataset: str, split: str = "train", trust_remote_code: bool = False) -> Iterator[dict[str, Any]]:
    """Rows, in order, from a zoo name, a local file or directory, or a hub dataset (streamed)."""
    if is_zoo_dataset(dataset):
        yield from _text_rows_from_file(zoo.dataset_path(dataset))
        return
    path = Path(dataset).expanduser()
    if path.is_file():
        yield from _text_rows_from_file(path)
        return
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001
            raise LoadError(f"{dataset!r} is a directory but not a saved datasets dataset ({type(exc).__name__}: {exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise LoadError(f"saved dataset {dataset!r} has no split {split!r}; it has {list(ds)}")
            ds = ds[split]
        yield from ds
        return
    if dataset.startswith((".", "/", "~")):
        raise LoadError(
            f"dataset path {dataset!r} does not exist; pass --sae-dataset with a local .txt/.json/.jsonl/.parquet file, "
            "a saved datasets directory or a hub dataset name"
        )
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split=split, streaming=True, trust_remote_code=trust_remote_code) if trust_remote_code else datasets.load_dataset(dataset, split=split, streaming=True)
        iterator = iter(ds)
        first = next(iterator)
    except StopIteration:
        raise LoadError(f"hub dataset {dataset!r} is empty") from None
    except Exception as exc:  # noqa: BLE001
        if is_network_error(exc) or hub_offline():
            raise LoadError(offline_message("dataset", dataset, "Pass a local file (.txt/.jsonl/.parquet) or a saved datasets directory with --sae-dataset.")) from None
        raise LoadError(f"could not open dataset {dataset!r}: {type(exc).__name__}: {exc}") from None
    yield first
    yield from iterator


@dataclasses.dataclass
class _RowCounts:
    """What reading the rows skipped, cut or padded; reported in the token set's info."""

    rows_read: int = 0
    rows_empty: int = 0
    rows_truncated: int = 0
    rows_padded: int = 0
    tokens_available: int = 0  # tokens the rows read so far hold (for the "too few tokens" message)

    def info(self) -> dict[str, int]:
        return {"rows_read": self.rows_read, "rows_empty": self.rows_empty,
                "rows_truncated": self.rows_truncated, "rows_padded": self.rows_padded}


def load_tokens(
    dataset: str,
    tokenizer: Any,
    n_tokens: int,
    context_size: int,
    prepend_bos: bool = True,
    shuffle_seed: int | None = None,
    special_token_ids: Iterable[int] = (),
) -> TokenSet:
    """Pack ``dataset`` into ceil(n_tokens / context_size) contexts, as sae_lens's ActivationsStore does."""
    import torch

    if n_tokens <= 0:
        raise LoadError(f"--sae-tokens must be a positive number of tokens; got {n_tokens}")
    if context_size < 2:
        raise LoadError(f"--sae-context-size must be at least 2; got {context_size}")
    n_contexts = math.ceil(n_tokens / context_size)
    rows = _rows_in_order(dataset, shuffle_seed)
    try:
        first = next(rows)
    except StopIteration:
        raise LoadError(f"dataset {dataset!r} has no rows: there is nothing to evaluate; give a dataset with text") from None
    rows = _chain_first(first, rows)
    column = next((c for c in ("input_ids", "tokens") if c in first), None) if isinstance(first, dict) else None
    counts = _RowCounts()
    if column is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        contexts = _pretokenized_contexts(rows, column, context_size, n_contexts, pad, counts)
        mode = f"pre-tokenized ({column})"
    else:
        contexts = _packed_contexts(_text_token_stream(rows, tokenizer, dataset, counts), tokenizer.bos_token_id,
                                    prepend_bos, context_size, n_contexts)
        mode = "text, packed"
    if len(contexts) < n_contexts:
        raise _too_few_tokens(dataset, len(contexts), context_size, n_tokens, n_contexts, counts)
    tokens = torch.stack(contexts)
    special = torch.tensor(sorted(set(special_token_ids)), dtype=torch.long)
    n_special = int(torch.isin(tokens, special).sum()) if special.numel() else 0
    if special.numel() and n_special == tokens.numel():
        raise LoadError(f"dataset {dataset!r}: every token is a special token (BOS/EOS/PAD); there is nothing to evaluate")
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    info = {
        "dataset": dataset,
        "packing": mode,
        "n_contexts": n_contexts,
        "context_size": context_size,
        "n_tokens": int(tokens.numel()),
        "n_tokens_requested": n_tokens,
        "n_special_tokens": n_special,
        "prepend_bos": prepend_bos,
        "shuffle_seed": shuffle_seed,
        "tokens_sha256": digest,
        **counts.info(),
    }
    return TokenSet(tokens, info)


def _rows_in_order(dataset: str, shuffle_seed: int | None) -> Iterator[Any]:
    rows = iter_dataset_rows(dataset)
    if shuffle_seed is None:
        return rows
    # Shuffling needs the rows in memory; only done when asked for.
    import random

    materialised = list(rows)
    random.Random(shuffle_seed).shuffle(materialised)
    return iter(materialised)


def _chain_first(first: Any, rows: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rows


def _pretokenized_contexts(rows: Iterator[Any], column: str, context_size: int, n_contexts: int, pad: int,
                           counts: _RowCounts) -> list[Any]:
    """Each row is one context: cut to ``context_size``, or right-padded to it."""
    import torch

    contexts: list[Any] = []
    for row in rows:
        counts.rows_read += 1
        ids = list(row[column])
        if not ids:
            counts.rows_empty += 1
            continue
        counts.tokens_available += len(ids)
        if len(ids) > context_size:
            counts.rows_truncated += 1
            ids = ids[:context_size]
        elif len(ids) < context_size:
            # Right padding: with causal attention it cannot change earlier positions,
            # and PAD positions are excluded from every statistic.
            counts.rows_padded += 1
            ids = ids + [pad] * (context_size - len(ids))
        contexts.append(torch.tensor(ids, dtype=torch.long))
        if len(contexts) == n_contexts:
            break
    return contexts


def _text_token_stream(rows: Iterator[Any], tokenizer: Any, dataset: str, counts: _RowCounts) -> Iterator[Any]:
    """Each non-empty text row's token ids (no special tokens), as a LongTensor."""
    import torch

    for row in rows:
        counts.rows_read += 1
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise LoadError(f"dataset {dataset!r}: row {counts.rows_read} has no text; rows need a 'text' string (or an 'input_ids'/'tokens' list)")
        if not text:
            counts.rows_empty += 1
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            counts.rows_empty += 1
            continue
        counts.tokens_available += len(ids)
        yield torch.tensor(ids, dtype=torch.long)


def _packed_contexts(token_stream: Iterator[Any], bos: int | None, prepend_bos: bool, context_size: int,
                     n_contexts: int) -> list[Any]:
    """Documents concatenated with BOS between them, cut into contexts of ``context_size``
    that open with BOS when ``prepend_bos``; a document that already starts with BOS gets no
    second one. This is sae_lens's packing (``concat_and_batch_sequences`` with BOS as batch
    start and separator; tests/test_tokens.py compares the two), written here on plain lists
    so that building the tokens does not import sae_lens (seconds on a cached re-run)."""
    import torch

    contexts: list[Any] = []
    current: list[int] = []
    for doc in token_stream:
        ids = doc.tolist()
        i = 0
        while i < len(ids):
            if not current:
                if prepend_bos and bos is not None and ids[i] != bos:
                    current.append(bos)
            elif i == 0 and bos is not None and ids[0] != bos:
                current.append(bos)  # separator between two documents in one context
            take = context_size - len(current)
            current.extend(ids[i:i + take])
            i += take
            if len(current) == context_size:
                contexts.append(torch.tensor(current, dtype=torch.long))
                current = []
                if len(contexts) == n_contexts:
                    return contexts
    return contexts


def _too_few_tokens(dataset: str, n_have: int, context_size: int, n_tokens: int, n_contexts: int,
                    counts: _RowCounts) -> LoadError:
    have = n_have * context_size
    rows = f"{counts.rows_read} rows, {counts.rows_empty} of them empty"
    if counts.tokens_available == 0:
        return LoadError(
            f"dataset {dataset!r} has no tokens to evaluate ({rows}); give a dataset with text, "
            "or a pre-tokenized one with an 'input_ids' or 'tokens' column"
        )
    fix = (
        f"lower --sae-tokens to at most {have}" if have
        else f"it does not fill one context of {context_size} tokens: lower --sae-context-size"
    )
    return LoadError(
        f"dataset {dataset!r} has only {counts.tokens_available} tokens ({rows}): {n_have} contexts of {context_size} "
        f"tokens, but --sae-tokens asks for {n_tokens} ({n_contexts} contexts); {fix} or use a larger dataset"
    )
