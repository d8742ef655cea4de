"""One configuration's results, each computed at most once: read from the result cache, or
computed by the engine and stored there.

A result is one (model, SAE): the base's with each SAE, and each (finetune, SAE) pair's.
Results are shared through the cache, guarded by file locks, so xdist workers and
concurrent runs compute each once; adding an SAE to a run computes only that SAE's.
``provenance`` records, per SAE and model, whether this process read its result from
the cache or computed it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Iterable

from .. import __version__
from ..config import RunConfig
from ..engine import ENGINE_VERSION, BaseState, EngineOptions, hook_layer, memory, run_transfer_many
from ..engine.memory import MemoryPlan
from ..loading import LoadedModel, LoadedSAE, model_identity, quiet_third_party_warnings
from ..report import FeatureArrays, PairResult, RunReport, TransferReport
from ..thresholds import Profile, evaluate_checks
from ..thresholds.watchlist import check_ids_in_range
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
        self._base_states: dict[str, BaseState] = {}
        self._pairs: dict[tuple[str, str], PairEntry] = {}
        self._identities: dict[str, str] = {}
        self._transient_notes: dict[str, list[str]] = {}
        self.provenance: dict[str, dict[str, str]] = {}  # SAE key -> {"base" / finetune: "cache" | "computed"}
        self._engine_runs: list[dict[str, Any]] = []  # the engine's run config of each compute in this session

    # -- what the fixtures hand out --------------------------------------------

    @property
    def sae(self) -> LoadedSAE:
        return self.inputs.sae

    @property
    def saes(self) -> list[LoadedSAE]:
        return self.inputs.saes

    @property
    def sae_keys(self) -> list[str]:
        return [s.key for s in self.inputs.saes]

    @property
    def base_name(self) -> str:
        return self.inputs.base_name

    @property
    def token_set(self) -> Any:
        return self.inputs.token_set

    def model(self, name: str) -> LoadedModel:
        return self.inputs.model(name)

    def pair(self, finetune: str, sae_key: str | None = None) -> PairResult:
        key = sae_key or self.sae_keys[0]
        return PairResult(self.report([finetune], [key]).sae(key), finetune)

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
            watched_features=tuple(self.profile.features.labels()) if self.profile.features is not None else (),
        )

    def _identity(self, name: str) -> str:
        if name not in self._identities:
            self._identities[name] = model_identity(self.inputs.source(name))
        return self._identities[name]

    def _store(self, sae: LoadedSAE) -> ResultStore:
        """One SAE's results, keyed by everything that decides them (the tokens by their hash)."""
        inputs = self.inputs
        opts = self.engine_options()
        parts = {
            "base": self._identity(inputs.base_name),
            "sae": sae.identity,
            "tokens": inputs.token_set.info["tokens_sha256"],
            "context_size": int(inputs.token_set.tokens.shape[1]),
            "exclude_special_tokens": opts.exclude_special_tokens,
            "special_token_ids": list(opts.special_token_ids or ()),
            "outlier_norm": opts.outlier_norm,
            "n_bootstrap": opts.n_bootstrap,
            "seed": opts.seed,
            "dtype": inputs.dtype,
            "device_type": inputs.device.split(":")[0],
            "model_kwargs": sae.model_kwargs,
            "engine": ENGINE_VERSION,
            "package": __version__,
            # --sae-no-cache keeps results within this run (xdist workers still share them).
            "run": self.run_id if self.config.no_cache else None,
        }
        if self.config.no_cache and self.run_id is None:
            cache: ResultCache | MemoryOnlyCache = MemoryOnlyCache()  # --sae-no-cache outside xdist
        else:
            cache = ResultCache(self.config.resolved_cache_dir())
        # A pair's feature section holds cards for its watched features: they decide it too.
        pair_parts = {"features": {"top_k": opts.top_k, "n_worst": opts.n_worst, "watched": [list(w) for w in opts.watched_features]}}
        return ResultStore(cache, parts, self.notes, pair_parts)

    def _load_base(self, key: str, store: ResultStore) -> bool:
        state = store.get_base()
        if state is None:
            return False
        self._base_states[key] = state
        self.provenance.setdefault(key, {}).setdefault("base", "cache")
        return True

    def _load_pair(self, key: str, store: ResultStore, finetune: str) -> bool:
        entry = store.get_pair(finetune, self._identity(finetune))
        if entry is None:
            return False
        self._pairs[(finetune, key)] = entry
        self.provenance.setdefault(key, {}).setdefault(finetune, "cache")
        return True

    # -- evaluation -----------------------------------------------------------------

    def ensure(self, finetunes: Iterable[str], sae_keys: Iterable[str] | None = None) -> None:
        """Make the base results and the given (finetune, SAE) pairs available: from the cache or computed."""
        finetunes = list(dict.fromkeys(finetunes))
        keys = list(sae_keys) if sae_keys is not None else self.sae_keys
        wanted = [(ft, k) for k in keys for ft in finetunes if (ft, k) not in self._pairs]
        if not wanted and all(k in self._base_states for k in keys):
            return
        for name in finetunes:
            self.inputs.check_model_exists(name)
        if self.profile.features is not None:
            for k in keys:  # a watched id beyond an SAE's width: a usage error before anything runs
                check_ids_in_range(self.profile.features, self.inputs.sae_by_key(k).d_sae, k)
        stores = {k: self._store(self.inputs.sae_by_key(k)) for k in keys}
        first = next(iter(stores.values()))
        if isinstance(first.cache, ResultCache):
            check_writable(first.cache.root)
            first.cache.sweep()
        self._read_cached(keys, stores, wanted)
        wanted = [(ft, k) for ft, k in wanted if (ft, k) not in self._pairs]
        if not wanted and all(k in self._base_states for k in keys):
            return
        missing_base = [k for k in keys if k not in self._base_states]
        if missing_base and self.worker_id is not None and wanted:
            # Under xdist, compute the bases alone first and release their locks, so workers
            # that own other finetunes can go on with them in parallel.
            with self._locked([stores[k].base_key() for k in sorted(missing_base)], stores):
                self._read_cached(missing_base, stores, [])
                todo = [k for k in missing_base if k not in self._base_states]
                if todo:
                    self._compute([], todo, stores)
        with contextlib.ExitStack() as stack:
            lock_keys = [stores[k].base_key() for k in keys if k not in self._base_states]
            lock_keys += [stores[k].pair_key(self._identity(ft)) for ft, k in wanted]
            stack.enter_context(self._locked(sorted(set(lock_keys)), stores))
            self._read_cached(keys, stores, wanted)
            missing = [(ft, k) for ft, k in wanted if (ft, k) not in self._pairs]
            todo = [k for k in keys if k not in self._base_states or any(mk == k for _, mk in missing)]
            if todo:
                self._compute(list(dict.fromkeys(ft for ft, _ in missing)), todo, stores)

    def _read_cached(self, keys: list[str], stores: dict[str, ResultStore], wanted: list[tuple[str, str]]) -> None:
        for k in keys:
            if k not in self._base_states:
                self._load_base(k, stores[k])
        for ft, k in wanted:
            if (ft, k) not in self._pairs:
                self._load_pair(k, stores[k], ft)

    @contextlib.contextmanager
    def _locked(self, lock_keys: list[str], stores: dict[str, ResultStore]) -> Any:
        """Hold the cache locks of ``lock_keys`` (in sorted order, so two processes never deadlock)."""
        store = next(iter(stores.values()))
        with contextlib.ExitStack() as stack:
            for lock_key in lock_keys:
                stack.enter_context(store.lock(lock_key))
            yield

    def _memory_plan(self, base: LoadedModel, finetunes: list[str], keys: list[str]) -> MemoryPlan | None:
        """On CUDA, the batch size and mode the memory model says fit (``engine.memory``); None elsewhere.

        What the run may use is the free device memory plus what its models already hold there
        (the base, and finetunes loaded by an earlier computation), which the prediction counts."""
        device = self.inputs.device
        if not device.startswith("cuda"):
            return None
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        held = sum(
            sum(p.numel() * p.element_size() for p in loaded.model.parameters())
            for name, loaded in self.inputs.models.items() if name == self.inputs.base_name or name in finetunes
        )
        saes = [self.inputs.sae_by_key(k) for k in keys]
        layers = {hook_layer(s.hook_name, base.model.cfg.n_layers) for s in saes}
        return memory.plan(free + held, memory.ModelShape.of(base.model), [memory.SAEShape.of(s.sae) for s in saes],
                           self.config.batch_size, int(self.inputs.token_set.tokens.shape[1]), n_finetunes=len(finetunes),
                           n_captured=len(layers), force_sequential=self.config.sequential)

    def _transient_model(self, name: str) -> Callable[[], Any]:
        def load() -> Any:
            loaded = self.inputs.model(name)
            self.inputs.models.pop(name, None)  # not kept: sequential mode holds one finetune at a time
            self._transient_notes[name] = loaded.notes
            return loaded.model

        return load

    def _compute(self, finetunes: list[str], keys: list[str], stores: dict[str, ResultStore]) -> None:
        """Run the engine for these finetunes and SAEs (the bases already known are not recomputed)."""
        with quiet_third_party_warnings():
            base = self.inputs.model(self.inputs.base_name)
            mem_plan = self._memory_plan(base, finetunes, keys)
            sequential = mem_plan.sequential if mem_plan is not None else self.config.sequential
            if sequential:
                models = [(ft, self._transient_model(ft)) for ft in finetunes]
            else:
                models = [(ft, self.inputs.model(ft).model) for ft in finetunes]
            options = dataclasses.replace(self.engine_options(), sequential=sequential)
            run_config = None
            if mem_plan is not None:
                options = dataclasses.replace(options, batch_size=mem_plan.batch_size)
                run_config = {"memory_plan": mem_plan.config()}
                if mem_plan.batch_size < self.config.batch_size or (mem_plan.sequential and not self.config.sequential) or not mem_plan.fits:
                    self.notes.append(mem_plan.describe())
            saes = {k: self.inputs.sae_by_key(k).sae for k in keys}
            with self._quiet_context():
                run = run_transfer_many(
                    base.model, models, saes, self.inputs.token_set.tokens, options, config=run_config,
                    base_name=self.inputs.base_name, base_states={k: self._base_states[k] for k in keys if k in self._base_states},
                )
        self._engine_runs.append(dict(next(iter(run.outputs.values())).report.config))
        if run.oom_splits:
            c = self._engine_runs[-1]
            self.notes.append(
                f"out of memory at batch size {c.get('batch_size')}: the batch was halved {run.oom_splits} time(s) "
                f"and the run finished at batch size {c.get('final_batch_size')}"
            )
        for key, out in run.outputs.items():
            if key not in self._base_states:
                self._base_states[key] = out.base_state
                self.provenance.setdefault(key, {})["base"] = "computed"
                stores[key].put_base(out.base_state)
            self._keep_pairs(key, out.report, stores[key])

    def _keep_pairs(self, key: str, report: TransferReport, store: ResultStore) -> None:
        features = report.features or FeatureArrays()
        for ft_result in report.finetunes:
            name = ft_result.model
            loaded = self.inputs.models.get(name)
            ft_result.notes.extend(loaded.notes if loaded is not None else self._transient_notes.get(name, []))
            prefix = name + "/"  # names may contain "/" themselves (HF ids, paths)
            hists = {k[len(prefix):]: v for k, v in features.histograms.items() if k.startswith(prefix)}
            self._pairs[(name, key)] = PairEntry(ft_result, features.vectors.get(name, {}), hists, features.topk.get(name))
            self.provenance.setdefault(key, {})[name] = "computed"
            store.put_pair(self._identity(name), self._pairs[(name, key)])

    # -- results ----------------------------------------------------------------------

    def report(self, finetunes: Iterable[str] | None = None, sae_keys: Iterable[str] | None = None) -> RunReport:
        """The run's report for the given finetunes and SAEs (default: all configured), checks evaluated."""
        names = list(finetunes) if finetunes is not None else list(self.config.finetunes)
        keys = list(sae_keys) if sae_keys is not None else self.sae_keys
        self.ensure(names, keys)
        return RunReport([self._sae_report(k, names) for k in keys])

    def _sae_report(self, key: str, names: list[str]) -> TransferReport:
        state = self._base_states[key]
        features = FeatureArrays()
        for hist_key, hist in state.histograms.items():
            features.histograms[f"base/{hist_key}"] = hist
        results = []
        if state.topk is not None:
            features.topk["base"] = state.topk.to_arrays()
        for name in names:
            entry = self._pairs[(name, key)]
            results.append(dataclasses.replace(entry.result, checks=[], notes=list(entry.result.notes)))
            features.vectors[name] = entry.vectors
            if entry.topk:
                features.topk[name] = entry.topk
            for hist_key, hist in entry.histograms.items():
                features.histograms[f"{name}/{hist_key}"] = hist
        report = TransferReport(config=self.report_config(key), base=state.result, finetunes=results, features=features)
        evaluate_checks(self.profile, report)
        return report

    def report_config(self, key: str | None = None) -> dict[str, Any]:
        """The configuration of one SAE's results (the first SAE's by default)."""
        c = self.config
        inputs = self.inputs
        sae = inputs.sae_by_key(key) if key is not None else inputs.sae
        tokens = inputs.token_set
        opts = self.engine_options()
        state = self._base_states.get(sae.key)
        return {
            **sae.describe(),
            "hook_name": sae.hook_name,
            "outlier_norm": state.outlier_norm if state is not None else None,
            "provenance": dict(self.provenance.get(sae.key, {})),
            "base_model": inputs.base_name,
            "finetunes": list(c.finetunes),
            "saes": self.sae_keys,
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
            "thresholds_profile": self.profile.name,
            "thresholds_path": self.profile.path,
            "notes": list(self.notes),
            "sequential": c.sequential,
            **engine_summary(c.batch_size, self._engine_runs),
            "versions": package_versions(),
        }
