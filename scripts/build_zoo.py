#!/usr/bin/env python
"""Build the bundled "toy zoo" shipped in ``pytest_sae_transfer/zoo/data``.

Everything here is built offline, from text that ships with every CPython, with
fixed seeds:

* corpus     prose = docstrings of the stdlib (``ast.get_docstring`` over the
             stdlib ``.py`` files, plus the ``__doc__`` of the C modules that
             are compiled into / shipped with the interpreter) and
             ``pydoc_data.topics``; code = the stdlib ``.py`` sources.
             Tests, idlelib, tkinter and site-packages are skipped.  Every
             document gets a deterministic sha256 bucket; a file's docstrings
             and its code fall on the same side of the train / held-out split,
             so nothing held out is ever trained on (tokenizer included).
* tokenizer  byte-level BPE (``tokenizers``), vocab 4096, ``<bos>`` ``<eos>``
             ``<pad>`` = ids 0, 1, 2.
* toy-base   4-layer TransformerLens ``HookedTransformer`` trained from scratch
             on packed prose (context 128, BOS at the start of every context
             and between documents, exactly sae_lens's ``ActivationsStore``
             packing).
* toy-prose  mild finetune of toy-base on a disjoint prose split.
* toy-code   heavy finetune of toy-base on stdlib code (high LR, all params).
* toy-res    sae_lens SAEs trained on toy-base at ``blocks.1.hook_resid_post``
             (standard L1 and topk k=16, d_sae 1024; the standard one is the
             release default), plus a standard L1 SAE at every other layer
             (``blocks.{0,2,3}.hook_resid_post``), trained with exactly the
             recipe of the blocks.1 standard SAE: same d_sae, L1, lr, warm-up,
             dead/sampling windows, token budget, training rows and seed.
* datasets   ``toy-eval`` (held-out prose) and ``toy-eval-code`` (held-out
             code) as JSON lines.
* zoo.json   the manifest (files, sha256s, summary numbers).

Models are stored as fp16 safetensors.  Each model is rounded to fp16 *before*
it is used further (finetune start, SAE training, evaluation), so every number
in the manifest is measured on exactly the weights that get loaded back.

Stages (``--stages``, comma-separated; default: all of them, in this order):

    corpus     rebuild ``zoo-build/corpus.json`` from the running CPython's stdlib
    tokenizer  retrain the tokenizer
               (either of these two also re-packs ``zoo-build/tokens.pt``)
    base, prose, code
               retrain that model
    saes       retrain the two blocks.1 SAEs (standard, topk)
    layers     retrain the standard SAEs at the layers given by ``--layers``
               (default 0,2,3: every layer but 1, whose SAEs ``saes`` builds)
    data       rewrite the two eval datasets

A stage that is not named reuses what it would produce: the work-dir files
(corpus, packed tokens, rebuilt when missing) and the shipped files in ``--out``
(tokenizer, fp16 models, SAEs, datasets; each rebuilt only when missing).  In
particular the SAE stages train on the *shipped* fp16 toy-base, so they can run
on a checkout that never trained a model.  When ``data`` is not run, the
datasets that would be written are compared with the shipped ones and the
result is logged.  Every run re-measures every SAE in the release on every
model and rewrites ``zoo.json``.

Usage::

    HF_HUB_OFFLINE=1 python scripts/build_zoo.py            # full build
    python scripts/build_zoo.py --stages layers               # (re)train blocks.0/2/3 SAEs only
    python scripts/build_zoo.py --stages layers --layers 2    # just the blocks.2 SAE
    python scripts/build_zoo.py --probe                       # time a few steps

To check that a stage reproduces the shipped files, point ``--out`` at a copy of
``pytest_sae_transfer/zoo/data`` and compare sha256s afterwards.

Intermediate results (corpus, packed tokens, checkpoints) go to ``zoo-build/``
at the repository root (git-ignored); ``--fresh`` wipes it first.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "pytest_sae_transfer" / "zoo" / "data"
DEFAULT_WORK = REPO / "zoo-build"

SEED = 1234
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>"]
CONTEXT = 128
HOOK = "blocks.1.hook_resid_post"
SAE_STANDARD_ID = HOOK
SAE_TOPK_ID = HOOK + "-topk"
RELEASE = "toy-res"
EVAL_DATASET = "toy-eval"
EVAL_CODE_DATASET = "toy-eval-code"

MODEL_CFG: dict[str, Any] = dict(
    n_layers=4,
    d_model=128,
    n_heads=4,
    d_head=32,
    d_mlp=512,
    n_ctx=CONTEXT,
    d_vocab=VOCAB_SIZE,
    act_fn="gelu",
    normalization_type="LN",
    positional_embedding_type="standard",
    tokenizer_name=None,
    original_architecture="toy-zoo",
    model_name="toy-base",
    default_prepend_bos=True,
)

# Split fractions (buckets out of 1000 of sha256(doc id)).
EVAL_BUCKETS = 300  # 30% of files/topics/modules are held out, never trained on
PROSE_FT_BUCKETS = 120  # of the remaining prose, this share (of 1000) goes to toy-prose

# Eval file sizes (tokens).
EVAL_PROSE_MAX_TOKENS = 400_000
EVAL_CODE_MAX_TOKENS = 120_000
CODE_CHUNK_CHARS = 6000

# Training schedules (steps are sized for ~2 CPU cores; see --probe).
BATCH = 16  # contexts of 128 tokens per optimizer step
SCHEDULES: dict[str, dict[str, Any]] = {
    "toy-base": dict(steps=700, lr=2e-3, warmup=50, min_lr_frac=0.1, wd=0.05),
    "toy-prose": dict(steps=30, lr=1e-4, warmup=5, min_lr_frac=1.0, wd=0.0),
    "toy-code": dict(steps=400, lr=3e-3, warmup=20, min_lr_frac=0.3, wd=0.0),
}
SAE_TRAIN_TOKENS = 1_500_000
SAE_L1 = 1.7
SAE_LR = 3e-3
# Short windows: a feature silent for 50 steps counts as dead (it feeds TopK's
# auxiliary loss and the L1 SAE's dead-feature statistics) over a ~366-step run.
SAE_DEAD_FEATURE_WINDOW = 50
SAE_FEATURE_SAMPLING_WINDOW = 100
SAE_TOPK_K = 16
D_SAE = 1024


def resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


# The layer family: a standard SAE at every residual stream but blocks.1 (which
# has its own pair above), same recipe as SAE_STANDARD_ID.  sae_id = hook name.
LAYER_SAE_LAYERS = tuple(layer for layer in range(MODEL_CFG["n_layers"]) if resid_hook(layer) != HOOK)
# Every SAE of the release: (sae_id, architecture, hook), in manifest order.
SAE_FAMILY: list[tuple[str, str, str]] = [(SAE_STANDARD_ID, "standard", HOOK), (SAE_TOPK_ID, "topk", HOOK)] + [
    (resid_hook(layer), "standard", resid_hook(layer)) for layer in LAYER_SAE_LAYERS
]

MODEL_DESCRIPTIONS = {
    "toy-base": "4-layer toy LM trained from scratch on CPython stdlib docstrings + pydoc topics",
    "toy-prose": "mild finetune of toy-base on a disjoint slice of stdlib prose (small LR, few steps); base SAEs should transfer",
    "toy-code": "heavy finetune of toy-base on CPython stdlib source code (large LR, many steps, all params); base SAEs should NOT transfer",
}

LOG_T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - LOG_T0:7.1f}s] {msg}", flush=True)


def bucket(doc_id: str, salt: str = "") -> int:
    return int(hashlib.sha256((salt + doc_id).encode()).hexdigest()[:8], 16) % 1000


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------

SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "turtledemo",
}


def stdlib_py_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        for fn in sorted(filenames):
            if not fn.endswith(".py") or fn.startswith("test_") or fn.endswith("_test.py"):
                continue
            p = Path(dirpath) / fn
            out.append((p.relative_to(root).as_posix(), p))
    out.sort(key=lambda t: t[0])
    return out


def _docstrings_in_source_order(tree: ast.AST) -> list[str]:
    docs: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node, clean=True)
            if d:
                docs.append(d)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return docs


C_MODULE_SKIP_PREFIXES = ("_test", "xx", "_xx", "_ctypes_test", "_tkinter", "antigravity", "this")


def c_module_names() -> list[str]:
    names = set(sys.builtin_module_names)
    dyn = Path(sysconfig.get_paths()["platstdlib"]) / "lib-dynload"
    if dyn.is_dir():
        for p in dyn.iterdir():
            if p.suffix in (".so", ".pyd"):
                names.add(p.name.split(".")[0])
    return sorted(n for n in names if not n.startswith(C_MODULE_SKIP_PREFIXES))


def _c_module_docs(modname: str) -> list[str]:
    try:
        mod = importlib.import_module(modname)
    except Exception:
        return []
    docs: list[str] = []

    def add(obj: Any) -> None:
        d = getattr(obj, "__doc__", None)
        if isinstance(d, str):
            d = inspect.cleandoc(d)
            if d:
                docs.append(d)

    add(mod)
    for name in sorted(dir(mod)):
        if name.startswith("__"):
            continue
        try:
            obj = getattr(mod, name)
        except Exception:
            continue
        if inspect.ismodule(obj):
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        add(obj)
        if inspect.isclass(obj) and getattr(obj, "__module__", None) in (modname, modname.lstrip("_")):
            for attr in sorted(vars(obj)):
                if attr.startswith("__") and attr not in ("__init__", "__new__", "__call__"):
                    continue
                add(vars(obj)[attr])
    return docs


def chunk_code(text: str, max_chars: int) -> list[str]:
    """Cut a source file into pieces of at most ~max_chars, at blank lines where possible."""
    lines = text.splitlines(keepends=True)
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for line in lines:
        if size >= max_chars * 0.5 and line.strip() == "" and size + len(line) > 0:
            # a blank line after at least half a chunk: a good place to cut
            if size >= max_chars * 0.8:
                chunks.append("".join(cur))
                cur, size = [], 0
                continue
        if size + len(line) > max_chars and cur:
            chunks.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        chunks.append("".join(cur))
    return [c.strip("\n") + "\n" for c in chunks if c.strip()]


def build_corpus() -> dict[str, Any]:
    """Return {'prose': [doc...], 'code': [doc...]}, doc = {id, group, split, text}."""
    import pydoc_data.topics

    seen: set[str] = set()
    prose: list[dict[str, Any]] = []
    code: list[dict[str, Any]] = []

    def split_of(group_id: str) -> str:
        b = bucket(group_id)
        if b < EVAL_BUCKETS:
            return "eval"
        if b < EVAL_BUCKETS + PROSE_FT_BUCKETS:
            return "ft"
        return "train"

    def add_prose(doc_id: str, group_id: str, pieces: Iterable[str]) -> None:
        uniq = []
        for d in pieces:
            d = d.strip()
            if len(d) < 16 or d in seen:
                continue
            seen.add(d)
            uniq.append(d)
        if uniq:
            prose.append(dict(id=doc_id, group=group_id, split=split_of(group_id), text="\n\n".join(uniq)))

    files = stdlib_py_files()
    for rel, path in files:
        src = path.read_text(encoding="utf-8", errors="replace")
        group = "py:" + rel
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        add_prose(group, group, _docstrings_in_source_order(tree))
        for i, chunk in enumerate(chunk_code(src, CODE_CHUNK_CHARS)):
            code.append(dict(id=f"{group}#{i}", group=group, split=split_of(group), text=chunk))

    for modname in c_module_names():
        group = "c:" + modname
        add_prose(group, group, _c_module_docs(modname))

    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        group = "topic:" + key
        add_prose(group, group, [topics[key]])

    prose.sort(key=lambda d: d["id"])
    code.sort(key=lambda d: d["id"])
    return dict(prose=prose, code=code, n_py_files=len(files))


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(corpus: dict[str, Any], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    prose_train = [d["text"] for d in corpus["prose"] if d["split"] != "eval"]
    prose_chars = sum(map(len, prose_train))
    # as much code as prose (by characters), deterministically chosen
    code_train = sorted(
        (d for d in corpus["code"] if d["split"] != "eval"), key=lambda d: bucket(d["id"], "tok")
    )
    code_sel, n = [], 0
    for d in code_train:
        if n >= prose_chars:
            break
        code_sel.append(d["text"])
        n += len(d["text"])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(prose_train + code_sel, trainer=trainer, length=len(prose_train) + len(code_sel))
    assert tok.token_to_id("<bos>") == 0 and tok.token_to_id("<eos>") == 1 and tok.token_to_id("<pad>") == 2

    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    # A plain config that both transformers 4.x and 5.x read as a fast tokenizer.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("name_or_path", None)
    cfg.pop("model_max_length", None)
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_tokenizer(tok_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(
        str(tok_dir),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------
# tokens / packing
# --------------------------------------------------------------------------


def encode_docs(tokenizer, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), 256):
        enc = tokenizer(texts[i : i + 256], add_special_tokens=False)["input_ids"]
        out.extend(enc)
    return out


def pack(token_lists: Iterable[list[int]], bos_id: int):
    """Pack documents into CONTEXT-token rows the way sae_lens's ActivationsStore does."""
    import torch
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    it = (torch.tensor(t, dtype=torch.long) for t in token_lists if len(t) > 0)
    rows = list(
        concat_and_batch_sequences(
            tokens_iterator=it,
            context_size=CONTEXT,
            begin_batch_token_id=bos_id,
            begin_sequence_token_id=None,
            sequence_separator_token_id=bos_id,
        )
    )
    return torch.stack(rows) if rows else torch.empty(0, CONTEXT, dtype=torch.long)


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


def make_model(tokenizer, state_dict=None):
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(SEED)
    cfg = HookedTransformerConfig(**MODEL_CFG)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    if state_dict is not None:
        load_params(model, state_dict)
    return model


def param_state_dict(model) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def load_params(model, sd: dict[str, Any]) -> None:
    import torch

    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    buffers = {k for k, _ in model.named_buffers()}
    assert not unexpected, unexpected
    assert set(missing) <= buffers, set(missing) - buffers


def round_fp16(model) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))


def model_config_dict(model_name: str) -> dict[str, Any]:
    from transformer_lens import HookedTransformerConfig

    cfg = dict(MODEL_CFG)
    cfg["model_name"] = model_name
    # validate that these are exactly constructor arguments
    HookedTransformerConfig(**cfg)
    return cfg


def save_model(model, model_name: str, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(torch.float16).contiguous() for k, v in param_state_dict(model).items()}
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt", "model_name": model_name})
    (out_dir / "config.json").write_text(json.dumps(model_config_dict(model_name), indent=2, sort_keys=True) + "\n")


def loss_per_token(model, tokens, special_ids: list[int], batch: int = 32):
    """Mean next-token CE over positions whose *input* token is not special (sae_lens convention)."""
    import torch

    total, count = 0.0, 0
    special = torch.tensor(special_ids)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(tokens), batch):
            t = tokens[i : i + batch]
            logits = model(t, return_type="logits")
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -lp.gather(-1, t[:, 1:, None]).squeeze(-1)
            mask = ~torch.isin(t[:, :-1], special)
            total += float(nll[mask].double().sum())
            count += int(mask.sum())
    return total / max(count, 1)


def train_lm(model, rows, sched: dict[str, Any], name: str, eval_sets: dict[str, Any], special_ids, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "W_pos" not in n else no_decay).append(p)
    opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=sched["wd"]), dict(params=no_decay, weight_decay=0.0)],
        lr=sched["lr"],
        betas=(0.9, 0.95),
    )
    steps, warm = sched["steps"], sched["warmup"]

    def lr_at(s: int) -> float:
        if s < warm:
            return sched["lr"] * (s + 1) / warm
        prog = (s - warm) / max(1, steps - warm)
        floor = sched["min_lr_frac"]
        return sched["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog)))

    perm = torch.randperm(len(rows), generator=gen)
    pos = 0
    model.train()
    t0 = time.time()
    for s in range(steps):
        if pos + BATCH > len(perm):
            perm = torch.randperm(len(rows), generator=gen)
            pos = 0
        idx = perm[pos : pos + BATCH]
        pos += BATCH
        batch = rows[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if s % 50 == 0 or s == steps - 1:
            log(f"{name} step {s}/{steps} loss {loss.item():.3f} lr {lr_at(s):.2e} ({(time.time() - t0) / (s + 1):.2f}s/step)")
    model.eval()
    round_fp16(model)
    res = {k: loss_per_token(model, v, special_ids) for k, v in eval_sets.items()}
    log(f"{name} done in {time.time() - t0:.0f}s; held-out loss (fp16-rounded) {res}")
    return res


# --------------------------------------------------------------------------
# SAEs
# --------------------------------------------------------------------------


def hook_acts(model, tokens, special_ids, batch: int = 32, hook: str = HOOK):
    import torch

    layer = int(hook.split(".")[1])
    out = []
    special = torch.tensor(special_ids)
    with torch.no_grad():
        for i in range(0, len(tokens), batch):
            t = tokens[i : i + batch]
            _, cache = model.run_with_cache(t, names_filter=hook, stop_at_layer=layer + 1)
            a = cache[hook]
            out.append(a[~torch.isin(t, special)])
    return torch.cat(out)


def sae_stats(sae, acts) -> dict[str, float]:
    import torch

    with torch.no_grad():
        f = sae.encode(acts.float())
        xh = sae.decode(f)
        x = acts.double()
        resid = ((x - xh.double()) ** 2).sum()
        var = ((x - x.mean(0)) ** 2).sum()
        fired = (f != 0).sum(0)
        return dict(
            explained_variance=float(1 - resid / var),
            l0=float((f != 0).float().sum(-1).mean()),
            dead_fraction=float((fired == 0).float().mean()),
            dense_fraction=float((fired > 0.1 * len(acts)).float().mean()),
            mse=float(resid / len(acts)),
        )


def spliced_loss(model, sae, tokens, special_ids, batch: int = 32, hook: str = HOOK) -> float:
    import torch

    special = torch.tensor(special_ids)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(tokens), batch):
            t = tokens[i : i + batch]
            keep = ~torch.isin(t, special)

            def fn(act, hook=None, keep=keep):
                rec = sae.decode(sae.encode(act.float())).to(act.dtype)
                return torch.where(keep[..., None], rec, act)

            logits = model.run_with_hooks(t, return_type="logits", fwd_hooks=[(hook, fn)])
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -lp.gather(-1, t[:, 1:, None]).squeeze(-1)
            m = keep[:, :-1]
            total += float(nll[m].double().sum())
            count += int(m.sum())
    return total / max(count, 1)


def train_sae(model, train_rows, arch: str, out_dir: Path, work: Path, special_ids: list[int], hook: str = HOOK):
    """Train one SAE on ``model`` at ``hook`` and store it (fp16-rounded weights,
    float32 cfg) in ``out_dir``.  Everything but ``arch`` and ``hook`` is the
    same for every SAE of the release, seed included."""
    import datasets
    import torch
    from sae_lens import (
        SAE,
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    if arch == "standard":
        sae_cfg = StandardTrainingSAEConfig(
            d_in=MODEL_CFG["d_model"], d_sae=D_SAE, l1_coefficient=SAE_L1, l1_warm_up_steps=100,
            apply_b_dec_to_input=True, normalize_activations="expected_average_only_in",
        )
    else:
        sae_cfg = TopKTrainingSAEConfig(
            d_in=MODEL_CFG["d_model"], d_sae=D_SAE, k=SAE_TOPK_K, normalize_activations="expected_average_only_in"
        )

    ds = datasets.Dataset.from_dict({"tokens": train_rows.tolist()})
    tmp = Path(tempfile.mkdtemp(prefix=f"sae-{arch}-", dir=work))
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="toy-base",
        hook_name=hook,
        dataset_path=EVAL_DATASET,  # metadata only; the data comes from override_dataset
        is_dataset_tokenized=True,
        streaming=False,
        context_size=CONTEXT,
        prepend_bos=True,
        exclude_special_tokens=list(special_ids),
        training_tokens=SAE_TRAIN_TOKENS,
        train_batch_size_tokens=4096,
        store_batch_size_prompts=32,
        n_batches_in_buffer=64,  # x context_size = 8192 tokens; must be >= train_batch_size_tokens (4096), else sae_lens raises
        lr=SAE_LR,
        dead_feature_window=SAE_DEAD_FEATURE_WINDOW,
        feature_sampling_window=SAE_FEATURE_SAMPLING_WINDOW,
        lr_warm_up_steps=50,
        lr_decay_steps=SAE_TRAIN_TOKENS // 4096 // 5,
        lr_scheduler_name="constant",
        device="cpu",
        seed=SEED,
        dtype="float32",
        model_from_pretrained_kwargs={},
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=str(tmp),
        n_checkpoints=0,
        verbose=False,
        n_eval_batches=2,
        # the norm scaling factor is estimated on these batches and folded into
        # the saved weights (the stored SAE takes raw activations)
        n_batches_for_norm_estimate=16,
    )
    torch.manual_seed(SEED)
    t0 = time.time()
    LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=ds).run()
    log(f"SAE {arch} at {hook} trained in {time.time() - t0:.0f}s")

    sae = SAE.load_from_disk(str(tmp), device="cpu")
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.iterdir():
        f.unlink()
    sae_fp16 = SAE.load_from_disk(str(tmp), device="cpu")
    sae_fp16.load_state_dict(sae.state_dict())
    sae_fp16.to(torch.float16)
    sae_fp16.save_model(str(out_dir))
    # Patch the metadata: the dataset is the zoo's held-out eval set (by name),
    # the model is the zoo's toy-base, nothing needs to be passed to from_pretrained.
    cfg_path = out_dir / "cfg.json"
    c = json.loads(cfg_path.read_text())
    c["dtype"] = "float32"
    c["device"] = "cpu"
    md = c.setdefault("metadata", {})
    md.update(
        hook_name=hook,
        context_size=CONTEXT,
        prepend_bos=True,
        model_name="toy-base",
        dataset_path=EVAL_DATASET,
        model_from_pretrained_kwargs={},
        model_class_name="HookedTransformer",
        hook_head_index=None,
        exclude_special_tokens=list(special_ids),
        sequence_separator_token="bos",
        disable_concat_sequences=False,
        seqpos_slice=[None],
    )
    cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = SAE.load_from_disk(str(out_dir), device="cpu")
    assert loaded.W_enc.dtype == torch.float32
    assert torch.equal(loaded.W_enc, sae.W_enc)
    return loaded


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--fresh", action="store_true", help="wipe the work dir first")
    ap.add_argument("--probe", action="store_true", help="time a few training steps and exit")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument(
        "--stages",
        default="corpus,tokenizer,base,prose,code,saes,layers,data",
        help="comma-separated stages to (re)run; earlier stages are reused from the work dir",
    )
    ap.add_argument(
        "--layers",
        default=",".join(map(str, LAYER_SAE_LAYERS)),
        help="layers whose standard SAE the 'layers' stage (re)trains (default: %(default)s)",
    )
    args = ap.parse_args()
    known_stages = {"corpus", "tokenizer", "base", "prose", "code", "saes", "layers", "data"}
    if set(args.stages.split(",")) - known_stages:
        ap.error(f"unknown stage(s) {sorted(set(args.stages.split(',')) - known_stages)}; known: {sorted(known_stages)}")
    try:
        layers = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--layers must be comma-separated integers, got {args.layers!r}")
    if not set(layers) <= set(LAYER_SAE_LAYERS):
        ap.error(f"--layers must be a subset of {LAYER_SAE_LAYERS} (the blocks.1 SAEs are the 'saes' stage)")

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(SEED)
    np.random.seed(SEED)

    stages = set(args.stages.split(","))
    work: Path = args.work
    out: Path = args.out
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    summary: dict[str, Any] = json.loads((work / "summary.json").read_text()) if (work / "summary.json").exists() else {}

    # ---- corpus
    corpus_path = work / "corpus.json"
    if "corpus" in stages or not corpus_path.exists():
        corpus = build_corpus()
        corpus_path.write_text(json.dumps(corpus))
    corpus = json.loads(corpus_path.read_text())
    prose, code = corpus["prose"], corpus["code"]
    for kind, docs in (("prose", prose), ("code", code)):
        for sp in ("train", "ft", "eval"):
            sel = [d for d in docs if d["split"] == sp]
            log(f"corpus {kind}/{sp}: {len(sel)} docs, {sum(len(d['text']) for d in sel):,} chars")

    # ---- tokenizer
    tok_dir = out / "tokenizer"
    if "tokenizer" in stages or not (tok_dir / "tokenizer.json").exists():
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        train_tokenizer(corpus, tok_dir)
        log("tokenizer trained")
    tokenizer = load_tokenizer(tok_dir)
    bos = tokenizer.bos_token_id
    special_ids = sorted({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id})

    # ---- token sets
    tokens_path = work / "tokens.pt"
    if "tokenizer" in stages or "corpus" in stages or not tokens_path.exists():
        def rows_for(docs, sp, order_salt):
            sel = [d for d in docs if d["split"] == sp]
            sel.sort(key=lambda d: (bucket(d["id"], order_salt), d["id"]))
            return sel

        tk: dict[str, Any] = {}
        for name, docs, sp in (
            ("prose_train", prose, "train"),
            ("prose_ft", prose, "ft"),
            ("prose_eval", prose, "eval"),
            ("code_eval", code, "eval"),
        ):
            sel = rows_for(docs, sp, "order")
            ids = encode_docs(tokenizer, [d["text"] for d in sel])
            tk[name + "_docs"] = [d["id"] for d in sel]
            tk[name + "_ntok"] = [len(x) for x in ids]
            tk[name] = pack(ids, bos)
        code_train = rows_for(code, "train", "order") + rows_for(code, "ft", "order")
        code_train.sort(key=lambda d: (bucket(d["id"], "order"), d["id"]))
        tk["code_train"] = pack(encode_docs(tokenizer, [d["text"] for d in code_train]), bos)
        torch.save(tk, tokens_path)
    tk = torch.load(tokens_path)
    for k in ("prose_train", "prose_ft", "prose_eval", "code_train", "code_eval"):
        log(f"tokens {k}: {tuple(tk[k].shape)} = {tk[k].numel():,} tokens")

    # eval subsets used for the summary numbers (fixed, first rows in file order)
    ev_prose = tk["prose_eval"][:200]
    ev_code = tk["code_eval"][:200]
    eval_sets = {"prose": ev_prose, "code": ev_code}

    if args.probe:
        model = make_model(tokenizer)
        n = sum(p.numel() for p in model.parameters())
        log(f"params {n:,}")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for s in range(6):
            t0 = time.time()
            loss = model(tk["prose_train"][s * BATCH : (s + 1) * BATCH], return_type="loss")
            opt.zero_grad()
            loss.backward()
            opt.step()
            log(f"probe step {s}: {time.time() - t0:.2f}s loss {loss.item():.3f}")
        return

    models_dir = out / "models"

    def ckpt(name: str) -> Path:
        return models_dir / name / "model.safetensors"

    def load_ckpt(name: str):
        from safetensors.torch import load_file

        m = make_model(tokenizer, load_file(str(ckpt(name))))
        m.eval()
        return m

    trained_now: set[str] = set()

    # ---- toy-base
    if "base" in stages or not ckpt("toy-base").exists():
        trained_now.add("toy-base")
        model = make_model(tokenizer)
        summary.setdefault("loss", {})["toy-base"] = train_lm(
            model, tk["prose_train"], SCHEDULES["toy-base"], "toy-base", eval_sets, special_ids, SEED
        )
        save_model(model, "toy-base", models_dir / "toy-base")
    base = load_ckpt("toy-base")

    # ---- toy-prose
    if "prose" in stages or not ckpt("toy-prose").exists():
        trained_now.add("toy-prose")
        model = load_ckpt("toy-base")
        summary.setdefault("loss", {})["toy-prose"] = train_lm(
            model, tk["prose_ft"], SCHEDULES["toy-prose"], "toy-prose", eval_sets, special_ids, SEED + 1
        )
        save_model(model, "toy-prose", models_dir / "toy-prose")

    # ---- toy-code
    if "code" in stages or not ckpt("toy-code").exists():
        trained_now.add("toy-code")
        model = load_ckpt("toy-base")
        summary.setdefault("loss", {})["toy-code"] = train_lm(
            model, tk["code_train"], SCHEDULES["toy-code"], "toy-code", eval_sets, special_ids, SEED + 2
        )
        save_model(model, "toy-code", models_dir / "toy-code")

    # (re)measure losses on the stored weights
    finetunes = {n: load_ckpt(n) for n in ("toy-prose", "toy-code")}
    allm = {"toy-base": base, **finetunes}
    for n, m in allm.items():
        if n not in trained_now:  # models trained in this run were measured right after training
            summary.setdefault("loss", {})[n] = {k: loss_per_token(m, v, special_ids) for k, v in eval_sets.items()}
        summary["loss"][n] = {k: round(v, 4) for k, v in summary["loss"][n].items()}
    log(f"held-out losses {summary['loss']}")

    # ---- SAEs
    sae_root = out / "saes" / RELEASE
    if "saes" in stages or not (sae_root / SAE_STANDARD_ID / "cfg.json").exists():
        train_sae(base, tk["prose_train"], "standard", sae_root / SAE_STANDARD_ID, work, special_ids)
        train_sae(base, tk["prose_train"], "topk", sae_root / SAE_TOPK_ID, work, special_ids)

    # ---- layer family: the standard recipe at the other layers
    for layer in layers:
        hook = resid_hook(layer)
        if "layers" in stages or not (sae_root / hook / "cfg.json").exists():
            train_sae(base, tk["prose_train"], "standard", sae_root / hook, work, special_ids, hook=hook)

    from sae_lens import SAE

    ev_small = ev_prose[:200]
    clean_loss = {n: loss_per_token(m, ev_small, special_ids) for n, m in allm.items()}
    summary["sae"] = {}
    for sid, _arch, hook in SAE_FAMILY:
        if not (sae_root / sid / "cfg.json").exists():
            raise SystemExit(f"SAE {sid} is missing from {sae_root}; run its stage")
        sae = SAE.load_from_disk(str(sae_root / sid), device="cpu")
        sae.eval()
        assert sae.cfg.metadata.hook_name == hook, (sid, sae.cfg.metadata.hook_name)
        res: dict[str, Any] = {}
        for n, m in allm.items():
            st = sae_stats(sae, hook_acts(m, ev_small, special_ids, hook=hook))
            clean = clean_loss[n]
            spl = spliced_loss(m, sae, ev_small, special_ids, hook=hook)
            st.update(ce_loss_clean=clean, ce_loss_spliced=spl, ce_loss_delta=spl - clean)
            res[n] = {k: round(v, 4) for k, v in st.items()}
        summary["sae"][sid] = res
        log(f"SAE {sid}: {json.dumps(res)}")

    # ---- eval datasets
    ds_dir = out / "datasets"
    write_data = "data" in stages or not (ds_dir / f"{EVAL_DATASET}.jsonl").exists()
    ds_dir.mkdir(parents=True, exist_ok=True)
    byid_p = {d["id"]: d for d in prose}
    byid_c = {d["id"]: d for d in code}
    for fname, ids, ntoks, byid, cap in (
        (EVAL_DATASET, tk["prose_eval_docs"], tk["prose_eval_ntok"], byid_p, EVAL_PROSE_MAX_TOKENS),
        (EVAL_CODE_DATASET, tk["code_eval_docs"], tk["code_eval_ntok"], byid_c, EVAL_CODE_MAX_TOKENS),
    ):
        n = 0
        lines = []
        for i, nt in zip(ids, ntoks):
            if n >= cap:
                break
            lines.append(json.dumps({"text": byid[i]["text"]}, ensure_ascii=False) + "\n")
            n += nt + 1
        data = "".join(lines).encode("utf-8")
        path = ds_dir / f"{fname}.jsonl"
        if write_data:
            path.write_bytes(data)
            log(f"dataset {fname}: ~{n:,} tokens")
        else:
            same = path.is_file() and path.read_bytes() == data
            log(f"dataset {fname}: ~{n:,} tokens; kept the shipped file ({'byte-identical to' if same else 'DIFFERS from'} a rebuild)")
        summary.setdefault("datasets", {})[fname] = {"approx_tokens": n}

    summary["build_seconds_last_run"] = round(time.time() - t_start, 1)
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    write_manifest(out, summary, corpus, tk)
    log("done")


def write_manifest(out: Path, summary: dict[str, Any], corpus: dict[str, Any], tk: dict[str, Any]) -> None:
    import sae_lens
    import tokenizers
    import torch
    import transformer_lens

    def rel(p: Path) -> str:
        return p.relative_to(out).as_posix()

    models = {}
    for name in ("toy-base", "toy-code", "toy-prose"):
        d = out / "models" / name
        models[name] = {
            "dir": rel(d),
            "base_model": None if name == "toy-base" else "toy-base",
            "description": MODEL_DESCRIPTIONS[name],
            "files": {f.name: sha256_file(f) for f in sorted(d.iterdir())},
            "heldout_loss": summary["loss"][name],
            "train": SCHEDULES[name],
        }
    saes = {RELEASE: {}}
    for sid, arch, hook in SAE_FAMILY:
        d = out / "saes" / RELEASE / sid
        saes[RELEASE][sid] = {
            "dir": rel(d),
            "architecture": arch,
            "hook_name": hook,
            "default": sid == SAE_STANDARD_ID,
            "files": {f.name: sha256_file(f) for f in sorted(d.iterdir())},
            "metrics_heldout_prose": summary["sae"][sid],
        }
    dsets = {}
    for name, domain in ((EVAL_DATASET, "prose"), (EVAL_CODE_DATASET, "code")):
        f = out / "datasets" / f"{name}.jsonl"
        dsets[name] = {
            "file": rel(f),
            "domain": domain,
            "sha256": sha256_file(f),
            "approx_tokens": summary.get("datasets", {}).get(name, {}).get("approx_tokens"),
            "description": f"held-out stdlib {domain} documents (never used to train any zoo model, SAE or the tokenizer)",
        }
    tok_dir = out / "tokenizer"
    manifest = {
        "schema_version": 1,
        "build_seed": SEED,
        "build_script": "scripts/build_zoo.py",
        "built_with": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sae_lens": sae_lens.__version__,
            "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
            "tokenizers": tokenizers.__version__,
        },
        "context_size": CONTEXT,
        "tokenizer": {
            "dir": rel(tok_dir),
            "vocab_size": VOCAB_SIZE,
            "special_tokens": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
            "files": {f.name: sha256_file(f) for f in sorted(tok_dir.iterdir())},
        },
        "models": models,
        "saes": saes,
        "default_sae": {RELEASE: SAE_STANDARD_ID},
        "datasets": dsets,
        "corpus": {
            "n_stdlib_py_files": corpus["n_py_files"],
            "prose_docs": {sp: sum(1 for d in corpus["prose"] if d["split"] == sp) for sp in ("train", "ft", "eval")},
            "code_chunks": {sp: sum(1 for d in corpus["code"] if d["split"] == sp) for sp in ("train", "ft", "eval")},
            "tokens": {k: int(tk[k].numel()) for k in ("prose_train", "prose_ft", "prose_eval", "code_train", "code_eval")},
        },
        "summary": {
            "heldout_loss": summary["loss"],
            "log_vocab": round(math.log(VOCAB_SIZE), 4),
            "sae": summary["sae"],
            "build_seconds_last_run": summary.get("build_seconds_last_run"),
        },
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
