"""Hugging Face checkpoints as TransformerLens models: the base and its finetunes.

Where a model comes from decides how it is built:

* **A TransformerLens official name as the base** (``gemma-2b``, ``mistral-7b``,
  ``gpt2-small`` ...): ``HookedTransformer.from_pretrained_no_processing(name,
  **model_from_pretrained_kwargs)``, exactly what sae_lens does for its default
  model class, so the SAE sees activations processed the way it was trained on
  them.
* **A local checkpoint directory as the base** (a ``save_pretrained`` directory):
  built without any hub call. The TransformerLens config comes from the
  directory's ``config.json`` (``configs.tl_cfg_dict``), the weights from
  ``AutoModelForCausalLM.from_pretrained(dir, local_files_only=True)``, and the
  weight processing follows the same flags as above.
* **A finetune** (local directory or hub id): loaded with transformers and
  converted *into the base model's architecture* and processing (``build``).

Weights load only through safetensors, or ``torch.load(weights_only=True)`` for
``.bin`` checkpoints; ``trust_remote_code`` is off unless the caller turns it on.
Anything that is not cached while the hub is offline or unreachable becomes one
``LoadError`` that says what is missing and how to provide it locally (``hub``).

Modules: ``hub`` (offline policy, commits, errors) · ``tokenizers`` · ``configs``
(TransformerLens configs, processing flags, architecture check) · ``build``
(weights into a HookedTransformer) · ``sources`` (the entry points below).
"""

from .build import OWN_TOKENIZER_ATTR, SOURCE_ATTR
from .configs import NO_PROCESSING, PROCESSING_ATTR, PROCESSING_FLAGS, processing_flags
from .hub import cached_commit, hub_access, hub_repo_id
from .sources import load_hub, load_local
from .tokenizers import check_tokenizers, load_tokenizer

__all__ = [
    "NO_PROCESSING",
    "OWN_TOKENIZER_ATTR",
    "PROCESSING_ATTR",
    "PROCESSING_FLAGS",
    "SOURCE_ATTR",
    "cached_commit",
    "check_tokenizers",
    "hub_access",
    "hub_repo_id",
    "load_hub",
    "load_local",
    "load_tokenizer",
    "processing_flags",
]
