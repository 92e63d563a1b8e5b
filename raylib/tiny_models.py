"""Tiny random-weight models of the architectures users bring, from transformers' own config
classes, so every method can be tried on each family's real layer layout without a hub.

`build_family("phi3", out_dir)` writes a 2-layer model (config.json + safetensors, via
`save_pretrained`) and the project's BPE tokenizer (`raylib.models.build_tokenizer`), which a
job then loads through the ordinary `from_pretrained` path like any downloaded checkpoint.

What differs between the families is what the methods trip over: fused projections (Phi-3's
qkv_proj/gate_up_proj, GPT-NeoX's query_key_value), GPT-2's Conv1D layers (weights stored
transposed), attention biases (Qwen2), q/k norms (Qwen3), sliding windows (Mistral, Gemma2),
logit soft-capping and tied embeddings (Gemma2, GPT-2). The sizes are the smallest that keep
those features: every Linear/Conv1D dimension is a multiple of 64, so on AVX512-BF16 CPUs
their 4-bit layers fit bitsandbytes' packed CPU kernel (the tiny pretrained Llama's MLP does
not: between them, both of bitsandbytes' CPU paths are exercised), and the attention uses 4 query heads over 2 key/value heads wherever the family has GQA. The sliding
windows (32 tokens) are shorter than the training sequences, so windowed masks are exercised.

The weights stay random (no pretraining): these models test that methods run, learn something
and reload exactly on each layout, not what they learn (`models.build_tiny` is the pretrained
Llama for that).
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

RECIPE = 1  # bump when sizes or the tokenizer change (invalidates existing builds)
VOCAB = 512

_GQA = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}

#: family -> (transformers config class, its kwargs). Every family has 2 decoder layers.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {**_GQA, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {**_GQA, "tie_word_embeddings": False}),  # q/k/v with bias
    "qwen3": ("Qwen3Config", {**_GQA, "tie_word_embeddings": True}),  # q_norm/k_norm per head
    "mistral": ("MistralConfig", {**_GQA, "sliding_window": 32, "tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", {**_GQA, "sliding_window": 32, "query_pre_attn_scalar": 32,
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                "tie_word_embeddings": True}),
    # Phi-3 derives head_dim from hidden/heads: 2 heads of 32 over 1 KV head -> qkv_proj 64 -> 128
    "phi3": ("Phi3Config", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                            "num_key_value_heads": 1, "tie_word_embeddings": False}),
    # Conv1D: c_attn 64 -> 192, c_fc 64 -> 128, c_proj 128 -> 64 / 64 -> 64
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_inner": 128, "n_head": 2, "n_layer": 2, "n_positions": 512}),
    # one fused query_key_value (64 -> 192), MLP dense_h_to_4h / dense_4h_to_h, partial rotary
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                                   "tie_word_embeddings": False}),
}


def tiny_config(family: str, tokenizer):
    """The family's real config class at tiny sizes, with the tokenizer's vocab and specials."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    cls_name, kwargs = FAMILIES[family]
    specials = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    layers = {} if family == "gpt2" else {"num_hidden_layers": 2, "max_position_embeddings": 512}
    return getattr(transformers, cls_name)(vocab_size=len(tokenizer), **layers, **kwargs, **specials)


def build_family(family: str, out_dir: str, seed: int = 0, overwrite: bool = False) -> str:
    """Build and save a tiny random model of `family` + the project tokenizer to `out_dir`.
    Idempotent (an existing build with the same recipe is reused) and safe to call from
    concurrent processes (a file lock; the others wait and reuse)."""
    from filelock import FileLock

    settings = {"family": family, "seed": seed, "recipe": RECIPE, "config": FAMILIES[family][1]}
    marker = os.path.join(out_dir, "raylib_tiny.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    with FileLock(os.path.abspath(out_dir) + ".lock"):
        if not overwrite and os.path.isfile(marker):
            with open(marker) as f:
                if json.load(f) == settings:
                    return out_dir
        return _build(family, out_dir, seed, settings, marker)


def _build(family: str, out_dir: str, seed: int, settings: dict, marker: str) -> str:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from raylib.models import build_tokenizer
    from raylib.noise import quiet_libraries
    from raylib.synthetic import tokenizer_corpus

    tok = build_tokenizer(tokenizer_corpus(seed=seed), VOCAB)
    cfg = tiny_config(family, tok)
    quiet_libraries("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    with open(marker, "w") as f:
        json.dump(settings, f)
    log.info("built tiny %s (%d params) at %s", family, sum(p.numel() for p in model.parameters()), out_dir)
    return out_dir
