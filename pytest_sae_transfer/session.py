"""Session state: what one configuration loads and measures, computed at most once.

A :class:`TransferSession` loads lazily: the SAE and the tokens first (they decide
the cache key), the models only when a result is not already cached. Results
are shared through :class:`~pytest_sae_transfer.cache.ResultCache`, guarded by
file locks, so xdist workers and concurrent runs compute each base and each
pair once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable

from . import __version__
from .cache import ResultCache, cache_key
from .config import RunConfig
from .loading import is_zoo_model, quiet_third_party_warnings, LoadedModel, LoadedSAE, LoadError, TokenSet, load_model, load_sae, load_tokens, model_identity, resolve_device, resolve_dtype
from .report import FeatureArrays, FinetuneResult, ModelResult, TransferReport


class SessionError(Exception):
    """A problem with the user's inputs found while loading or evaluating."""


def _flatten_hists(prefix: str, hists: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, hist in hists.items():
        out[f"{prefix}hist::{name}::edges"] = hist["edges"]
        out[f"{prefix}hist::{name}::counts"] = hist["counts"]
    return out


def _unflatten_hists(arrays: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in arrays.items():
        if not key.startswith(prefix + "hist::"):
            continue
        name, part = key[len(prefix) + 6 :].rsplit("::", 1)
        out.setdefault(name, {})[part] = value
    return out


class TransferSession:
    def __init__(
        self,
        config: RunConfig,
        *,
        worker_id: str | None = None,
        run_id: str | None = None,
        quiet_context: Callable[[], ContextManager[Any]] | None = None,
        progress_stream: Any = None,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.run_id = run_id
        self._quiet_context = quiet_context or contextlib.nullcontext
        self._progress_stream = progress_stream
        self._sae: LoadedSAE | None = None
        self._tokens: TokenSet | None = None
        self._tokenizer: Any = None
        self._models: dict[str, LoadedModel] = {}
        self._base_state: Any = None
        self._base_result: ModelResult | None = None
        self._pairs: dict[str, tuple[FinetuneResult, dict[str, Any], dict[str, Any]]] = {}
        self._profile: Any = None
        self._transient_notes: dict[str, list[str]] = {}
        self.provenance: dict[str, str] = {}  # "base" / finetune name -> "cache" | "computed"
        self.notes: list[str] = []
        self._engine_runs: list[dict[str, Any]] = []  # the engine's run config of each compute in this session

    # -- resolution ---------------------------------------------------------

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
    def sae(self) -> LoadedSAE:
        if self._sae is None:
            c = self.config
            with quiet_third_party_warnings():
                self._sae = load_sae(c.sae_release, c.sae_id, c.sae_path, device=self.device)
        return self._sae

    @property
    def base_name(self) -> str:
        name = self.config.base_model or self.sae.model_name
        if not name:
            raise LoadError("the SAE's metadata names no base model; pass --base-model")
        return name

    @property
    def profile(self) -> Any:
        if self._profile is None:
            from .thresholds import load_profile, profile_for_release

            self._profile = load_profile(self.config.thresholds or profile_for_release(self.config.sae_release))
        return self._profile

    @property
    def outlier_norm(self) -> float | str | None:
        if self.config.outlier_norm is not None:
            return self.config.outlier_norm
        return self.profile.settings.get("outlier_norm")

    @property
    def exclude_special_tokens(self) -> bool:
        if self.config.include_special_tokens:
            return False
        return bool(self.profile.settings.get("exclude_special_tokens", True))

    def _check_model_exists(self, name: str) -> None:
        """A model named by a path that is not there: one message naming the option, before any load."""
        if not name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or is_zoo_model(name):
            return
        if name != self.base_name:
            flag = "--finetune"
        elif self.config.base_model:
            flag = "--base-model"
        else:
            flag = "the base model named in the SAE's metadata (override with --base-model)"
        raise LoadError(
            f"{flag} {name!r} does not exist; give a checkpoint directory written by save_pretrained "
            "(config.json, weights and tokenizer), a Hugging Face model id (owner/name) or a zoo model name"
        )

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from . import zoo

            self._check_model_exists(self.base_name)
            if is_zoo_model(self.base_name):
                self._tokenizer = zoo.load_tokenizer()
            else:
                from . import hf

                self._tokenizer = hf.load_tokenizer(self.base_name, trust_remote_code=self.config.trust_remote_code)
        return self._tokenizer

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        tok = self.tokenizer
        ids = {getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return tuple(sorted(i for i in ids if i is not None))

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
        if name not in self._models:
            self._check_model_exists(name)
            base = None if name == self.base_name else self.model(self.base_name)
            with quiet_third_party_warnings():
                loaded = load_model(name, self.device, self.dtype, base=base, model_kwargs=self.sae.model_kwargs,
                                    trust_remote_code=self.config.trust_remote_code)
            if base is not None:
                self._check_finetune_tokenizer(name, loaded)
            self._models[name] = loaded
        return self._models[name]

    def _check_finetune_tokenizer(self, name: str, loaded: LoadedModel) -> None:
        from . import zoo

        if is_zoo_model(name) and is_zoo_model(self.base_name):
            return  # the zoo's models share one tokenizer
        from . import hf

        # The finetune's own tokenizer, as its loader found it (None when it ships none:
        # check_tokenizers then notes that the base tokenizer is used).
        ft_tok = zoo.load_tokenizer() if is_zoo_model(name) else getattr(loaded.model, hf.OWN_TOKENIZER_ATTR, None)
        tokens = self.token_set.tokens
        samples = [self.tokenizer.decode(row, skip_special_tokens=True) for row in tokens[: min(8, len(tokens))].tolist()]
        self.notes.extend(hf.check_tokenizers(self.tokenizer, ft_tok, samples, allow_mismatch=self.config.allow_tokenizer_mismatch))

    # -- the cache ------------------------------------------------------------

    def engine_options(self) -> Any:
        from .engine import EngineOptions

        return EngineOptions(
            batch_size=self.config.batch_size,
            exclude_special_tokens=self.exclude_special_tokens,
            special_token_ids=self.special_token_ids,
            outlier_norm=self.outlier_norm,
            n_bootstrap=self.config.n_bootstrap,
            seed=self.config.seed,
            progress=True if self._progress_stream is not None else None,
            progress_file=self._progress_stream,
        )

    def _key_parts(self) -> dict[str, Any]:
        from .engine import ENGINE_VERSION

        opts = self.engine_options()
        return {
            "base": model_identity(self.base_name),
            "sae": self.sae.identity,
            "tokens": self.token_set.info["tokens_sha256"],
            "context_size": int(self.token_set.tokens.shape[1]),
            "exclude_special_tokens": opts.exclude_special_tokens,
            "special_token_ids": list(opts.special_token_ids or ()),
            "outlier_norm": opts.outlier_norm,
            "n_bootstrap": opts.n_bootstrap,
            "seed": opts.seed,
            "dtype": self.dtype,
            "device_type": self.device.split(":")[0],
            "model_kwargs": self.sae.model_kwargs,
            "engine": ENGINE_VERSION,
            "package": __version__,
            # --sae-no-cache keeps results within this run (xdist workers still share them).
            "run": self.run_id if self.config.no_cache else None,
        }

    def _base_key(self) -> str:
        return cache_key({"kind": "base", **self._key_parts()})

    def _pair_key(self, finetune: str) -> str:
        return cache_key({"kind": "pair", "finetune": model_identity(finetune), **self._key_parts()})

    @property
    def cache(self) -> ResultCache:
        root = self.config.resolved_cache_dir()
        if self.config.no_cache and self.run_id is None:
            return _MemoryOnlyCache()  # type: ignore[return-value]
        return ResultCache(root)

    def _load_base_from_cache(self, cache: ResultCache) -> bool:
        from .engine import BaseState
        import torch

        hit = cache.get(self._base_key())
        if hit is None:
            return False
        payload, arrays = hit
        result = ModelResult.from_json(payload["result"])
        self._base_state = BaseState(
            result=result,
            fire_count=torch.from_numpy(arrays["fire_count"]).double(),
            n_eval=float(payload["n_eval"]),
            histograms=_unflatten_hists(arrays),
            outlier_norm=payload.get("outlier_norm"),
        )
        self._base_result = result
        self.provenance.setdefault("base", "cache")
        return True

    def _load_pair_from_cache(self, cache: ResultCache, finetune: str) -> bool:
        hit = cache.get(self._pair_key(finetune))
        if hit is None:
            return False
        payload, arrays = hit
        result = FinetuneResult.from_json(payload["result"])
        result.model = finetune
        vectors = {k[5:]: v for k, v in arrays.items() if k.startswith("vec::")}
        self._pairs[finetune] = (result, vectors, _unflatten_hists(arrays))
        self.provenance.setdefault(finetune, "cache")
        return True

    def _put(self, cache: ResultCache, key: str, payload: dict[str, Any], arrays: dict[str, Any]) -> None:
        """Store a result; a cache that cannot be written (full disk, read-only) costs a re-run
        later, never this run's verdict, so it becomes a note instead of an error."""
        try:
            cache.put(key, payload, arrays)
        except OSError as exc:
            note = f"could not write the result cache in {str(getattr(cache, 'root', ''))!r} ({exc}); results were not cached"
            if note not in self.notes:
                self.notes.append(note)

    def _store_base(self, cache: ResultCache) -> None:
        s = self._base_state
        self._put(
            cache,
            self._base_key(),
            {"result": s.result.to_json(), "n_eval": s.n_eval, "outlier_norm": s.outlier_norm},
            {"fire_count": s.fire_count.numpy(), **_flatten_hists("", s.histograms)},
        )

    def _store_pair(self, cache: ResultCache, finetune: str) -> None:
        result, vectors, hists = self._pairs[finetune]
        stored = dataclasses.replace(result, checks=[])
        arrays = {f"vec::{k}": v for k, v in vectors.items()}
        arrays.update(_flatten_hists("", hists))
        self._put(cache, self._pair_key(finetune), {"result": stored.to_json()}, arrays)

    # -- evaluation -------------------------------------------------------------

    def ensure(self, finetunes: Iterable[str]) -> None:
        """Make the base result and the given pairs available: from the cache or computed."""
        wanted = [ft for ft in dict.fromkeys(finetunes) if ft not in self._pairs]
        if not wanted and self._base_state is not None:
            return
        for name in wanted:
            self._check_model_exists(name)
        cache = self.cache
        if isinstance(cache, ResultCache):
            _check_writable(cache.root)
            cache.sweep()
        if self._base_state is None:
            self._load_base_from_cache(cache)
        wanted = [ft for ft in wanted if not self._load_pair_from_cache(cache, ft)]
        if not wanted and self._base_state is not None:
            return
        if self._base_state is None and self.worker_id is not None and wanted:
            # Under xdist, compute the base alone first and release its lock, so workers
            # that own other finetunes can go on with it in parallel.
            with cache.lock(self._base_key()):
                if not self._load_base_from_cache(cache):
                    self._compute([], cache)
        keys = sorted((self._pair_key(ft), ft) for ft in wanted)
        with contextlib.ExitStack() as stack:
            if self._base_state is None:
                stack.enter_context(cache.lock(self._base_key()))
                self._load_base_from_cache(cache)
            for key, _ in keys:
                stack.enter_context(cache.lock(key))
            missing = [ft for _, ft in keys if not self._load_pair_from_cache(cache, ft)]
            if missing or self._base_state is None:
                self._compute(missing, cache)

    def _sequential(self, base: LoadedModel, n_finetunes: int) -> bool:
        """Whether the finetunes must run one at a time after the base (they would not fit beside it)."""
        if self.config.sequential:
            return True
        if not self.device.startswith("cuda") or n_finetunes == 0:
            return False
        import torch

        model_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
        free, _total = torch.cuda.mem_get_info(torch.device(self.device))
        # Keep a quarter of what is free for activations and logits.
        return n_finetunes * model_bytes > 0.75 * free

    def _transient_model(self, name: str) -> Callable[[], Any]:
        def load() -> Any:
            loaded = self.model(name)
            self._models.pop(name, None)  # not kept: sequential mode holds one finetune at a time
            self._transient_notes[name] = loaded.notes
            return loaded.model

        return load

    def _compute(self, finetunes: list[str], cache: ResultCache) -> None:
        with quiet_third_party_warnings():
            self._compute_quietly(finetunes, cache)

    def _compute_quietly(self, finetunes: list[str], cache: ResultCache) -> None:
        from .engine import EngineError, run_transfer

        base = self.model(self.base_name)
        sequential = self._sequential(base, len(finetunes))
        if sequential:
            models = [(ft, self._transient_model(ft)) for ft in finetunes]
        else:
            models = [(ft, self.model(ft).model) for ft in finetunes]
        options = dataclasses.replace(self.engine_options(), sequential=sequential)
        try:
            with self._quiet_context():
                out = run_transfer(
                    base.model, models, self.sae.sae, self.token_set.tokens, options,
                    base_name=self.base_name, base_state=self._base_state,
                )
        except EngineError as exc:
            raise LoadError(str(exc)) from None
        if self._base_state is None:
            self._base_state = out.base_state
            self._base_result = out.base_state.result
            self.provenance["base"] = "computed"
            self._store_base(cache)
        self._run_config = out.report.config
        self._engine_runs.append(dict(out.report.config))
        if out.oom_splits:
            c = out.report.config
            self.notes.append(
                f"out of memory at batch size {c.get('batch_size')}: the batch was halved {out.oom_splits} time(s) "
                f"and the run finished at batch size {c.get('final_batch_size')}"
            )
        features = out.report.features or FeatureArrays()
        for ft_result in out.report.finetunes:
            name = ft_result.model
            loaded = self._models.get(name)
            ft_result.notes.extend(loaded.notes if loaded is not None else self._transient_notes.get(name, []))
            prefix = name + "/"  # names may contain "/" themselves (HF ids, paths)
            hists = {k[len(prefix):]: v for k, v in features.histograms.items() if k.startswith(prefix)}
            self._pairs[name] = (ft_result, features.vectors.get(name, {}), hists)
            self.provenance[name] = "computed"
            self._store_pair(cache, name)

    # -- results ------------------------------------------------------------

    def report(self, finetunes: Iterable[str] | None = None) -> TransferReport:
        """The report for the given finetunes (default: all configured), with checks evaluated."""
        names = list(finetunes) if finetunes is not None else list(self.config.finetunes)
        self.ensure(names)
        from .thresholds import evaluate_checks

        features = FeatureArrays()
        for key, hist in self._base_state.histograms.items():
            features.histograms[f"base/{key}"] = hist
        results = []
        for name in names:
            result, vectors, hists = self._pairs[name]
            result = dataclasses.replace(result, checks=[], notes=list(result.notes))
            results.append(result)
            features.vectors[name] = vectors
            for key, hist in hists.items():
                features.histograms[f"{name}/{key}"] = hist
        report = TransferReport(config=self.report_config(), base=self._base_result, finetunes=results, features=features)
        evaluate_checks(self.profile, report)
        return report

    def report_config(self) -> dict[str, Any]:
        import platform

        c = self.config
        sae = self.sae
        tokens = self.token_set
        versions = {"pytest_sae_transfer": __version__, "python": platform.python_version()}
        from importlib import metadata

        for mod, dist in (("torch", "torch"), ("sae_lens", "sae-lens"), ("transformer_lens", "transformer-lens"), ("transformers", "transformers")):
            try:
                versions[mod] = metadata.version(dist)  # transformer_lens has no __version__
            except metadata.PackageNotFoundError:
                versions[mod] = None
        opts = self.engine_options()
        return {
            **sae.describe(),
            "hook_name": sae.hook_name,
            "base_model": self.base_name,
            "finetunes": list(c.finetunes),
            "dataset": tokens.info["dataset"],
            "n_tokens": tokens.info["n_tokens"],
            "n_tokens_requested": c.n_tokens,
            "context_size": int(tokens.tokens.shape[1]),
            "tokens": tokens.info,
            "device": self.device,
            "dtype": self.dtype,
            "seed": c.seed,
            "n_bootstrap": c.n_bootstrap,
            "exclude_special_tokens": opts.exclude_special_tokens,
            "special_token_ids": list(opts.special_token_ids or ()),
            "outlier_norm_setting": opts.outlier_norm,
            "outlier_norm": self._base_state.outlier_norm if self._base_state is not None else None,
            "thresholds_profile": self.profile.name,
            "thresholds_path": self.profile.path,
            "notes": list(self.notes),
            "provenance": dict(self.provenance),
            "sequential": self.config.sequential,
            **self._engine_config(),
            "versions": versions,
        }

    def _engine_config(self) -> dict[str, Any]:
        """What the engine did in this session: batch sizes after out-of-memory retries, timing."""
        runs = self._engine_runs
        out: dict[str, Any] = {
            "batch_size": self.config.batch_size,
            "final_batch_size": min((r["final_batch_size"] for r in runs), default=None),
            "oom_batch_splits": sum(int(r.get("oom_batch_splits") or 0) for r in runs),
        }
        if runs:
            out["engine_version"] = runs[-1].get("engine_version")
            out["elapsed_seconds"] = round(sum(float(r.get("elapsed_seconds") or 0.0) for r in runs), 3)
            out["tokens_per_second"] = runs[-1].get("tokens_per_second")
        return out

    def pair(self, finetune: str) -> Any:
        from .results import PairResult

        return PairResult(self.report([finetune]), finetune)


class _MemoryOnlyCache:
    """--sae-no-cache outside xdist: nothing is read or written."""

    def get(self, key: str) -> None:
        return None

    def put(self, key: str, payload: Any, arrays: Any) -> None:
        return None

    @contextlib.contextmanager
    def lock(self, key: str):
        yield


def _check_writable(root: Path) -> None:
    """The cache directory must take lock files and entries: say so up front, not as a crash later."""
    import tempfile

    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise LoadError(
            f"the result cache directory {str(root)!r} cannot be written ({exc}); "
            "pass a writable directory with --sae-cache-dir, or --sae-no-cache"
        ) from None


def worker_id_from_env() -> str | None:
    return os.environ.get("PYTEST_XDIST_WORKER")
