"""Names and paths become models, SAEs and tokens.

Every failure a user can cause (an unknown name, a missing file, a hub artefact
that is not cached while offline, a dataset too small) raises :class:`LoadError`
with one message that says what was wrong and what would be right; the plugin
turns it into a pytest usage error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import zoo

#: Upper bounds on an SAE config read from disk, checked before any allocation.
MAX_SAE_D_IN = 1 << 16
MAX_SAE_D_SAE = 1 << 22
MAX_SAE_PARAMS = 1 << 34


class LoadError(Exception):
    """A model, SAE or dataset could not be loaded; the message says how to fix it."""


@contextlib.contextmanager
def quiet_third_party_warnings() -> Iterator[None]:
    """Silence the deprecation chatter sae_lens/transformer_lens/transformers emit on import and
    load; it is about their internals, not the user's code, and would fill every run's summary."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        yield


def _zoo_has(check: Any, name: str) -> bool:
    """A zoo lookup that treats a missing zoo (e.g. a partial source checkout) as "not a zoo name"."""
    try:
        return bool(check(name))
    except FileNotFoundError:
        return False


def is_zoo_model(name: str) -> bool:
    return _zoo_has(zoo.is_zoo_model, name)


def is_zoo_release(name: str) -> bool:
    return _zoo_has(zoo.is_zoo_release, name)


def is_zoo_dataset(name: str) -> bool:
    return _zoo_has(zoo.is_zoo_dataset, name)


def zoo_release_names() -> list[str]:
    """The zoo's SAE releases; none when the zoo is missing."""
    try:
        return zoo.release_names()
    except FileNotFoundError:
        return []


def nearest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'x' or 'y'?)' or '' when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def offline_message(what: str, name: str, how: str) -> str:
    state = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face hub could not be reached"
    return f"{what} {name!r} is not in the local cache and {state}. {how}"


# -- devices and dtypes -------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoadError(f"device {device!r} was asked for, but CUDA is not available here; use --sae-device cpu or auto")
        if ":" in device:
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise LoadError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise LoadError("device 'mps' was asked for, but Apple MPS is not available here; use --sae-device cpu or auto")
        return device
    if device == "cpu":
        return device
    raise LoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:<index>")


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}{nearest(dtype, DTYPES)}; use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# -- identities for the cache -------------------------------------------------

_HASH_FULL_LIMIT = 512 << 20  # files above this are identified by name, size and mtime


def file_identity(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        st = path.stat()
        h.update(path.name.encode())
        h.update(str(st.st_size).encode())
        if st.st_size <= _HASH_FULL_LIMIT:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


# -- SAEs ---------------------------------------------------------------------


@dataclasses.dataclass
class LoadedSAE:
    sae: Any
    kind: str  # "zoo", "registry" or "path"
    release: str | None
    sae_id: str | None
    path: str | None
    identity: str

    @property
    def metadata(self) -> Any:
        return self.sae.cfg.metadata

    @property
    def hook_name(self) -> str:
        return self.sae.cfg.metadata.hook_name

    @property
    def context_size(self) -> int | None:
        return self.sae.cfg.metadata.context_size

    @property
    def prepend_bos(self) -> bool:
        value = self.sae.cfg.metadata.prepend_bos
        return True if value is None else bool(value)

    @property
    def dataset(self) -> str | None:
        return self.sae.cfg.metadata.dataset_path

    @property
    def model_name(self) -> str | None:
        return self.sae.cfg.metadata.model_name

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.sae.cfg.metadata.model_from_pretrained_kwargs or {})

    def describe(self) -> dict[str, Any]:
        return {"sae_release": self.release, "sae_id": self.sae_id, "sae_path": self.path, "sae_kind": self.kind,
                "sae_architecture": self.sae.cfg.architecture(), "d_in": self.sae.cfg.d_in, "d_sae": self.sae.cfg.d_sae}


def registry_releases() -> dict[str, Any]:
    """sae_lens's pretrained registry (read from the installed package, no network)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def registry_sae_ids(release: str) -> list[str]:
    entry = registry_releases()[release]
    return list(entry.saes_map.keys())


def check_sae_config(cfg: dict[str, Any], where: str) -> None:
    """Reject absurd sizes from a config file before anything is allocated."""
    for key, limit in (("d_in", MAX_SAE_D_IN), ("d_sae", MAX_SAE_D_SAE)):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LoadError(f"{where}: {key} must be a positive integer; got {value!r}")
        if value > limit:
            raise LoadError(f"{where}: {key}={value} is larger than this plugin accepts ({limit}); the config looks corrupt or hostile")
    if cfg["d_in"] * cfg["d_sae"] * 2 > MAX_SAE_PARAMS:
        raise LoadError(f"{where}: d_in x d_sae = {cfg['d_in'] * cfg['d_sae']} parameters per matrix is too large to load")


def _load_sae_dir(path: Path, device: str, dtype: str | None) -> Any:
    from sae_lens import SAE

    cfg_path = path / "cfg.json"
    if not cfg_path.is_file():
        raise LoadError(f"SAE directory {str(path)!r} has no cfg.json; --sae-path must point to a directory written by sae_lens (cfg.json + sae_weights.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"SAE config {str(cfg_path)!r} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise LoadError(f"SAE config {str(cfg_path)!r} must be a JSON object")
    check_sae_config(cfg, str(cfg_path))
    if not (path / "sae_weights.safetensors").is_file():
        raise LoadError(f"SAE directory {str(path)!r} has no sae_weights.safetensors (only safetensors weights are loaded)")
    try:
        return SAE.load_from_disk(str(path), device=device, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad directory
        raise LoadError(f"could not load the SAE in {str(path)!r}: {type(exc).__name__}: {exc}") from None


def load_sae(
    release: str | None = None,
    sae_id: str | None = None,
    path: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
) -> LoadedSAE:
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise LoadError(f"--sae-path {path!r} does not exist; give a directory with cfg.json and sae_weights.safetensors")
        if not p.is_dir():
            raise LoadError(f"--sae-path {path!r} is not a directory; give the directory sae_lens saved the SAE into")
        sae = _load_sae_dir(p, device, dtype)
        return LoadedSAE(sae, "path", None, None, str(p), file_identity(list(p.glob("*.json")) + list(p.glob("*.safetensors"))))
    if not release:
        raise LoadError("no SAE given: pass --sae-release (with --sae-id) or --sae-path")
    if is_zoo_release(release):
        ids = zoo.sae_ids(release)
        if sae_id is not None and sae_id not in ids:
            raise LoadError(f"unknown SAE id {sae_id!r} in release {release!r}{nearest(sae_id, ids)}; valid ids: {', '.join(ids)}")
        directory = zoo.sae_dir(release, sae_id)
        sae = _load_sae_dir(directory, device, dtype)
        return LoadedSAE(sae, "zoo", release, sae_id or directory.name, str(directory), file_identity(directory.iterdir()))
    releases = registry_releases()
    if release not in releases:
        known = list(releases) + zoo_release_names()
        raise LoadError(f"unknown SAE release {release!r}{nearest(release, known)}; see sae_lens's pretrained_saes.yaml for the registry, or use --sae-path for a local SAE")
    ids = registry_sae_ids(release)
    if sae_id is None:
        if len(ids) == 1:
            sae_id = ids[0]
        else:
            shown = ", ".join(ids[:8]) + (" ..." if len(ids) > 8 else "")
            raise LoadError(f"release {release!r} holds {len(ids)} SAEs; choose one with --sae-id (e.g. {shown})")
    elif sae_id not in ids:
        raise LoadError(f"unknown SAE id {sae_id!r} in release {release!r}{nearest(sae_id, ids)}")
    from sae_lens import SAE

    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    from . import hf

    try:
        repo_id, _folder = get_repo_id_and_folder_name(release, sae_id)
        # Resolve the repository first: with no network this fails in seconds, not after retries.
        how = ("Download it once on a machine with hub access (it lands in the HF cache; copy that cache here or set HF_HOME), "
               "or save it with sae.save_model(DIR) and pass --sae-path DIR.")
        with hf.hub_access(repo_id, "SAE", f"{release}/{sae_id}", how):
            sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        if _is_network_error(exc):
            raise LoadError(
                offline_message("SAE", f"{release}/{sae_id}", "Download it once on a machine with hub access (its files land in the HF cache), or save it with sae.save_model(DIR) and pass --sae-path DIR.")
            ) from None
        raise LoadError(f"could not load SAE {release}/{sae_id}: {type(exc).__name__}: {exc}") from None
    import sae_lens

    identity = hashlib.sha256(f"registry:{release}:{sae_id}:{sae_lens.__version__}".encode()).hexdigest()
    return LoadedSAE(sae, "registry", release, sae_id, None, identity)


def _is_network_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    markers = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout", "MaxRetryError",
               "HfHubHTTPError", "RepositoryNotFoundError", "GatedRepoError", "EntryNotFoundError", "gaierror",
               "RevisionResolutionError", "ConnectError"}
    text = " ".join(str(e) for e in _chain(exc)).lower()
    return bool(names & markers) or "offline" in text or "connection" in text or "couldn't connect" in text


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# -- models -------------------------------------------------------------------


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
    from . import hf

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


# -- tokens -------------------------------------------------------------------


@dataclasses.dataclass
class TokenSet:
    tokens: Any  # LongTensor [contexts, context_size]
    info: dict[str, Any]


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
        if _is_network_error(exc) or hub_offline():
            raise LoadError(offline_message("dataset", dataset, "Pass a local file (.txt/.jsonl/.parquet) or a saved datasets directory with --sae-dataset.")) from None
        raise LoadError(f"could not open dataset {dataset!r}: {type(exc).__name__}: {exc}") from None
    yield first
    yield from iterator


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
    rows = iter_dataset_rows(dataset)
    if shuffle_seed is not None:
        # Shuffling needs the rows in memory; only done when asked for.
        import random

        materialised = list(rows)
        random.Random(shuffle_seed).shuffle(materialised)
        rows = iter(materialised)

    counts = {"rows_read": 0, "rows_empty": 0, "rows_truncated": 0, "rows_padded": 0}
    available = {"tokens": 0}  # tokens the rows read so far hold (for the "too few tokens" message)
    contexts: list[torch.Tensor] = []
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    column: str | None = None

    def text_tokens() -> Iterator[torch.Tensor]:
        for row in rows_after_first():
            counts["rows_read"] += 1
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise LoadError(f"dataset {dataset!r}: row {counts['rows_read']} has no text; rows need a 'text' string (or an 'input_ids'/'tokens' list)")
            if not text:
                counts["rows_empty"] += 1
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                counts["rows_empty"] += 1
                continue
            available["tokens"] += len(ids)
            yield torch.tensor(ids, dtype=torch.long)

    first_row: list[Any] = []

    def rows_after_first() -> Iterator[Any]:
        yield from first_row
        yield from rows

    try:
        first = next(rows)
    except StopIteration:
        raise LoadError(f"dataset {dataset!r} has no rows: there is nothing to evaluate; give a dataset with text") from None
    first_row.append(first)
    if isinstance(first, dict):
        column = next((c for c in ("input_ids", "tokens") if c in first), None)

    if column is not None:
        for row in rows_after_first():
            counts["rows_read"] += 1
            ids = list(row[column])
            if not ids:
                counts["rows_empty"] += 1
                continue
            available["tokens"] += len(ids)
            if len(ids) > context_size:
                counts["rows_truncated"] += 1
                ids = ids[:context_size]
            elif len(ids) < context_size:
                # Right padding: with causal attention it cannot change earlier positions,
                # and PAD positions are excluded from every statistic.
                counts["rows_padded"] += 1
                ids = ids + [pad] * (context_size - len(ids))
            contexts.append(torch.tensor(ids, dtype=torch.long))
            if len(contexts) == n_contexts:
                break
        mode = f"pre-tokenized ({column})"
    else:
        from sae_lens.tokenization_and_batching import concat_and_batch_sequences

        for ctx in concat_and_batch_sequences(
            text_tokens(),
            context_size=context_size,
            begin_batch_token_id=bos if prepend_bos else None,
            begin_sequence_token_id=None,
            sequence_separator_token_id=bos,
        ):
            contexts.append(ctx)
            if len(contexts) == n_contexts:
                break
        mode = "text, packed"

    if len(contexts) < n_contexts:
        have = len(contexts) * context_size
        rows = f"{counts['rows_read']} rows, {counts['rows_empty']} of them empty"
        if available["tokens"] == 0:
            raise LoadError(
                f"dataset {dataset!r} has no tokens to evaluate ({rows}); give a dataset with text, "
                "or a pre-tokenized one with an 'input_ids' or 'tokens' column"
            )
        fix = (
            f"lower --sae-tokens to at most {have}" if have
            else f"it does not fill one context of {context_size} tokens: lower --sae-context-size"
        )
        raise LoadError(
            f"dataset {dataset!r} has only {available['tokens']} tokens ({rows}): {len(contexts)} contexts of {context_size} "
            f"tokens, but --sae-tokens asks for {n_tokens} ({n_contexts} contexts); {fix} or use a larger dataset"
        )
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
        **counts,
    }
    return TokenSet(tokens, info)


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
    from .hf import cached_commit, hub_repo_id

    repo_id = hub_repo_id(name)  # a TransformerLens alias ('gemma-2b') names the repo 'google/gemma-2b'
    return f"hub:{repo_id}@{cached_commit(repo_id) or 'unresolved'}"
