"""Tiny local checkpoints, SAEs, datasets and threshold files for the reliability suite.

Built once per test session (see conftest.py) with tests/hf_tiny.py: a GPT-2 base of
width 32 and 2 layers, finetunes of it (healthy, overflowing, other width, other
architecture, other tokenizer, pickle-only, remote-code), SAEs (healthy, wrong width,
hook too deep, hostile configs) and small JSONL datasets.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

HIDDEN = 32
LAYERS = 2
CONTEXT = 16
HOOK = "blocks.1.hook_resid_post"
#: Tokens per run: 16 contexts of 16, two batches at the default batch size 8.
TOKENS = 256

MARKER_NAME = "PWNED"


def _hf_tiny() -> Any:
    here = Path(__file__).resolve().parent.parent
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    import hf_tiny

    return hf_tiny


def build(root: Path) -> dict[str, Any]:
    """Write every fixture under ``root``; returns {name: path-as-str} plus a few facts."""
    import torch

    h = _hf_tiny()
    root = Path(root)
    fx: dict[str, Any] = {"root": str(root)}

    tok = h.make_tokenizer(root / "tok")
    base = h.make_model("gpt2", tok, hidden=HIDDEN, layers=LAYERS)
    fx["base"] = str(h.save(base, tok, root / "base"))
    fx["ft"] = str(h.save(h.perturbed(base, 0.02, seed=1), tok, root / "ft"))
    fx["ft2"] = str(h.save(h.perturbed(base, 0.05, seed=2), tok, root / "ft2"))

    # Datasets. The main one has empty rows mixed in: they are skipped and counted.
    docs = h.corpus(60, seed=7)
    rows = []
    for i, doc in enumerate(docs):
        if i < 2:
            rows.append({"text": ""})  # early, so that the few rows a small run reads include them
        rows.append({"text": doc})
    fx["n_empty_rows"] = sum(1 for r in rows if not r["text"])
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    fx["data"] = str(data)
    small = root / "small.jsonl"
    small.write_text(json.dumps({"text": "the model"}) + "\n" + json.dumps({"text": "a layer"}) + "\n", encoding="utf-8")
    fx["small"] = str(small)
    fx["small_tokens"] = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("the model", "a layer"))
    fx["data_tokens"] = sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in rows if r["text"])
    empty = root / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": ""}) + "\n", encoding="utf-8")
    fx["empty"] = str(empty)
    nothing = root / "nothing.jsonl"
    nothing.write_text("", encoding="utf-8")
    fx["nothing"] = str(nothing)
    special = root / "special.jsonl"
    special.write_text("".join(json.dumps({"text": "<eos><pad><bos>" * 4}) + "\n" for _ in range(40)), encoding="utf-8")
    fx["special"] = str(special)

    # SAEs on the base's residual stream.
    fx["sae"] = str(h.make_sae_dir(root / "sae", d_in=HIDDEN, hook_name=HOOK, model_name=fx["base"], dataset=fx["data"],
                                   d_sae=64, context_size=CONTEXT))
    fx["sae_wide"] = str(h.make_sae_dir(root / "sae_wide", d_in=HIDDEN + 16, hook_name=HOOK, model_name=fx["base"],
                                        dataset=fx["data"], d_sae=64, context_size=CONTEXT))
    fx["sae_deep"] = str(h.make_sae_dir(root / "sae_deep", d_in=HIDDEN, hook_name=f"blocks.{LAYERS + 4}.hook_resid_post",
                                        model_name=fx["base"], dataset=fx["data"], d_sae=64, context_size=CONTEXT))
    cfg = json.loads((root / "sae" / "cfg.json").read_text())
    hostile = {
        # 64 x 5e6 float32 would be 1.3 GB per matrix: must be refused before allocating.
        "huge": {"d_sae": 5_000_000},
        "negative": {"d_in": -32},
        "zero": {"d_sae": 0},
        "text": {"d_sae": "64"},
    }
    for name, change in hostile.items():
        d = root / f"sae_{name}"
        shutil.copytree(root / "sae", d)
        (d / "cfg.json").write_text(json.dumps({**cfg, **change}), encoding="utf-8")
        fx[f"sae_{name}"] = str(d)

    # Finetunes that must be refused.
    fx["ft_wide"] = str(h.save(h.make_model("gpt2", tok, hidden=HIDDEN + 16, layers=LAYERS), tok, root / "ft_wide"))
    fx["ft_arch"] = str(h.save(h.make_model("mistral", tok, hidden=HIDDEN, layers=LAYERS), tok, root / "ft_arch"))
    other_tok = h.make_tokenizer(root / "tok_other", seed=5, vocab_size=300)
    ft_tok = h.perturbed(base, 0.02, seed=1)
    fx["ft_tok"] = str(h.save(ft_tok, other_tok, root / "ft_tok"))

    # A finetune whose weights overflow: a few embedding rows for common tokens are huge,
    # so LayerNorm's variance overflows float32 and NaN reaches the hook.
    ft_nan = h.perturbed(base, 0.02, seed=1)
    ids = tok(" ".join(docs[:20]), add_special_tokens=False)["input_ids"]
    counts: dict[int, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    # moderately common tokens: present, but not in every context
    ranked = sorted(counts, key=lambda i: -counts[i])
    bad = ranked[len(ranked) // 3 : len(ranked) // 3 + 2]
    with torch.no_grad():
        ft_nan.get_input_embeddings().weight[bad] = 3e38
    fx["ft_nan"] = str(h.save(ft_nan, tok, root / "ft_nan"))
    fx["nan_ids"] = bad

    # A pickle-only checkpoint whose pytorch_model.bin runs code when unpickled.
    evil = root / "ft_pickle"
    h.save(h.perturbed(base, 0.02, seed=1), tok, evil)
    for f in evil.glob("*.safetensors"):
        f.unlink()
    marker = root / f"{MARKER_NAME}-pickle"
    (evil / "pytorch_model.bin").write_bytes(_evil_pickle(marker))
    fx["ft_pickle"] = str(evil)
    fx["pickle_marker"] = str(marker)

    # A checkpoint whose config points at custom code (auto_map) that would leave a marker.
    remote = root / "ft_remote"
    h.save(h.perturbed(base, 0.02, seed=1), tok, remote)
    marker = root / f"{MARKER_NAME}-remote"
    conf = json.loads((remote / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "evil_config.EvilConfig", "AutoModelForCausalLM": "evil_config.EvilModel"}
    (remote / "config.json").write_text(json.dumps(conf), encoding="utf-8")
    (remote / "evil_config.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class EvilConfig(GPT2Config):\n    pass\n"
        "class EvilModel(GPT2LMHeadModel):\n    config_class = EvilConfig\n",
        encoding="utf-8",
    )
    fx["ft_remote"] = str(remote)
    fx["remote_marker"] = str(marker)

    # Threshold profiles: a lenient one that passes (so exit 0 is reachable), and hostile/malformed ones.
    profiles = root / "profiles"
    profiles.mkdir()
    (profiles / "lenient.toml").write_text(
        '[profile]\ndescription = "reliability suite: only the non-finite checks"\n\n'
        "[base.nonfinite_fraction]\nmax = 0\n\n[finetune.nonfinite_fraction]\nmax = 0\n\n"
        "[finetune.ce_loss_delta]\nmax = 100\n",
        encoding="utf-8",
    )
    fx["lenient"] = str(profiles / "lenient.toml")
    return fx


def _evil_pickle(marker: Path) -> bytes:
    import os
    import pickle

    class Payload:
        def __reduce__(self):  # noqa: D105 - runs `touch marker` when unpickled
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"transformer.wte.weight": Payload()}, protocol=2)
