"""The study's base models at their real dimensions, with random weights, and no hub.

Builds TransformerLens ``HookedTransformer`` models shaped exactly like the two base
models of the study, from their architecture parameters, plus a seeded "finetune"
(a perturbed copy) and a sae_lens standard SAE of the real width at the study's hook:

=========== ======= ====== ============= ====== ====== ====== ========================= =========
arch        d_model layers heads x d_head KV     d_mlp  vocab  SAE hook                  d_sae
=========== ======= ====== ============= ====== ====== ====== ========================= =========
gemma-2b    2048    18     8 x 256       1 MQA  16384  256000 blocks.6.hook_resid_post  16384
mistral-7b  4096    32     32 x 128      8 GQA  14336  32000  blocks.8.hook_resid_pre   65536
=========== ======= ====== ============= ====== ====== ====== ========================= =========

The configuration dictionaries repeat, field for field, what TransformerLens 3.x's
``loading_from_pretrained.convert_hf_model_config`` produces for ``google/gemma-2b``
(its hard-coded branch) and for ``MistralForCausalLM`` with Mistral-7B-v0.1's
``config.json`` (hidden_size 4096, 32 layers, 32 heads, 8 KV heads, intermediate
14336, vocab 32000, silu, rms_norm_eps 1e-5, rope_theta 1e4, sliding_window 4096;
TransformerLens caps n_ctx at 2048). Gemma's embedding scale and tied embeddings are
what TransformerLens's ``convert_gemma_weights`` does: ``W_E = E * sqrt(d_model)`` and
``W_U = E.T`` for the same matrix ``E``; norm weights are stored with Gemma's ``+1``
already added, so a fresh Gemma norm weight is 1.

Weights are drawn as Hugging Face initialises these models (normal, std
``initializer_range`` = 0.02 for every linear and embedding weight, norm weights 1,
no biases), which keeps activations and losses finite at any depth and in bf16.

The SAE is a plain standard (ReLU) SAE in float32 with no activation normalisation;
the study's Mistral SAE rescales each activation to norm sqrt(d_in)
(``constant_norm_rescale``), a per-token scalar that costs nothing measurable.

``layers=N`` keeps width, vocabulary and SAE but cuts the depth to N; the SAE hook
stays at the study's block when it exists, else it moves to the same hook of the last
block (``RealSetup.notes`` says so).

Building costs what the real model costs: a Gemma-2b-shaped model holds about
3.0 B parameters at full depth (12 GB in float32), 1.16 B with one layer; Mistral-7B
7.2 B (29 GB in float32). Use ``dtype=torch.bfloat16`` and ``layers`` to fit.

Tiny variants with the same structure (``tiny-gemma``, ``tiny-mistral``) exist for
tests and ``--tiny`` modes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "ARCHS",
    "Arch",
    "RealSetup",
    "build",
    "build_model",
    "build_sae",
    "cast_copy",
    "hook_for_depth",
    "param_count",
    "perturbed_copy",
    "random_tokens",
    "start_layer",
    "tl_config",
]


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    tl: dict[str, Any]  # HookedTransformerConfig fields (n_layers and n_ctx are set per build)
    n_layers: int  # the real depth
    max_ctx: int  # the n_ctx TransformerLens uses for this model
    hook: str  # the study's SAE hook
    d_sae: int
    tied_embeddings: bool
    embed_scale: float  # W_E = E * embed_scale (Gemma: sqrt(d_model))
    init_range: float
    bos: int
    special_ids: tuple[int, ...]
    l0: float  # the study SAE's reported L0, used to set the random SAE's sparsity
    local_attention_window: int | None = None


def _gemma_tl(d_model: int, n_heads: int, d_head: int, n_kv: int, d_mlp: int, d_vocab: int) -> dict[str, Any]:
    # transformer_lens/loading_from_pretrained.py, branch `official_model_name.startswith("google/gemma-2b")`
    return {
        "d_model": d_model,
        "d_head": d_head,
        "n_heads": n_heads,
        "d_mlp": d_mlp,
        "eps": 1e-06,
        "d_vocab": d_vocab,
        "act_fn": "gelu",
        "initializer_range": 0.02,
        "normalization_type": "RMS",
        "rotary_base": 10000,
        "rotary_dim": d_head,
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "n_key_value_heads": n_kv,
        "gated_mlp": True,
        "final_rms": True,
        "original_architecture": "GemmaForCausalLM",
    }


def _mistral_tl(d_model: int, n_heads: int, d_head: int, n_kv: int, d_mlp: int, d_vocab: int, window: int) -> dict[str, Any]:
    # transformer_lens/loading_from_pretrained.py, branch `architecture == "MistralForCausalLM"`
    # ("attn_types" is filled in per build: ["local"] * n_layers, as there)
    return {
        "d_model": d_model,
        "d_head": d_head,
        "n_heads": n_heads,
        "d_mlp": d_mlp,
        "d_vocab": d_vocab,
        "act_fn": "silu",
        "window_size": window,
        "eps": 1e-05,
        "rotary_base": 10000.0,
        "n_key_value_heads": n_kv,
        "use_local_attn": True,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "gated_mlp": True,
        "original_architecture": "MistralForCausalLM",
    }


ARCHS: dict[str, Arch] = {
    "gemma-2b": Arch(
        name="gemma-2b", tl=_gemma_tl(2048, 8, 256, 1, 16384, 256000), n_layers=18, max_ctx=8192,
        hook="blocks.6.hook_resid_post", d_sae=16384, tied_embeddings=True, embed_scale=math.sqrt(2048),
        init_range=0.02, bos=2, special_ids=(0, 1, 2), l0=56.0,
    ),
    "mistral-7b": Arch(
        name="mistral-7b", tl=_mistral_tl(4096, 32, 128, 8, 14336, 32000, 4096), n_layers=32, max_ctx=2048,
        hook="blocks.8.hook_resid_pre", d_sae=65536, tied_embeddings=False, embed_scale=1.0,
        init_range=0.02, bos=1, special_ids=(0, 1, 2), l0=92.0, local_attention_window=4096,
    ),
    # Same structure, tiny sizes: for tests and --tiny modes (seconds on a CPU). The init
    # std is raised so that logits vary as much as at the real widths (std ~0.9 = 0.02 x
    # sqrt(2048)): a bias-free model's zero-ablated continuation is exactly uniform
    # (CE = log V), its clean CE is about log V + var(logit)/2, and sae_lens's run_evals
    # divides by their difference, which bf16 rounding (1/32 nat near 6) must not erase.
    "tiny-gemma": Arch(
        name="tiny-gemma", tl=_gemma_tl(64, 2, 32, 1, 256, 512), n_layers=2, max_ctx=256,
        hook="blocks.0.hook_resid_post", d_sae=256, tied_embeddings=True, embed_scale=math.sqrt(64),
        init_range=0.12, bos=2, special_ids=(0, 1, 2), l0=8.0,
    ),
    # Between the two: big enough that the engine's memory terms (logits over a 32k vocabulary,
    # [tokens, 8192] features) stand well above allocator noise, small enough for a test (seconds).
    "small-gemma": Arch(
        name="small-gemma", tl=_gemma_tl(128, 1, 128, 1, 512, 32000), n_layers=2, max_ctx=256,
        hook="blocks.0.hook_resid_post", d_sae=8192, tied_embeddings=True, embed_scale=math.sqrt(128),
        init_range=0.06, bos=2, special_ids=(0, 1, 2), l0=16.0,
    ),
    "tiny-mistral": Arch(
        name="tiny-mistral", tl=_mistral_tl(64, 4, 16, 2, 224, 384, 4096), n_layers=3, max_ctx=256,
        hook="blocks.1.hook_resid_pre", d_sae=512, tied_embeddings=False, embed_scale=1.0,
        init_range=0.12, bos=1, special_ids=(0, 1, 2), l0=12.0, local_attention_window=4096,
    ),
}


def _arch(arch: str | Arch) -> Arch:
    if isinstance(arch, Arch):
        return arch
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}") from None


def hook_for_depth(arch: str | Arch, layers: int | None) -> tuple[str, str | None]:
    """The SAE hook for a model cut to ``layers`` blocks, and a note when it had to move."""
    a = _arch(arch)
    block, kind = _parse_hook(a.hook)
    n = a.n_layers if layers is None else layers
    if block < n:
        return a.hook, None
    moved = f"blocks.{n - 1}.hook_resid_{kind}"
    return moved, (
        f"{a.name} cut to {n} layer(s) has no blocks.{block}: the SAE hook moved from {a.hook} to {moved} (the last block)"
    )


def _parse_hook(hook: str) -> tuple[int, str]:
    parts = hook.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in ("hook_resid_pre", "hook_resid_post"):
        raise ValueError(f"not a residual-stream hook: {hook!r}")
    return int(parts[1]), parts[2].removeprefix("hook_resid_")


def start_layer(hook: str) -> int:
    """The block index a continuation from ``hook`` starts at (``start_at_layer``)."""
    block, kind = _parse_hook(hook)
    return block + (1 if kind == "post" else 0)


def tl_config(
    arch: str | Arch,
    layers: int | None = None,
    n_ctx: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """The HookedTransformerConfig of ``arch`` (depth cut to ``layers``; n_ctx as needed)."""
    from transformer_lens import HookedTransformerConfig

    a = _arch(arch)
    n_layers = a.n_layers if layers is None else int(layers)
    if not 1 <= n_layers <= a.n_layers:
        raise ValueError(f"layers must be in 1..{a.n_layers} for {a.name}; got {layers}")
    n_ctx = a.max_ctx if n_ctx is None else int(n_ctx)
    if not 2 <= n_ctx <= a.max_ctx:
        raise ValueError(f"n_ctx must be in 2..{a.max_ctx} for {a.name}; got {n_ctx}")
    fields = dict(a.tl)
    fields.update(
        n_layers=n_layers, n_ctx=n_ctx, dtype=dtype, device=str(device), init_weights=False,
        model_name=a.name, tokenizer_name=None, default_prepend_bos=True,
    )
    if fields.get("use_local_attn"):
        fields["attn_types"] = ["local"] * n_layers
    return HookedTransformerConfig(**fields)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def build_model(
    arch: str | Arch,
    layers: int | None = None,
    n_ctx: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Any:
    """A HookedTransformer of the arch's exact configuration with random (HF-style) weights."""
    from transformer_lens import HookedTransformer

    a = _arch(arch)
    cfg = tl_config(a, layers, n_ctx, dtype, device)
    dev = torch.device(device)
    # Allocate on the target device directly: a full-size model never exists on the host.
    with torch.device(dev):
        model = HookedTransformer(cfg, move_to_device=True)
    model.eval()
    gen = _generator(dev, seed)
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "w":  # RMSNorm weights (Gemma's +1 already folded, as TransformerLens stores it)
            p.fill_(1.0)
        elif leaf.startswith("b_") or leaf.startswith("_b_"):  # these models have no biases
            p.zero_()
        elif name == "embed.W_E" and a.tied_embeddings:
            continue  # tied below
        else:
            p.normal_(0.0, a.init_range, generator=gen)
    if a.tied_embeddings:
        _tie_embeddings(model, a)
    return model


def _tie_embeddings(model: Any, a: Arch) -> None:
    # W_E = W_U.T * scale, in row blocks: no full-size temporary
    W_E, W_U = model.embed.W_E, model.unembed.W_U
    step = 16384
    for start in range(0, W_E.shape[0], step):
        W_E[start : start + step].copy_(W_U[:, start : start + step].T).mul_(a.embed_scale)


@torch.no_grad()
def perturbed_copy(model: Any, arch: str | Arch, rel_noise: float = 0.05, seed: int = 1) -> Any:
    """A "finetune": every weight tensor plus ``rel_noise`` x its RMS x N(0, 1), seeded.

    Norm weights (all 1) move by ``rel_noise`` too; zero biases stay zero. For tied
    embeddings the unembedding is perturbed and W_E re-derived from it, so the
    finetune stays tied as a real Gemma finetune is.
    """
    from transformer_lens import HookedTransformer

    a = _arch(arch)
    dev = next(model.parameters()).device
    with torch.device(dev):
        ft = HookedTransformer(model.cfg, move_to_device=True)
    ft.eval()
    gen = _generator(dev, seed)
    src = dict(model.named_parameters())
    for name, p in ft.named_parameters():
        p.requires_grad_(False)
        base = src[name]
        if name == "embed.W_E" and a.tied_embeddings:
            continue
        rms = float(torch.linalg.vector_norm(base, dtype=torch.float32)) / math.sqrt(base.numel())
        if rms == 0.0 or rel_noise == 0.0:
            p.copy_(base)
            continue
        # the noise is drawn into the new tensor itself: no full-size temporary
        p.normal_(0.0, rel_noise * rms, generator=gen).add_(base)
    if a.tied_embeddings:
        _tie_embeddings(ft, a)
    return ft


@torch.no_grad()
def cast_copy(model: Any, dtype: torch.dtype) -> Any:
    """The same weights in another dtype (a new HookedTransformer; the original is kept)."""
    from transformer_lens import HookedTransformer

    cfg = model.cfg
    init_fields = {f.name for f in dataclasses.fields(cfg) if f.init}
    fields = {k: v for k, v in cfg.to_dict().items() if k in init_fields}
    fields["dtype"] = dtype
    new_cfg = type(cfg)(**fields)
    dev = next(model.parameters()).device
    with torch.device(dev):
        out = HookedTransformer(new_cfg, move_to_device=True)
    out.eval()
    src = dict(model.named_parameters())
    for name, p in out.named_parameters():
        p.requires_grad_(False)
        p.copy_(src[name])
    return out


def random_tokens(n_contexts: int, context_size: int, d_vocab: int, bos: int, special_ids: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """[n_contexts, context_size] uniform non-special ids, BOS at position 0 (as packed contexts start).

    On such tokens a bias-free random model's clean CE is about log V + var(logit)/2 and its
    zero-ablated CE exactly log V (the ablated residual stays zero), so the CE metrics are
    well defined (sae_lens divides by their difference)."""
    gen = torch.Generator().manual_seed(seed)
    lo = max(special_ids) + 1 if special_ids else 0
    toks = torch.randint(lo, d_vocab, (n_contexts, context_size), generator=gen)
    toks[:, 0] = bos
    return toks


@torch.no_grad()
def build_sae(
    arch: str | Arch,
    hook: str,
    d_sae: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    calibration: torch.Tensor | None = None,
    l0: float | None = None,
    context_size: int = 1024,
) -> Any:
    """A sae_lens standard SAE (ReLU, b_dec subtracted at the input, no normalisation) of the real width.

    With ``calibration`` (hook activations [n, d_in] from the base model) the SAE is
    made plausible for the model: b_dec = the mean activation, unit-norm encoder
    columns with a tied decoder, and b_enc set per feature so that each fires on a
    fraction ``l0 / d_sae`` of tokens (a Gaussian quantile of its pre-activation
    spread), which gives an L0 near the study SAE's.
    """
    from sae_lens import SAE

    a = _arch(arch)
    d_in = a.tl["d_model"]
    d_sae = a.d_sae if d_sae is None else d_sae
    cfg = {
        "architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": dtype, "device": str(device),
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "metadata": {
            "hook_name": hook, "context_size": context_size, "prepend_bos": True, "model_name": a.name,
            "hook_head_index": None,
        },
    }
    sae = SAE.from_dict(cfg)
    sae.eval()
    gen = _generator(torch.device(device), seed)
    W_enc = sae.W_enc
    W_enc.normal_(0.0, 1.0, generator=gen)
    W_enc.div_(W_enc.norm(dim=0, keepdim=True))
    sae.W_dec.copy_(W_enc.T)
    sae.b_dec.zero_()
    sae.b_enc.zero_()
    if calibration is not None:
        x = calibration.reshape(-1, d_in).to(device=W_enc.device, dtype=W_enc.dtype)
        sae.b_dec.copy_(x.mean(0))
        pre = (x - sae.b_dec) @ W_enc
        sigma = pre.std(0).clamp_min(1e-6)
        frac = (a.l0 if l0 is None else l0) / d_sae
        z = statistics.NormalDist().inv_cdf(1.0 - frac)
        sae.b_enc.copy_(-z * sigma)
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


@dataclasses.dataclass
class RealSetup:
    arch: Arch
    base: Any
    finetune: Any
    sae: Any
    hook: str
    start_layer: int
    notes: list[str]
    build_seconds: dict[str, float]

    @property
    def special_ids(self) -> tuple[int, ...]:
        return self.arch.special_ids

    def tokens(self, n_tokens: int, context_size: int, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
        """Random contexts holding at least ``n_tokens`` (whole batches of ``batch_size``)."""
        n_ctx = math.ceil(n_tokens / context_size)
        n_ctx = math.ceil(n_ctx / batch_size) * batch_size
        return random_tokens(n_ctx, context_size, self.base.cfg.d_vocab, self.arch.bos, self.arch.special_ids, seed)


def build(
    arch: str,
    layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    n_ctx: int | None = None,
    rel_noise: float = 0.05,
    seed: int = 0,
    sae_dtype: str = "float32",
    calibration_tokens: int = 512,
    context_size: int | None = None,
) -> RealSetup:
    """Base, finetune and a calibrated SAE for ``arch`` (see the module docstring)."""
    import time

    a = _arch(arch)
    hook, note = hook_for_depth(a, layers)
    notes = [note] if note else []
    times: dict[str, float] = {}
    t = time.perf_counter()
    base = build_model(a, layers, n_ctx, dtype, device, seed=seed)
    times["base"] = time.perf_counter() - t
    t = time.perf_counter()
    ft = perturbed_copy(base, a, rel_noise, seed=seed + 1)
    times["finetune"] = time.perf_counter() - t
    t = time.perf_counter()
    layer = start_layer(hook)
    ctx = min(base.cfg.n_ctx, context_size or base.cfg.n_ctx, 256)
    n_cal = max(1, math.ceil(calibration_tokens / ctx))
    cal_toks = random_tokens(n_cal, ctx, base.cfg.d_vocab, a.bos, a.special_ids, seed=seed + 1000).to(device)
    with torch.no_grad():
        acts = base(cal_toks, stop_at_layer=layer)[:, 1:]  # leave BOS out, as the engine does
    sae = build_sae(a, hook, device=device, dtype=sae_dtype, seed=seed + 2, calibration=acts.float(),
                    context_size=context_size or base.cfg.n_ctx)
    del acts
    times["sae"] = time.perf_counter() - t
    if layers is not None and layers < a.n_layers:
        notes.append(f"{a.name} cut to {layers} of {a.n_layers} layers (width, vocabulary and SAE kept)")
    return RealSetup(arch=a, base=base, finetune=ft, sae=sae, hook=hook, start_layer=layer, notes=notes, build_seconds=times)


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def param_count(arch: str | Arch, layers: int | None = None) -> int:
    """Parameters of one model of ``arch`` cut to ``layers`` blocks, as TransformerLens
    allocates them (its zero biases included), without building it."""
    a = _arch(arch)
    t = a.tl
    d, h, dh, V, m = t["d_model"], t["n_heads"], t["d_head"], t["d_vocab"], t["d_mlp"]
    kv = t.get("n_key_value_heads") or h
    per_layer = (
        2 * d  # ln1, ln2
        + 2 * h * d * dh + h * dh + d  # W_Q, W_O, b_Q, b_O
        + 2 * kv * d * dh + 2 * kv * dh  # W_K, W_V, b_K, b_V
        + 3 * d * m + m + d  # W_in, W_gate, W_out, b_in, b_out (gated MLP)
    )
    n = a.n_layers if layers is None else layers
    return 2 * V * d + V + d + n * per_layer  # W_E, W_U, b_U, ln_final


def sae_param_count(arch: str | Arch) -> int:
    a = _arch(arch)
    d = a.tl["d_model"]
    return 2 * d * a.d_sae + a.d_sae + d


@contextlib.contextmanager
def logit_similarity_skipped() -> Iterator[None]:
    """The engine's logit similarity returns NaN inside this block: for untimed warm-up runs,
    where it would cost minutes at real widths and has no first-call cost of its own. It
    patches ``metrics.weights.logit_similarity``, the name the engine's weight metrics call."""
    from pytest_sae_transfer.metrics import weights

    real = weights.logit_similarity
    weights.logit_similarity = lambda W_dec, *a, **k: torch.full((W_dec.shape[0],), float("nan"), dtype=torch.float64)
    try:
        yield
    finally:
        weights.logit_similarity = real
