"""SAEs: the bundled zoo's, sae_lens's pretrained registry's, or a local directory's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from .. import zoo
from .common import LoadError, file_identity, is_zoo_release, nearest, zoo_release_names
from .hf.hub import hub_access, is_network_error, offline_message

#: Upper bounds on an SAE config read from disk, checked before any allocation.
MAX_SAE_D_IN = 1 << 16

MAX_SAE_D_SAE = 1 << 22

MAX_SAE_PARAMS = 1 << 34


class LoadedSAE:
    """One SAE of a run: where it comes from, what identifies it for the cache, and its
    metadata. A zoo or directory SAE is read from its ``cfg.json`` alone; the sae_lens
    object (and sae_lens itself) is loaded only when ``.sae`` is first used, so a run whose
    results all come from the cache never loads the weights."""

    def __init__(self, sae: Any, kind: str, release: str | None, sae_id: str | None, path: str | None, identity: str,
                 key: str = "sae", *, cfg: dict[str, Any] | None = None, loader: Callable[[], Any] | None = None) -> None:
        self._sae = sae
        self._loader = loader
        self._cfg = cfg if cfg is not None and isinstance(cfg.get("metadata"), dict) else None
        self.kind = kind  # "zoo", "registry" or "path"
        self.release = release
        self.sae_id = sae_id
        self.path = path
        self.identity = identity
        self.key = key  # names this SAE's results in a run (its id, or its directory's name)
        if self._sae is None and self._cfg is None:
            self.sae  # a config in an older layout: let sae_lens read it

    @property
    def sae(self) -> Any:
        if self._sae is None:
            assert self._loader is not None
            self._sae = self._loader()
        return self._sae

    def _meta(self, name: str) -> Any:
        if self._cfg is not None:
            return self._cfg["metadata"].get(name)
        return getattr(self.sae.cfg.metadata, name)

    @property
    def hook_name(self) -> str:
        return self._meta("hook_name")

    @property
    def context_size(self) -> int | None:
        return self._meta("context_size")

    @property
    def prepend_bos(self) -> bool:
        value = self._meta("prepend_bos")
        return True if value is None else bool(value)

    @property
    def dataset(self) -> str | None:
        return self._meta("dataset_path")

    @property
    def model_name(self) -> str | None:
        return self._meta("model_name")

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self._meta("model_from_pretrained_kwargs") or {})

    @property
    def d_in(self) -> int:
        return int(self._cfg["d_in"]) if self._cfg is not None else int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self._cfg["d_sae"]) if self._cfg is not None else int(self.sae.cfg.d_sae)

    @property
    def architecture(self) -> str:
        if self._cfg is not None and isinstance(self._cfg.get("architecture"), str):
            return self._cfg["architecture"]
        return self.sae.cfg.architecture()

    def describe(self) -> dict[str, Any]:
        return {"sae_key": self.key, "sae_release": self.release, "sae_id": self.sae_id, "sae_path": self.path, "sae_kind": self.kind,
                "sae_architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae}


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


def _read_sae_dir(path: Path) -> dict[str, Any]:
    """The directory's cfg.json, checked (sizes, the weights file present) before anything is loaded."""
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
    return cfg


def _load_sae_dir(path: Path, device: str, dtype: str | None) -> Any:
    from sae_lens import SAE

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
        return _load_path_sae(path, device, dtype)
    if not release:
        raise LoadError("no SAE given: pass --sae-release (with --sae-id) or --sae-path")
    if is_zoo_release(release):
        return _load_zoo_sae(release, sae_id, device, dtype)
    return _load_registry_sae(release, sae_id, device, dtype)


def _load_path_sae(path: str, device: str, dtype: str | None) -> LoadedSAE:
    p = Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"--sae-path {path!r} does not exist; give a directory with cfg.json and sae_weights.safetensors")
    if not p.is_dir():
        raise LoadError(f"--sae-path {path!r} is not a directory; give the directory sae_lens saved the SAE into")
    cfg = _read_sae_dir(p)
    return LoadedSAE(None, "path", None, None, str(p), file_identity(list(p.glob("*.json")) + list(p.glob("*.safetensors"))),
                     cfg=cfg, loader=lambda: _load_sae_dir(p, device, dtype))


def _load_zoo_sae(release: str, sae_id: str | None, device: str, dtype: str | None) -> LoadedSAE:
    ids = zoo.sae_ids(release)
    if sae_id is not None and sae_id not in ids:
        raise LoadError(f"unknown SAE id {sae_id!r} in release {release!r}{nearest(sae_id, ids)}; valid ids: {', '.join(ids)}")
    directory = zoo.sae_dir(release, sae_id)
    cfg = _read_sae_dir(directory)
    return LoadedSAE(None, "zoo", release, sae_id or directory.name, str(directory), file_identity(directory.iterdir()),
                     cfg=cfg, loader=lambda: _load_sae_dir(directory, device, dtype))


def _load_registry_sae(release: str, sae_id: str | None, device: str, dtype: str | None) -> LoadedSAE:
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
    import sae_lens
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    how = ("Download it once on a machine with hub access (it lands in the HF cache; copy that cache here or set HF_HOME), "
           "or save it with sae.save_model(DIR) and pass --sae-path DIR.")
    try:
        repo_id, _folder = get_repo_id_and_folder_name(release, sae_id)
        # Resolve the repository first: with no network this fails in seconds, not after retries.
        with hub_access(repo_id, "SAE", f"{release}/{sae_id}", how):
            sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        if is_network_error(exc):
            raise LoadError(
                offline_message("SAE", f"{release}/{sae_id}", "Download it once on a machine with hub access (its files land in the HF cache), or save it with sae.save_model(DIR) and pass --sae-path DIR.")
            ) from None
        raise LoadError(f"could not load SAE {release}/{sae_id}: {type(exc).__name__}: {exc}") from None
    identity = hashlib.sha256(f"registry:{release}:{sae_id}:{sae_lens.__version__}".encode()).hexdigest()
    return LoadedSAE(sae, "registry", release, sae_id, None, identity)
