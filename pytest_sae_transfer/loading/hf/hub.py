"""The Hugging Face hub: offline policy, resolving a repository to a commit, and what a
failed hub access means for the user.

Every hub access is resolved to a commit first: with no network this fails in
seconds with one :class:`~pytest_sae_transfer.loading.common.LoadError`, instead
of after the retries a file download makes; when the hub does not answer but the
local cache has the repository, the rest of the load runs with huggingface_hub in
offline mode.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from ..common import LoadError, nearest

HOW_MODEL = (
    "Download it once on a machine with hub access (it lands in the HF cache; copy that cache here or set HF_HOME), "
    "or save it with transformers' save_pretrained(DIR) and pass the directory instead."
)

HOW_TOKENIZER = (
    "Download it once on a machine with hub access, or save it with tokenizer.save_pretrained(DIR) and pass the directory."
)


#: Exception type names (anywhere in the cause chain) that mean the hub was offline or
#: unreachable, or that a file was not in the local cache.
_NETWORK_ERROR_TYPES = frozenset(
    {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectionError",
        "ConnectTimeout",
        "ConnectError",
        "ReadTimeout",
        "Timeout",
        "MaxRetryError",
        "HfHubHTTPError",
        "RepositoryNotFoundError",
        "GatedRepoError",
        "EntryNotFoundError",
        "RevisionResolutionError",
        "gaierror",
    }
)
#: Message fragments that mean the same when the exception type does not say it.
_NETWORK_ERROR_TEXT = (
    "offline",
    "connection",
    "could not be reached",
    "name or service not known",
    "temporary failure in name resolution",
    "couldn't connect",
    "could not connect",
    "network is unreachable",
    "local_files_only",
    "in the local cache",
    "in the disk cache",
    "cannot find the requested files",
    "outgoing traffic has been disabled",
)


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and its causes/contexts, each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def error_names(exc: BaseException) -> set[str]:
    return {type(e).__name__ for e in exception_chain(exc)}


def is_network_error(exc: BaseException) -> bool:
    """The hub was offline or unreachable, or a file was not cached."""
    if error_names(exc) & _NETWORK_ERROR_TYPES:
        return True
    text = " ".join(str(e) for e in exception_chain(exc)).lower()
    return any(marker in text for marker in _NETWORK_ERROR_TEXT)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def offline_message(what: str, name: str, how: str) -> str:
    state = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face hub could not be reached"
    return f"{what} {name!r} is not in the local cache and {state}. {how}"


def hub_error(exc: BaseException, what: str, name: str, how: str = HOW_MODEL) -> LoadError:
    """One LoadError for a failed hub access."""
    names = error_names(exc)
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
    if hub_offline() or is_network_error(exc):
        return LoadError(offline_message(what, name, how))
    return LoadError(f"could not load {what} {name!r}: {type(exc).__name__}: {short_text(exc)}")


def short_text(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def offline_only() -> bool:
    if hub_offline():
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def no_network(active: bool) -> Iterator[None]:
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


def tl_official_name(name: str) -> str | None:
    """The HF repo id behind a TransformerLens official name or alias (no network)."""
    from transformer_lens import loading_from_pretrained as tl_loading

    try:
        return tl_loading.get_official_model_name(name)
    except ValueError:
        return None


def tl_model_names() -> list[str]:
    from transformer_lens import loading_from_pretrained as tl_loading

    names = list(tl_loading.OFFICIAL_MODEL_NAMES)
    for aliases in tl_loading.MODEL_ALIASES.values():
        names.extend(aliases)
    return names


_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_repo_id(name: str, what: str) -> None:
    if not _REPO_ID_RE.match(name) or ".." in name or len(name) > 96:
        raise LoadError(
            f"{what} {name!r} is neither an existing directory nor a valid Hugging Face model id (owner/name)"
            f"{nearest(name, tl_model_names())}"
        )


def resolve_commit(repo_id: str, what: str, display: str, how: str = HOW_MODEL) -> tuple[str, bool]:
    """(commit, local_only): the hub's answer when it can be reached, else the cache's refs/main.

    ``local_only`` is True when the rest of the load must not touch the network
    (offline mode, or the hub did not answer): every later file then comes from the
    cache, with no per-file retries.
    """
    if not offline_only():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(repo_id).sha
            if sha:
                return str(sha), False
        except Exception as exc:  # noqa: BLE001
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if (isinstance(status, int) and status < 500) or "ProxyError" in error_names(exc):
                raise hub_error(exc, what, display, how) from None
            # unreachable or down: fall back on the cache, like huggingface_hub's resolve_revision
    commit = cached_commit(repo_id)
    if commit is None:
        raise LoadError(offline_message(what, display, how))
    return commit, True


@contextlib.contextmanager
def hub_access(repo_id: str, what: str = "model", display: str | None = None, how: str = HOW_MODEL) -> Iterator[str]:
    """Guard any hub download (an SAE's files, a dataset, a model): yields the commit.

    Resolves ``repo_id`` first, which fails fast with one LoadError when the repository is
    neither reachable nor cached; when the hub did not answer but the cache has it, the body
    runs with huggingface_hub in offline mode, so no file is retried over a dead connection.
    """
    commit, local_only = resolve_commit(repo_id, what, display or repo_id, how)
    with no_network(local_only):
        yield commit


def hub_repo_id(name: str) -> str:
    """The hub repository behind a model name: a TransformerLens alias ('gemma-2b') maps to its
    official id ('google/gemma-2b'); anything else is returned as it is (no network)."""
    return tl_official_name(name) or name


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


def snapshot_dir(repo_id: str, commit: str) -> Path | None:
    """The cache directory holding ``repo_id`` at ``commit`` (after its config.json was fetched)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json", revision=commit)
    except Exception:  # noqa: BLE001
        return None
    return Path(cached).parent if isinstance(cached, str) else None

