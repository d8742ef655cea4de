"""Tiny random-weight Hugging Face checkpoints of the study's architectures.

Gemma (GemmaForCausalLM, as google/gemma-2b), Mistral (MistralForCausalLM, as
mistralai/Mistral-7B-v0.1), GPT-2 and Gemma-2 (sliding-window layers, soft caps), at hidden size 64 with a real byte-level
BPE tokenizer trained here, written with ``save_pretrained`` like any hub
checkpoint. Finetunes are made by perturbing the weights, and by adding a
vocabulary row the way MetaMath-Mistral-7B added its PAD token.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

VOCAB = 512
HIDDEN = 64
LAYERS = 3
CTX = 128

_WORDS = (
    "the a of and to in is was for on that with as by it at from this be are or an which had not but "
    "model layer token sparse feature residual stream attention head vector matrix weight value query key "
    "python code def return import class self list dict string print loop while if else elif try except "
    "math number equation solve answer total each more than less sum product divide times plus minus "
    "river mountain city village road house garden tree flower bird water light night morning summer"
).split()


def corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text: sentences of common words, code-ish lines and numbers."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.3:
                words.append(str(rng.randint(0, 999)))
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", ":"]))
        docs.append(" ".join(sentences))
    return docs


def make_tokenizer(directory: Path, seed: int = 0, vocab_size: int = VOCAB) -> Any:
    """A byte-level BPE tokenizer with Gemma's special-token layout (<pad>=0, <eos>=1, <bos>=2, <unk>=3),
    saved with save_pretrained and reloaded from disk (TransformerLens needs name_or_path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(400, seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def _config(arch: str, vocab: int, tokenizer: Any, hidden: int = HIDDEN, layers: int = LAYERS) -> Any:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if arch == "gemma":
        from transformers import GemmaConfig

        return GemmaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=CTX,
            hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True, **ids,
        )
    if arch == "gemma2":
        from transformers import Gemma2Config

        return Gemma2Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=CTX,
            sliding_window=8, query_pre_attn_scalar=16, **ids,
        )
    if arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX, sliding_window=4096,
            rms_norm_eps=1e-5, tie_word_embeddings=False, **ids,
        )
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=CTX, **ids)
    raise ValueError(arch)


def make_model(arch: str, tokenizer: Any, seed: int = 0, vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = LAYERS) -> Any:
    """A random model; every parameter (norm gains included) gets noise so folding is exercised."""
    from transformers import AutoModelForCausalLM

    cfg = _config(arch, vocab, tokenizer, hidden, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm gains and biases: away from their init so fold_ln matters
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.normal_(0.0, 0.08, generator=gen)
    return model.eval()


def save(model: Any, tokenizer: Any, directory: Path) -> Path:
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def perturbed(model: Any, noise: float, seed: int = 1) -> Any:
    """A 'finetune': every parameter plus relative Gaussian noise."""
    import copy

    ft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return ft.eval()


def with_extra_row(model: Any, tokenizer_dir: Path, out_dir: Path, token: str = "<ft_pad>") -> Path:
    """MetaMath-style finetune: one new special token, embeddings resized by one row."""
    import copy

    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": [token]})
    ft = copy.deepcopy(model)
    ft.resize_token_embeddings(len(tok))
    with torch.no_grad():
        ft.get_input_embeddings().weight[-1].normal_(0.0, 0.08)
    ft.config.vocab_size = len(tok)
    return save(ft.eval(), tok, out_dir)


def write_dataset(path: Path, n_docs: int = 60, seed: int = 7) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for doc in corpus(n_docs, seed=seed):
            fh.write(json.dumps({"text": doc}) + "\n")
    return path


def make_sae_dir(directory: Path, d_in: int, hook_name: str, model_name: str, dataset: str, d_sae: int = 256,
                 context_size: int = 32, seed: int = 0, model_kwargs: dict | None = None) -> Path:
    """A random standard sae_lens SAE for ``hook_name``, saved with sae.save_model."""
    from sae_lens import SAE

    cfg = {
        "architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "metadata": {
            "hook_name": hook_name, "context_size": context_size, "prepend_bos": True, "model_name": model_name,
            "dataset_path": dataset, "model_from_pretrained_kwargs": model_kwargs or {},
        },
    }
    torch.manual_seed(seed)
    sae = SAE.from_dict(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc) / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T.clone() / d_in**0.5)
        sae.b_enc.fill_(-0.5)
    directory = Path(directory)
    sae.save_model(str(directory))
    return directory

#: ``HookedTransformer.from_pretrained``'s defaults, for reference (not used by default).
FROM_PRETRAINED_PROCESSING: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}


#: The study's two systems (seed/sae-transfer-blog-post.md) and what their SAEs are.
#: The registry (sae_lens/pretrained_saes.yaml, installed with sae_lens) holds the model,
#: repo, folder, expected L0/variance explained and config overrides offline, but not
#: d_in, d_sae, context size or dataset: those live in each SAE's cfg.json on the hub.
#: The values below are copied from SAELens's generated table of those cfg.json files,
#: docs/sae_table.md in jbloomAus/SAELens ("gemma-2b-res-jb" and "mistral-7b-res-wg"
#: sections), and agree with the study's table (16384 / 65536 features) and its datasets
#: (FineWeb for Gemma-2b, monology/pile-uncopyrighted for Mistral-7B). d_in is the
#: models' hidden size (google/gemma-2b and mistralai/Mistral-7B-v0.1 config.json).
STUDY_PAIRS: dict[str, dict[str, Any]] = {
    "gemma-2b": {
        "release": "gemma-2b-res-jb",
        "sae_id": "blocks.6.hook_resid_post",
        "model": "gemma-2b",
        "hf_model": "google/gemma-2b",
        "finetune": "shahdishank/gemma-2b-it-finetune-python-codes",
        "hook_name": "blocks.6.hook_resid_post",
        "d_in": 2048,
        "d_sae": 16384,
        "context_size": 1024,
        "dataset_path": "HuggingFaceFW/fineweb",
        "n_layers": 18,
        "d_vocab": 256000,
        "n_params": 2.51e9,
        "outlier_norm_study": 290.0,
    },
    "mistral-7b": {
        "release": "mistral-7b-res-wg",
        "sae_id": "blocks.8.hook_resid_pre",
        "model": "mistral-7b",
        "hf_model": "mistralai/Mistral-7B-v0.1",
        "finetune": "meta-math/MetaMath-Mistral-7B",
        "hook_name": "blocks.8.hook_resid_pre",
        "d_in": 4096,
        "d_sae": 65536,
        "context_size": 256,
        "dataset_path": "monology/pile-uncopyrighted",
        "n_layers": 32,
        "d_vocab": 32000,
        "n_params": 7.24e9,
        "outlier_norm_study": 200.0,
    },
}

