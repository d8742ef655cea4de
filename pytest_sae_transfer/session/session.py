"""One configuration's results, each computed at most once: read from the result cache, or
computed by the engine and stored there.

Results are shared through the cache, guarded by file locks, so xdist workers and
concurrent runs compute each base and each pair once. ``provenance`` records,
per model, whether this process read its result from the cache or computed it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Iterable

from .. import __version__
from ..config import RunConfig
from ..engine import ENGINE_VERSION, BaseState, EngineOptions, run_transfer
from ..loading import LoadedModel, model_identity, quiet_third_party_warnings
from ..report import FeatureArrays, ModelResult, PairResult, TransferReport
from ..thresholds import Profile, evaluate_checks
from .cache import MemoryOnlyCache, ResultCache, check_writable
from .inputs import Inputs
from .provenance import engine_summary, package_versions
from .store import PairEntry, ResultStore


class TransferSession:
    def __init__(
        self,
        config: RunConfig,
        profile: Profile,
        *,
        worker_id: str | None = None,
        run_id: str | None = None,
        quiet_context: Callable[[], ContextManager[Any]] | None = None,
        progress_stream: Any = None,
    ) -> None:
        self.config = config
        self.profile = profile
        self.worker_id = worker_id
        self.run_id = run_id
        self._quiet_context = quiet_context or contextlib.nullcontext
        self._progress_stream = progress_stream
        self.notes: list[str] = []
        self.inputs = Inputs(config, profile.settings, self.notes, worker_id)
        self._base_state: BaseState | None = None
        self._pairs: dict[str, PairEntry] = {}
        self._identities: dict[str, str] = {}
        self._transient_notes: dict[str, list[str]] = {}
        self.provenance: dict[str, str] = {}  # "base" / finetune name -> "cache" | "computed"
        self._engine_runs: list[dict[str, Any]] = []  # the engine's run config of each compute in this session

    # -- what the fixtures hand out --------------------------------------------

    @property
    def sae(self) -> Any:
        return self.inputs.sae

    @property
    def base_name(self) -> str:
        return self.inputs.base_name

    @property
    def token_set(self) -> Any:
        return self.inputs.token_set

    def model(self, name: str) -> LoadedModel:
        return self.inputs.model(name)

    def pair(self, finetune: str) -> PairResult:
        return PairResult(self.report([finetune]), finetune)

    # -- the store ---------------------------------------------------------------

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            batch_size=self.config.batch_size,
            exclude_special_tokens=self.inputs.exclude_special_tokens,
            special_token_ids=self.inputs.special_token_ids,
            outlier_norm=self.inputs.outlier_norm,
            n_bootstrap=self.config.n_bootstrap,
            seed=self.config.seed,
            progress=True if self._progress_stream is not None else None,
            progress_file=self._progress_stream,
        )

    def _identity(self, name: str) -> str:
        if name not in self._identities:
            self._identities[name] = model_identity(name)
        return self._identities[name]

    def _store(self) -> ResultStore:
        """Keyed by everything that decides a result (the tokens by their hash)."""
        inputs = self.inputs
        opts = self.engine_options()
        parts = {
            "base": self._identity(inputs.base_name),
            "sae": inputs.sae.identity,
            "tokens": inputs.token_set.info["tokens_sha256"],
            "context_size": int(inputs.token_set.tokens.shape[1]),
            "exclude_special_tokens": opts.exclude_special_tokens,
            "special_token_ids": list(opts.special_token_ids or ()),
            "outlier_norm": opts.outlier_norm,
            "n_bootstrap": opts.n_bootstrap,
            "seed": opts.seed,
            "dtype": inputs.dtype,
            "device_type": inputs.device.split(":")[0],
            "model_kwargs": inputs.sae.model_kwargs,
            "engine": ENGINE_VERSION,
            "package": __version__,
            # --sae-no-cache keeps results within this run (xdist workers still share them).
            "run": self.run_id if self.config.no_cache else None,
        }
        if self.config.no_cache and self.run_id is None:
            cache: ResultCache | MemoryOnlyCache = MemoryOnlyCache()  # --sae-no-cache outside xdist
        else:
            cache = ResultCache(self.config.resolved_cache_dir())
        return ResultStore(cache, parts, self.notes)

    def _load_base(self, store: ResultStore) -> bool:
        state = store.get_base()
        if state is None:
            return False
        self._base_state = state
        self.provenance.setdefault("base", "cache")
        return True

    def _load_pair(self, store: ResultStore, finetune: str) -> bool:
        entry = store.get_pair(finetune, self._identity(finetune))
        if entry is None:
            return False
        self._pairs[finetune] = entry
        self.provenance.setdefault(finetune, "cache")
        return True

    # -- evaluation -----------------------------------------------------------------

    def ensure(self, finetunes: Iterable[str]) -> None:
        """Make the base result and the given pairs available: from the cache or computed."""
        wanted = [ft for ft in dict.fromkeys(finetunes) if ft not in self._pairs]
        if not wanted and self._base_state is not None:
            return
        for name in wanted:
            self.inputs.check_model_exists(name)
        store = self._store()
        if isinstance(store.cache, ResultCache):
            check_writable(store.cache.root)
            store.cache.sweep()
        if self._base_state is None:
            self._load_base(store)
        wanted = [ft for ft in wanted if not self._load_pair(store, ft)]
        if not wanted and self._base_state is not None:
            return
        if self._base_state is None and self.worker_id is not None and wanted:
            # Under xdist, compute the base alone first and release its lock, so workers
            # that own other finetunes can go on with it in parallel.
            with store.lock(store.base_key()):
                if not self._load_base(store):
                    self._compute([], store)
        keys = sorted((store.pair_key(self._identity(ft)), ft) for ft in wanted)
        with contextlib.ExitStack() as stack:
            if self._base_state is None:
                stack.enter_context(store.lock(store.base_key()))
                self._load_base(store)
            for key, _ in keys:
                stack.enter_context(store.lock(key))
            missing = [ft for _, ft in keys if not self._load_pair(store, ft)]
            if missing or self._base_state is None:
                self._compute(missing, store)

    def _sequential(self, base: LoadedModel, n_finetunes: int) -> bool:
        """Whether the finetunes must run one at a time after the base (they would not fit beside it)."""
        if self.config.sequential:
            return True
        device = self.inputs.device
        if not device.startswith("cuda") or n_finetunes == 0:
            return False
        import torch

        model_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        # Keep a quarter of what is free for activations and logits.
        return n_finetunes * model_bytes > 0.75 * free

    def _transient_model(self, name: str) -> Callable[[], Any]:
        def load() -> Any:
            loaded = self.inputs.model(name)
            self.inputs.models.pop(name, None)  # not kept: sequential mode holds one finetune at a time
            self._transient_notes[name] = loaded.notes
            return loaded.model

        return load

    def _compute(self, finetunes: list[str], store: ResultStore) -> None:
        with quiet_third_party_warnings():
            base = self.inputs.model(self.inputs.base_name)
            sequential = self._sequential(base, len(finetunes))
            if sequential:
                models = [(ft, self._transient_model(ft)) for ft in finetunes]
            else:
                models = [(ft, self.inputs.model(ft).model) for ft in finetunes]
            options = dataclasses.replace(self.engine_options(), sequential=sequential)
            with self._quiet_context():
                out = run_transfer(
                    base.model, models, self.inputs.sae.sae, self.inputs.token_set.tokens, options,
                    base_name=self.inputs.base_name, base_state=self._base_state,
                )
        if self._base_state is None:
            self._base_state = out.base_state
            self.provenance["base"] = "computed"
            store.put_base(out.base_state)
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
            loaded = self.inputs.models.get(name)
            ft_result.notes.extend(loaded.notes if loaded is not None else self._transient_notes.get(name, []))
            prefix = name + "/"  # names may contain "/" themselves (HF ids, paths)
            hists = {k[len(prefix):]: v for k, v in features.histograms.items() if k.startswith(prefix)}
            self._pairs[name] = (ft_result, features.vectors.get(name, {}), hists)
            self.provenance[name] = "computed"
            store.put_pair(self._identity(name), self._pairs[name])

    # -- results ----------------------------------------------------------------------

    def report(self, finetunes: Iterable[str] | None = None) -> TransferReport:
        """The report for the given finetunes (default: all configured), with checks evaluated."""
        names = list(finetunes) if finetunes is not None else list(self.config.finetunes)
        self.ensure(names)
        assert self._base_state is not None
        features = FeatureArrays()
        for key, hist in self._base_state.histograms.items():
            features.histograms[f"base/{key}"] = hist
        results = []
        for name in names:
            result, vectors, hists = self._pairs[name]
            results.append(dataclasses.replace(result, checks=[], notes=list(result.notes)))
            features.vectors[name] = vectors
            for key, hist in hists.items():
                features.histograms[f"{name}/{key}"] = hist
        base: ModelResult = self._base_state.result
        report = TransferReport(config=self.report_config(), base=base, finetunes=results, features=features)
        evaluate_checks(self.profile, report)
        return report

    def report_config(self) -> dict[str, Any]:
        c = self.config
        inputs = self.inputs
        sae = inputs.sae
        tokens = inputs.token_set
        opts = self.engine_options()
        return {
            **sae.describe(),
            "hook_name": sae.hook_name,
            "base_model": inputs.base_name,
            "finetunes": list(c.finetunes),
            "dataset": tokens.info["dataset"],
            "n_tokens": tokens.info["n_tokens"],
            "n_tokens_requested": c.n_tokens,
            "context_size": int(tokens.tokens.shape[1]),
            "tokens": tokens.info,
            "device": inputs.device,
            "dtype": inputs.dtype,
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
            "sequential": c.sequential,
            **engine_summary(c.batch_size, self._engine_runs),
            "versions": package_versions(),
        }
