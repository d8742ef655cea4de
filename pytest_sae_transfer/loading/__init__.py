"""Names and paths become models, SAEs and tokens.

Every failure a user can cause (an unknown name, a missing file, a hub artefact
that is not cached while offline, a dataset too small) raises :class:`LoadError`
with one message that says what was wrong and what would be right.

Modules: ``common`` (the error, zoo lookups, devices, file identities) · ``sae``
· ``sae_set`` · ``tokens`` · ``models`` · ``preflight`` (every problem the config files
show, before any data or weights load; zoo-name typos) · ``hf/`` (Hugging Face
checkpoints and the hub).
May import: ``errors``, ``config``, ``zoo``.
"""

from .common import (
    LoadError,
    file_identity,
    is_zoo_dataset,
    is_zoo_model,
    is_zoo_release,
    nearest,
    quiet_third_party_warnings,
    resolve_device,
    resolve_dtype,
    torch_dtype,
    zoo_release_names,
)
from .models import LoadedModel, load_model, model_identity
from .preflight import check_inputs, zoo_typos
from .sae import LoadedSAE, check_sae_config, load_sae, registry_releases, registry_sae_ids
from .sae_set import load_sae_set, natural_key, plan_sae_keys, select_sae_ids
from .tokens import TokenSet, iter_dataset_rows, load_tokens, special_token_ids

__all__ = [
    "LoadError",
    "LoadedModel",
    "LoadedSAE",
    "TokenSet",
    "check_inputs",
    "check_sae_config",
    "file_identity",
    "is_zoo_dataset",
    "is_zoo_model",
    "is_zoo_release",
    "iter_dataset_rows",
    "load_model",
    "load_sae",
    "load_sae_set",
    "natural_key",
    "plan_sae_keys",
    "select_sae_ids",
    "load_tokens",
    "model_identity",
    "nearest",
    "quiet_third_party_warnings",
    "registry_releases",
    "registry_sae_ids",
    "resolve_device",
    "resolve_dtype",
    "special_token_ids",
    "torch_dtype",
    "zoo_release_names",
    "zoo_typos",
]
