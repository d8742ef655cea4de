"""Tests that the bundled toy zoo is real: the tokenizer is lossless, the models
learned their domains, the finetunes differ from the base the way they should,
the base SAE reconstructs the base, and everything loads offline.

No mocks: every number is measured on the shipped artefacts (a few thousand
held-out tokens per check, so the module runs in well under a minute on CPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_sae_transfer import zoo

CONTEXT = 128
N_CONTEXTS = 24  # 24 x 128 = 3,072 tokens per domain
HOOK = "blocks.1.hook_resid_post"
STANDARD_ID = HOOK
TOPK_ID = HOOK + "-topk"
# The layer family: a standard SAE (the blocks.1 standard recipe) at every other layer.
LAYER_IDS = {layer: f"blocks.{layer}.hook_resid_post" for layer in (0, 2, 3)}
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    import torch as _torch

    _torch.manual_seed(0)
    return _torch


@pytest.fixture(scope="module")
def tokenizer():
    return zoo.load_tokenizer()


@pytest.fixture(scope="module")
def special_ids(tokenizer):
    return sorted({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id})


def _read_texts(name: str, limit: int | None = None) -> list[str]:
    out = []
    with open(zoo.dataset_path(name), encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if limit is not None and len(out) >= limit:
                break
    return out


def _pack(torch, tokenizer, texts: list[str], n_contexts: int):
    """Pack documents the way sae_lens's ActivationsStore does: BOS at the start of
    every context, documents separated by BOS."""
    bos = tokenizer.bos_token_id
    rows, cur = [], [bos]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(cur) > 1:
            ids = [bos] + ids
        while ids:
            room = CONTEXT - len(cur)
            cur += ids[:room]
            ids = ids[room:]
            if len(cur) == CONTEXT:
                rows.append(cur)
                if len(rows) == n_contexts:
                    return torch.tensor(rows)
                cur = [bos]
    raise AssertionError(f"not enough text for {n_contexts} contexts")


@pytest.fixture(scope="module")
def eval_tokens(torch, tokenizer):
    return {
        "prose": _pack(torch, tokenizer, _read_texts("toy-eval", 200), N_CONTEXTS),
        "code": _pack(torch, tokenizer, _read_texts("toy-eval-code", 200), N_CONTEXTS),
    }


@pytest.fixture(scope="module")
def models():
    return {name: zoo.load_model(name) for name in zoo.model_names()}


def _ce_loss(torch, model, tokens, special_ids, fwd_hooks=()) -> float:
    """Mean next-token CE over positions whose input token is not special."""
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=list(fwd_hooks))
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    keep = ~torch.isin(tokens[:, :-1], torch.tensor(special_ids))
    return float(nll[keep].mean())


@pytest.fixture(scope="module")
def losses(torch, models, eval_tokens, special_ids):
    return {
        (name, domain): _ce_loss(torch, m, eval_tokens[domain], special_ids)
        for name, m in models.items()
        for domain in ("prose", "code")
    }


def _acts(torch, model, tokens, special_ids, hook=HOOK):
    layer = int(hook.split(".")[1])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=layer + 1)
    keep = ~torch.isin(tokens, torch.tensor(special_ids))
    return cache[hook][keep]


def _sae_metrics(torch, sae, x):
    with torch.no_grad():
        f = sae.encode(x)
        xh = sae.decode(f)
    x64, xh64 = x.double(), xh.double()
    ev = 1 - ((x64 - xh64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()
    l0 = (f != 0).float().sum(-1).mean()
    return float(ev), float(l0)


def _spliced_ce_delta(torch, model, sae, tokens, special_ids, hook) -> float:
    """CE with the SAE's reconstruction spliced in at ``hook`` (special positions
    left alone) minus the clean CE."""
    keep = ~torch.isin(tokens, torch.tensor(special_ids))

    def splice(act, hook=None):
        return torch.where(keep[..., None], sae.decode(sae.encode(act)), act)

    clean = _ce_loss(torch, model, tokens, special_ids)
    return _ce_loss(torch, model, tokens, special_ids, fwd_hooks=[(hook, splice)]) - clean


@pytest.fixture(scope="module")
def saes():
    from sae_lens import SAE

    return {sid: SAE.load_from_disk(str(zoo.sae_dir("toy-res", sid)), device="cpu") for sid in zoo.sae_ids("toy-res")}


# --------------------------------------------------------------------------
# API and manifest
# --------------------------------------------------------------------------


def test_api_names():
    assert zoo.model_names() == ["toy-base", "toy-code", "toy-prose"]
    assert zoo.release_names() == ["toy-res"]
    assert zoo.dataset_names() == ["toy-eval", "toy-eval-code"]
    assert zoo.sae_ids("toy-res") == sorted([STANDARD_ID, TOPK_ID, *LAYER_IDS.values()])
    assert zoo.manifest()["default_sae"] == {"toy-res": STANDARD_ID}
    assert zoo.sae_dir("toy-res") == zoo.sae_dir("toy-res", STANDARD_ID)
    assert all(zoo.is_zoo_model(n) for n in zoo.model_names())
    assert not zoo.is_zoo_model("gpt2") and not zoo.is_zoo_release("gemma-scope") and not zoo.is_zoo_dataset("pile")
    for path in [zoo.dataset_path(n) for n in zoo.dataset_names()] + [zoo.tokenizer_dir()]:
        assert path.exists() and path.is_relative_to(zoo.ZOO_DIR)
    for name in zoo.model_names():
        files = zoo.model_files(name)
        assert files and all(p.is_file() for p in files)
        assert any(p.name == "model.safetensors" for p in files)


@pytest.mark.parametrize(
    "call",
    [
        lambda: zoo.load_model("toy-nope"),
        lambda: zoo.model_files("gpt2"),
        lambda: zoo.sae_ids("gemma-scope"),
        lambda: zoo.sae_dir("toy-res", "blocks.9.hook_resid_post"),
        lambda: zoo.dataset_path("pile"),
    ],
)
def test_unknown_names_raise_keyerror_listing_valid_names(call):
    with pytest.raises(KeyError) as exc:
        call()
    msg = str(exc.value)
    assert "valid" in msg and ("toy-" in msg or "blocks.1" in msg)


def test_manifest_hashes_match_files():
    m = zoo.manifest()
    for name, entry in m["models"].items():
        for fname, digest in entry["files"].items():
            assert hashlib.sha256((zoo.ZOO_DIR / entry["dir"] / fname).read_bytes()).hexdigest() == digest, (name, fname)
    for release in m["saes"].values():
        for sid, entry in release.items():
            for fname, digest in entry["files"].items():
                assert hashlib.sha256((zoo.ZOO_DIR / entry["dir"] / fname).read_bytes()).hexdigest() == digest, (sid, fname)
    for name, entry in m["datasets"].items():
        assert hashlib.sha256(zoo.dataset_path(name).read_bytes()).hexdigest() == entry["sha256"], name
    assert m["models"]["toy-base"]["base_model"] is None
    assert m["models"]["toy-code"]["base_model"] == m["models"]["toy-prose"]["base_model"] == "toy-base"


def test_zoo_data_is_small():
    total = sum(p.stat().st_size for p in zoo.ZOO_DIR.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024, f"zoo data is {total / 2**20:.1f} MiB"


def test_import_is_light():
    """Importing the zoo module itself must not pull in torch/transformers."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("zoo_light", {str(Path(zoo.__file__))!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.model_names() == ["toy-base", "toy-code", "toy-prose"]
        heavy = [m for m in ("torch", "transformers", "transformer_lens", "sae_lens") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------

ROUNDTRIP_SAMPLES = [
    "Return the sum of a and b.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines\n",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "unicode: café, naïve, Ærø, Ελληνικά, 日本語, emoji 🐍🚀, math ∑ ∫ ≤",
    "",
    " ",
    "\x00\x01 control chars and \u200b zero-width",
    "<bos> looks special but is plain text",
]


@pytest.mark.parametrize("text", ROUNDTRIP_SAMPLES)
def test_tokenizer_roundtrip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_roundtrip_eval_documents(tokenizer):
    texts = _read_texts("toy-eval", 40) + _read_texts("toy-eval-code", 40)
    for text in texts:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_special_tokens_and_vocab(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "right"
    assert len(tokenizer) == 4096
    # it is a real BPE, not bytes: ordinary prose compresses well
    text = " ".join(_read_texts("toy-eval", 20))
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(text) / n > 2.5


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


def test_models_are_hooked_transformers(models, tokenizer):
    from transformer_lens import HookedTransformer

    for name, m in models.items():
        assert isinstance(m, HookedTransformer)
        assert m.cfg.n_ctx == CONTEXT and m.cfg.d_vocab == len(tokenizer)
        assert not m.training
        assert m.tokenizer.bos_token_id == tokenizer.bos_token_id
        assert next(m.parameters()).dtype.is_floating_point


def test_models_differ(torch, models):
    base = {k: v.detach() for k, v in models["toy-base"].named_parameters()}
    rel = {}
    for name in ("toy-prose", "toy-code"):
        ft = {k: v.detach() for k, v in models[name].named_parameters()}
        num = sum(float((ft[k] - base[k]).double().pow(2).sum()) for k in base)
        den = sum(float(base[k].double().pow(2).sum()) for k in base)
        rel[name] = math.sqrt(num / den)
    assert 0 < rel["toy-prose"] < rel["toy-code"], rel


def test_load_model_dtype(torch):
    m = zoo.load_model("toy-base", dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16
    m32 = zoo.load_model("toy-base", dtype=torch.float32)
    assert next(m32.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name,domain", [("toy-base", "prose"), ("toy-prose", "prose"), ("toy-code", "code")])
def test_heldout_loss_far_below_uniform(losses, tokenizer, name, domain):
    assert losses[(name, domain)] < 0.7 * math.log(len(tokenizer)), losses


def test_code_finetune_is_clearly_better_on_code(losses):
    assert losses[("toy-code", "code")] < losses[("toy-base", "code")] - 0.3, losses


def test_prose_finetune_is_no_worse_on_prose(losses):
    assert losses[("toy-prose", "prose")] <= losses[("toy-base", "prose")] + 0.02, losses


def test_base_is_better_on_prose_than_on_code(losses):
    assert losses[("toy-base", "prose")] < losses[("toy-base", "code")], losses


# --------------------------------------------------------------------------
# SAEs
# --------------------------------------------------------------------------


def test_standard_sae_reconstructs_base(torch, models, eval_tokens, special_ids, saes):
    x = _acts(torch, models["toy-base"], eval_tokens["prose"], special_ids)
    ev, l0 = _sae_metrics(torch, saes[STANDARD_ID], x)
    # Measured 0.816 on this sample (0.833 with the engine's masking, at L0 ~ 49, and
    # ~98% of the CE that zero ablation loses recovered). The TopK SAE below: 0.853.
    assert ev >= 0.78, ev
    assert 5 <= l0 <= 80, l0


def test_topk_sae_reconstructs_base(torch, models, eval_tokens, special_ids, saes):
    x = _acts(torch, models["toy-base"], eval_tokens["prose"], special_ids)
    ev, l0 = _sae_metrics(torch, saes[TOPK_ID], x)
    assert l0 <= 16 + 1e-6, l0
    assert ev >= 0.8, ev


def test_base_sae_transfers_to_prose_but_not_code(torch, models, eval_tokens, special_ids, saes):
    """The point of the zoo: on held-out prose, the base SAE still works on the mild
    finetune and clearly does not on the heavy code finetune."""
    sae = saes[STANDARD_ID]
    ev = {
        n: _sae_metrics(torch, sae, _acts(torch, models[n], eval_tokens["prose"], special_ids))[0]
        for n in ("toy-base", "toy-prose", "toy-code")
    }
    assert ev["toy-prose"] >= ev["toy-base"] - 0.05, ev
    assert ev["toy-code"] <= ev["toy-prose"] - 0.3, ev  # measured 0.41 vs 0.83


def test_sae_cfg_metadata():
    from sae_lens import SAE

    for sid, arch in ((STANDARD_ID, "standard"), (TOPK_ID, "topk")):
        d = zoo.sae_dir("toy-res", sid)
        assert {p.name for p in d.iterdir()} >= {"cfg.json", "sae_weights.safetensors"}
        cfg = json.loads((d / "cfg.json").read_text())
        md = cfg["metadata"]
        assert cfg["architecture"] == arch
        assert cfg["d_in"] == 128 and cfg["d_sae"] == 1024
        assert md["hook_name"] == HOOK
        assert md["context_size"] == CONTEXT
        assert md["prepend_bos"] is True
        assert md["model_name"] == "toy-base"
        assert md["dataset_path"] == "toy-eval"
        assert md["model_from_pretrained_kwargs"] == {}
        if arch == "topk":
            assert cfg["k"] == 16
        sae = SAE.load_from_disk(str(d), device="cpu")
        assert sae.cfg.architecture() == arch
        assert sae.cfg.metadata.hook_name == HOOK
        assert sae.cfg.metadata.dataset_path == "toy-eval"
        assert sae.W_enc.dtype.is_floating_point and sae.W_enc.dtype.itemsize == 4


# --------------------------------------------------------------------------
# the layer family: a standard SAE at every layer
# --------------------------------------------------------------------------


def test_every_layer_has_an_sae(models):
    n_layers = models["toy-base"].cfg.n_layers
    hooks = {zoo.manifest()["saes"]["toy-res"][sid]["hook_name"] for sid in zoo.sae_ids("toy-res")}
    assert hooks == {f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)}


@pytest.mark.parametrize("layer", sorted(LAYER_IDS))
def test_layer_sae_loads_at_its_hook(models, layer):
    sid = LAYER_IDS[layer]
    sae = zoo.load_sae("toy-res", sid)
    assert sae.cfg.metadata.hook_name == sid
    assert sid in models["toy-base"].hook_dict
    assert sae.cfg.architecture() == "standard"
    assert sae.cfg.d_in == models["toy-base"].cfg.d_model and sae.cfg.d_sae == 1024
    assert sae.cfg.metadata.model_name == "toy-base"
    assert sae.W_enc.dtype.is_floating_point and sae.W_enc.dtype.itemsize == 4
    assert zoo.sae_dir("toy-res", sid).name == sid
    entry = zoo.manifest()["saes"]["toy-res"][sid]
    assert entry["hook_name"] == sid and entry["architecture"] == "standard" and entry["default"] is False
    assert set(entry["metrics_heldout_prose"]) == {"toy-base", "toy-prose", "toy-code"}


@pytest.mark.parametrize("layer", sorted(LAYER_IDS))
def test_layer_sae_shares_the_standard_recipe(layer):
    """Same stored config as the blocks.1 standard SAE (architecture, sizes, L1,
    normalisation, metadata) except for the hook and the training-end statistics."""
    def cfg(sid):
        c = json.loads((zoo.sae_dir("toy-res", sid) / "cfg.json").read_text())
        for key in ("hook_name", "l0", "num_dead_features"):
            c["metadata"].pop(key)
        return c

    assert cfg(LAYER_IDS[layer]) == cfg(STANDARD_ID)


# Measured on toy-base with this module's 3,072-token sample of toy-eval
# (EV / L0 / spliced CE delta; the blocks.1 standard SAE gives 0.816 / 49.3 / 0.082):
#   blocks.0  0.827 / 60.5 / 0.101
#   blocks.2  0.813 / 43.6 / 0.052
#   blocks.3  0.814 / 41.3 / 0.062
# zoo.json's numbers (25,600 tokens): 0.838 / 59.9 / 0.087, 0.832 / 43.4 / 0.068, 0.836 / 42.0 / 0.094.
LAYER_FLOORS = {0: (0.79, 0.13), 2: (0.78, 0.08), 3: (0.78, 0.09)}  # (min EV, max CE delta)


@pytest.mark.parametrize("layer", sorted(LAYER_IDS))
def test_layer_sae_reconstructs_base(torch, models, eval_tokens, special_ids, layer):
    sid = LAYER_IDS[layer]
    sae = zoo.load_sae("toy-res", sid)
    x = _acts(torch, models["toy-base"], eval_tokens["prose"], special_ids, hook=sid)
    ev, l0 = _sae_metrics(torch, sae, x)
    delta = _spliced_ce_delta(torch, models["toy-base"], sae, eval_tokens["prose"], special_ids, sid)
    min_ev, max_delta = LAYER_FLOORS[layer]
    assert ev >= min_ev, ev
    assert 5 <= l0 <= 80, l0
    assert 0 <= delta <= max_delta, delta


def test_layer_family_transfers_to_prose_and_code_breaks_deeper(torch, models, eval_tokens, special_ids):
    """At every layer the base SAE still works on the mild prose finetune and not on
    the heavy code finetune; on code the spliced CE penalty grows with depth.
    Measured (EV base / prose / code; code CE delta):
      blocks.0  0.827 / 0.840 /  0.444; 0.201
      blocks.1  0.816 / 0.834 /  0.410; 0.336
      blocks.2  0.813 / 0.847 / -0.172; 0.570
      blocks.3  0.814 / 0.850 / -0.899; 1.080"""
    code_delta = []
    for layer in range(4):
        sid = f"blocks.{layer}.hook_resid_post"
        sae = zoo.load_sae("toy-res", sid)
        ev = {
            n: _sae_metrics(torch, sae, _acts(torch, models[n], eval_tokens["prose"], special_ids, hook=sid))[0]
            for n in ("toy-base", "toy-prose", "toy-code")
        }
        assert ev["toy-prose"] >= ev["toy-base"] - 0.05, (sid, ev)
        assert ev["toy-code"] <= ev["toy-prose"] - 0.3, (sid, ev)
        code_delta.append(_spliced_ce_delta(torch, models["toy-code"], sae, eval_tokens["prose"], special_ids, sid))
    assert all(a < b for a, b in zip(code_delta, code_delta[1:])), code_delta


# --------------------------------------------------------------------------
# offline
# --------------------------------------------------------------------------

OFFLINE_SCRIPT = r"""
import socket, sys

class NetworkBlocked(RuntimeError):
    pass

def _blocked(*a, **k):
    raise NetworkBlocked(f"network access attempted: {a!r}")

socket.socket.connect = _blocked
socket.socket.connect_ex = _blocked
socket.create_connection = _blocked
socket.getaddrinfo = _blocked

import torch
from sae_lens import SAE
from pytest_sae_transfer import zoo

tok = zoo.load_tokenizer()
assert tok.bos_token_id == 0
toks = torch.tensor([[tok.bos_token_id] + tok("Return the number of items.", add_special_tokens=False)["input_ids"]])
for name in zoo.model_names():
    m = zoo.load_model(name)
    out = m(toks)
    assert torch.isfinite(out).all(), name
for release in zoo.release_names():
    for sid in zoo.sae_ids(release):
        sae = SAE.load_from_disk(str(zoo.sae_dir(release, sid)), device="cpu")
        assert torch.isfinite(sae.decode(sae.encode(torch.randn(4, sae.cfg.d_in)))).all()
for name in zoo.dataset_names():
    with open(zoo.dataset_path(name), encoding="utf-8") as f:
        assert f.readline().startswith("{")
print("ZOO-OFFLINE-OK")
"""


def test_everything_loads_offline(tmp_path):
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        # an empty cache: nothing can come from a previously downloaded hub file
        HF_HOME=str(tmp_path / "hf-home"),
        HF_ENDPOINT="http://127.0.0.1:9",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ZOO-OFFLINE-OK" in proc.stdout
