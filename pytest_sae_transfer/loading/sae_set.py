"""The SAEs of one run: ids chosen from a release (exact ids, globs, ``all``), or local
directories (each an SAE, or a folder of SAE folders), loaded and checked to read the
same base model the same way. Each gets a short, unique key that names its results."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Sequence

from .. import zoo
from .common import LoadError, is_zoo_release, nearest
from .sae import LoadedSAE, load_sae, registry_releases, registry_sae_ids

_GLOB_CHARS = frozenset("*?[")


def natural_key(text: str) -> list[Any]:
    """Sort key that orders 'blocks.10' after 'blocks.2'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def release_sae_ids(release: str) -> list[str]:
    """Every SAE id of a zoo or registry release (no network)."""
    if is_zoo_release(release):
        return list(zoo.sae_ids(release))
    if release not in registry_releases():
        return []
    return registry_sae_ids(release)


def select_sae_ids(release: str, patterns: Sequence[str]) -> list[str]:
    """The ids ``patterns`` name in ``release``, in the order given (a glob's or ``all``'s
    matches in natural order), each once; the release's default SAE when none is given.
    Reads only the release's index (the zoo manifest or sae_lens's registry), no weights."""
    ids = release_sae_ids(release)
    if not ids:  # an unknown release: load_sae says so, with its suggestions
        load_sae(release, None)
    if not patterns:
        return [_default_id(release, ids)]
    chosen: list[str] = []
    for pattern in patterns:
        if pattern == "all":
            matched = sorted(ids, key=natural_key)
        elif _GLOB_CHARS & set(pattern):
            matched = sorted(fnmatch.filter(ids, pattern), key=natural_key)
            if not matched:
                raise LoadError(f"--sae-id {pattern!r} matches no SAE id of release {release!r}; its ids: {_shown(ids)}")
        elif pattern in ids:
            matched = [pattern]
        else:
            raise LoadError(f"unknown SAE id {pattern!r} in release {release!r}{nearest(pattern, ids)}; valid ids: {_shown(ids)}")
        chosen.extend(m for m in matched if m not in chosen)
    return chosen


def _default_id(release: str, ids: list[str]) -> str:
    if is_zoo_release(release):
        default_dir = zoo.sae_dir(release, None)
        return next(i for i in ids if zoo.sae_dir(release, i) == default_dir)
    if len(ids) == 1:
        return ids[0]
    raise LoadError(f"release {release!r} holds {len(ids)} SAEs; choose with --sae-id: an id, a glob such as "
                    f"'blocks.*.hook_resid_post', or 'all' (ids: {_shown(ids, 8)})")


def _shown(ids: Sequence[str], limit: int = 12) -> str:
    return ", ".join(ids[:limit]) + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


def expand_sae_paths(paths: Sequence[str]) -> list[Path]:
    """Each path as an SAE directory, or the SAE directories a folder holds (natural order)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir() and not (path / "cfg.json").is_file():
            inner = sorted((d for d in path.iterdir() if d.is_dir() and (d / "cfg.json").is_file()), key=lambda d: natural_key(d.name))
            if inner:
                out.extend(inner)
                continue
        out.append(path)  # load_sae says what is wrong with it, if anything
    return list(dict.fromkeys(out))


def plan_sae_keys(release: str | None, sae_ids: Sequence[str], sae_paths: Sequence[str]) -> list[str]:
    """The keys the run's SAEs will have, from names alone (no weights): gate items are
    collected before anything is loaded."""
    if sae_paths:
        return _unique_keys(expand_sae_paths(sae_paths))
    if not release:
        raise LoadError("no SAE given: pass --sae-release (with --sae-id) or --sae-path")
    return select_sae_ids(release, sae_ids)


def load_sae_set(release: str | None, sae_ids: Sequence[str], sae_paths: Sequence[str], device: str) -> list[LoadedSAE]:
    """The run's SAEs, keyed, checked to read one base model with one weight processing."""
    keys = plan_sae_keys(release, sae_ids, sae_paths)
    if sae_paths:
        loaded = [load_sae(path=str(p), device=device) for p in expand_sae_paths(sae_paths)]
    else:
        loaded = [load_sae(release, sae_id, device=device) for sae_id in keys]
    for sae, key in zip(loaded, keys):
        sae.key = key
    _check_same_base(loaded)
    return loaded


def _unique_keys(paths: list[Path]) -> list[str]:
    """Directory names; where two are equal, their parents' names are added until they differ."""
    depth = 1
    while True:
        keys = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(keys)) == len(keys) or depth > max(len(p.parts) for p in paths):
            return keys
        depth += 1


def _check_same_base(saes: list[LoadedSAE]) -> None:
    """All SAEs of a run must read the same base model, processed the same way: the models
    run once for all of them."""
    if len(saes) < 2:
        return
    first = saes[0]
    for sae in saes[1:]:
        if sae.model_name and first.model_name and sae.model_name != first.model_name:
            raise LoadError(
                f"the SAEs of one run must read the same base model: {first.key!r} was trained on {first.model_name!r}, "
                f"but {sae.key!r} on {sae.model_name!r}; run them separately"
            )
        if sae.model_kwargs != first.model_kwargs:
            raise LoadError(
                f"the SAEs of one run must read the base model processed the same way: {first.key!r} asks for "
                f"model_from_pretrained_kwargs {first.model_kwargs}, {sae.key!r} for {sae.model_kwargs}; run them separately"
            )
