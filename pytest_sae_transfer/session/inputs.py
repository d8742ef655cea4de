"""What one configuration names, resolved lazily: the device and dtype, the SAE, the base
model's name, the tokenizer, the evaluation tokens and the models.

The SAE and the tokens come first (they decide the cache key); a model is loaded
only when asked for, which the session does only when a result is not cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .. import zoo
from ..config import RunConfig
from ..loading import (
    LoadedModel,
    LoadedSAE,
    LoadError,
    TokenSet,
    check_inputs,
    hf,
    is_zoo_model,
    load_model,
    load_sae_set,
    load_tokens,
    quiet_third_party_warnings,
    resolve_device,
    resolve_dtype,
    special_token_ids,
)


class Inputs:
    """The inputs of one configuration; notes about them go to ``notes`` (shared with the session)."""

    def __init__(self, config: RunConfig, settings: Mapping[str, Any], notes: list[str], worker_id: str | None = None) -> None:
        self.config = config
        self.settings = settings  # the threshold profile's run settings
        self.notes = notes
        self.worker_id = worker_id
        self._saes: list[LoadedSAE] | None = None
        self._tokens: TokenSet | None = None
        self._tokenizer: Any = None
        self._checked = False
        self.models: dict[str, LoadedModel] = {}

    def source(self, name: str) -> str:
        """What a model name stands for: a finetune's label names its zoo name, path or hub id."""
        return self.config.source(name)

    def preflight(self) -> None:
        """Every problem the configuration files show, as one error, before any data or weights load."""
        if not self._checked:
            check_inputs(self.config)
            self._checked = True

    @property
    def device(self) -> str:
        device = resolve_device(self.config.device)
        if self.config.device == "auto" and device == "cuda" and self.worker_id and self.worker_id.startswith("gw"):
            import torch

            count = torch.cuda.device_count()
            if count > 1:  # spread xdist workers over the GPUs
                device = f"cuda:{int(self.worker_id[2:]) % count}"
        return device

    @property
    def dtype(self) -> str:
        return resolve_dtype(self.config.dtype, self.device)

    @property
    def outlier_norm(self) -> float | str | None:
        """The mask's τ: the option's ("off" turns off a profile's mask), else the profile's."""
        if self.config.outlier_norm == "off":
            return None
        if self.config.outlier_norm is not None:
            return self.config.outlier_norm
        return self.settings.get("outlier_norm")

    @property
    def exclude_special_tokens(self) -> bool:
        if self.config.include_special_tokens:
            return False
        return bool(self.settings.get("exclude_special_tokens", True))

    @property
    def saes(self) -> list[LoadedSAE]:
        """The run's SAEs, in the order they were named."""
        if self._saes is None:
            c = self.config
            with quiet_third_party_warnings():
                self._saes = load_sae_set(c.sae_release, c.sae_ids, c.sae_paths, device=self.device)
        return self._saes

    @property
    def sae(self) -> LoadedSAE:
        """The first SAE: its metadata decides the base model, dataset and context size."""
        return self.saes[0]

    def sae_by_key(self, key: str) -> LoadedSAE:
        for sae in self.saes:
            if sae.key == key:
                return sae
        raise KeyError(key)

    @property
    def base_name(self) -> str:
        name = self.config.base_model or self.sae.model_name
        if not name:
            raise LoadError("the SAE's metadata names no base model; pass --base-model")
        return name

    def check_model_exists(self, name: str) -> None:
        """A model named by a path that is not there: one message naming the option, before any load."""
        source = self.source(name)
        if not source.startswith((".", "/", "~")) or Path(source).expanduser().exists() or is_zoo_model(source):
            return
        if name != self.base_name:
            flag = "--finetune" if source == name else f"finetune {name!r}: --finetune"
        elif self.config.base_model:
            flag = "--base-model"
        else:
            flag = "the base model named in the SAE's metadata (override with --base-model)"
        raise LoadError(
            f"{flag} {source!r} does not exist; give a checkpoint directory written by save_pretrained "
            "(config.json, weights and tokenizer), a Hugging Face model id (owner/name) or a zoo model name"
        )

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self.check_model_exists(self.base_name)
            if is_zoo_model(self.base_name):
                self._tokenizer = zoo.load_tokenizer()
            else:
                self._tokenizer = hf.load_tokenizer(self.base_name, trust_remote_code=self.config.trust_remote_code)
        return self._tokenizer

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        return special_token_ids(self.tokenizer)

    @property
    def token_set(self) -> TokenSet:
        if self._tokens is None:
            c = self.config
            dataset = c.dataset or self.sae.dataset
            if not dataset:
                raise LoadError("the SAE's metadata names no dataset; pass --sae-dataset")
            context_size = c.context_size or self.sae.context_size
            if not context_size:
                raise LoadError("the SAE's metadata has no context size; pass --sae-context-size")
            self._tokens = load_tokens(
                dataset, self.tokenizer, c.n_tokens, int(context_size), prepend_bos=self.sae.prepend_bos,
                shuffle_seed=c.shuffle_seed, special_token_ids=self.special_token_ids,
            )
        return self._tokens

    def model(self, name: str) -> LoadedModel:
        if name not in self.models:
            self.check_model_exists(name)
            base = None if name == self.base_name else self.model(self.base_name)
            with quiet_third_party_warnings():
                loaded = load_model(self.source(name), self.device, self.dtype, base=base, model_kwargs=self.sae.model_kwargs,
                                    trust_remote_code=self.config.trust_remote_code)
            if base is not None:
                self._check_finetune_tokenizer(name, loaded)
            self.models[name] = loaded
        return self.models[name]

    def _check_finetune_tokenizer(self, name: str, loaded: LoadedModel) -> None:
        source = self.source(name)
        if is_zoo_model(source) and is_zoo_model(self.base_name):
            return  # the zoo's models share one tokenizer
        # The finetune's own tokenizer, as its loader found it (None when it ships none:
        # check_tokenizers then notes that the base tokenizer is used).
        ft_tok = zoo.load_tokenizer() if is_zoo_model(source) else getattr(loaded.model, hf.OWN_TOKENIZER_ATTR, None)
        tokens = self.token_set.tokens
        samples = [self.tokenizer.decode(row, skip_special_tokens=True) for row in tokens[: min(8, len(tokens))].tolist()]
        named = f"finetune {name!r}" if source == name else f"finetune {name!r} ({source})"
        try:
            notes = hf.check_tokenizers(self.tokenizer, ft_tok, samples, allow_mismatch=self.config.allow_tokenizer_mismatch)
        except LoadError as exc:
            raise LoadError(f"{named}: {exc}") from None
        self.notes.extend(f"{named}: {note}" for note in notes)
