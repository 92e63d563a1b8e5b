"""Tiny models raylib builds itself, so tests and the demo need no hub.

`build_tiny` makes a small Llama-style model and a BPE tokenizer trained with the
`tokenizers` library on the project's synthetic tasks, pretrained briefly with raylib's own
loop (`build_instruct_tiny`: the instruct base). The rest of this module: tiny random-weight
models of the architectures users bring, from transformers' own config classes, so every
method can be tried on each family's real layer layout.

`build_family("phi3", out_dir)` writes a 2-layer model (config.json + safetensors, via
`save_pretrained`) and the project's BPE tokenizer (`build_tokenizer`), which a
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
and reload exactly on each layout, not what they learn (`build_tiny` is the pretrained
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

#: encoders (model.family: encoder): 2 layers of 64, trained as sequence classifiers
ENCODER_FAMILIES: dict[str, tuple[str, dict]] = {
    "bert": ("BertConfig", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}),
    "roberta": ("RobertaConfig", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}),
    "deberta_v2": ("DebertaV2Config", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                                       "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                                       "max_relative_positions": 64}),
}

#: encoder-decoders (model.family: seq2seq): 2 encoder and 2 decoder layers of 64
SEQ2SEQ_FAMILIES: dict[str, tuple[str, dict]] = {
    "t5": ("T5Config", {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2,
                        "num_decoder_layers": 2, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}),
    "bart": ("BartConfig", {"d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_layers": 2,
                            "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                            "max_position_embeddings": 512}),
}

ALL_FAMILIES = {**FAMILIES, **ENCODER_FAMILIES, **SEQ2SEQ_FAMILIES}


def tiny_config(family: str, tokenizer):
    """The family's real config class at tiny sizes, with the tokenizer's vocab and specials."""
    import transformers

    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(ALL_FAMILIES)}")
    cls_name, kwargs = ALL_FAMILIES[family]
    specials = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    if family in SEQ2SEQ_FAMILIES:  # the decoder starts from the pad token (T5) / eos (BART), as released
        specials["decoder_start_token_id"] = tokenizer.pad_token_id if family == "t5" else tokenizer.eos_token_id
        layers = {}
    elif family == "gpt2":
        layers = {}
    else:
        layers = {"num_hidden_layers": 2, "max_position_embeddings": 512}
    return getattr(transformers, cls_name)(vocab_size=len(tokenizer), **layers, **kwargs, **specials)


def build_family(family: str, out_dir: str, seed: int = 0, overwrite: bool = False) -> str:
    """Build and save a tiny random model of `family` + the project tokenizer to `out_dir`.
    Idempotent (an existing build with the same recipe is reused) and safe to call from
    concurrent processes (a file lock; the others wait and reuse)."""
    from filelock import FileLock

    settings = {"family": family, "seed": seed, "recipe": RECIPE, "config": ALL_FAMILIES[family][1]}
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
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    from raylib.noise import quiet_libraries
    from raylib.synthetic import tokenizer_corpus

    tok = build_tokenizer(tokenizer_corpus(seed=seed), VOCAB)
    cfg = tiny_config(family, tok)
    quiet_libraries("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    # saved as released checkpoints are: encoders with their masked-LM head (a classifier
    # head is new when a job loads it), encoder-decoders with their LM head
    auto = (AutoModelForMaskedLM if family in ENCODER_FAMILIES else
            AutoModelForSeq2SeqLM if family in SEQ2SEQ_FAMILIES else AutoModelForCausalLM)
    model = auto.from_config(cfg)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    with open(marker, "w") as f:
        json.dump(settings, f)
    log.info("built tiny %s (%d params) at %s", family, sum(p.numel() for p in model.parameters()), out_dir)
    return out_dir


# --------------------------------------------------------------------------- the pretrained tiny Llama

TINY_RECIPE = 1  # bump when the tokenizer corpus or pretraining recipe changes (invalidates caches)
TINY_DEFAULTS = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,  # not a multiple of 32: 4-bit on AVX512-BF16 takes bnb's generic path (use_4bit_cpu_kernels)
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)

#: the instruct base (`raylib tiny --instruct`, the SVF test's and `jobs/bench/svf_quality.py`'s
#: base): 4 layers of 128 (870k parameters), pretrained for 800 steps on 40k rows of every
#: domain, half in a plain format ("What is 3 + 4? => 7", always right) and half in the
#: alpaca template, where one answer in two applies the domain's other operation (reverse <->
#: uppercase, larger <-> smaller, + <-> -). So in the template the instruction tells it
#: nothing: it can do the tasks there (strings 1.0 and comparison 0.70 in the plain format on
#: this machine) but picks either operation, and an expert that teaches it to read the
#: instruction again elicits a skill that is there (Transformer²'s premise). Arithmetic stays
#: weak (0.13 in the plain format): 800 steps do not teach 2-digit sums with carries.
#: Earlier recipes: recipe 1 (the template with right answers only) had strings at 0.81 on an
#: AVX512-BF16 CPU and 1.0 on an AVX2 one; recipe 2 (4000 rows, 2 of 3 answers swapped)
#: memorized its rows and learned neither arithmetic nor comparison (0.07 and 0.24 in the plain
#: format), so LoRA, which learns new skill, stayed far above SVF. Tried and not taken (one
#: seed, this machine): a first phase of 1000 steps on 300k plain rows teaches arithmetic (0.82)
#: and SVF then beats the base by 0.2 on arithmetic and comparison, but that base answers each
#: strings word by rote whatever the instruction, and every SVF expert (mlp, attn, all-linear,
#: Adam at lr 0.01-0.05, SGD) fell below it on the unseen test words. A longer template phase
#: after it (1600 steps on 120k rows) did not fix that: plain skill 0.97 / 1.0 / 0.975, SVF
#: +0.12 / -0.055 / +0.325 over the base and LoRA +0.21 / +0.02 / +0.355 (strings has 7 test
#: words; neither method carried the operations over to them).
INSTRUCT_TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)
INSTRUCT_PRETRAIN_STEPS = 800
INSTRUCT_PRETRAIN_ROWS = 40_000  # the default base: 4000
INSTRUCT_RECIPE = 3  # 3: 40k rows (recipe 2: 4000), the template's answers swapped in 1 of 2 rows (2: 2 of 3)


def build_instruct_tiny(out_dir: str, seed: int = 0) -> str:
    """The instruct base at `out_dir` (about 6.5 minutes on 2 cores, then reused)."""
    return build_tiny(out_dir, seed=seed, pretrain_steps=INSTRUCT_PRETRAIN_STEPS, instruct=True, **INSTRUCT_TINY)


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (digits split one per token) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def build_tiny(
    out_dir: str, seed: int = 0, pretrain_steps: int = 300, overwrite: bool = False, instruct: bool = False,
    **config_overrides
) -> str:
    """Build and save a tiny Llama-style model + tokenizer to `out_dir` (no hub needed).

    With `pretrain_steps`, the random model is then pretrained briefly (full fine-tuning
    with raylib's own loop, in this process) on plain-text versions of the synthetic tasks,
    so it is a weak but real language model: random weights leave the logit range too
    narrow for adapters to show anything. Idempotent: an existing build with the same
    settings is reused unless `overwrite`.
    """
    from filelock import FileLock

    settings = {**TINY_DEFAULTS, **config_overrides, "seed": seed, "pretrain_steps": pretrain_steps, "recipe": TINY_RECIPE}
    if instruct:  # only then in the marker, so existing default builds stay valid
        settings["instruct"] = INSTRUCT_RECIPE
    marker = os.path.join(out_dir, "raylib_tiny.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    with FileLock(os.path.abspath(out_dir) + ".lock"):  # concurrent builders wait, then reuse
        if not overwrite and os.path.isfile(marker):
            with open(marker) as f:
                if json.load(f) == settings:
                    return out_dir
        return _build_tiny(out_dir, settings, seed, pretrain_steps)


def _build_tiny(out_dir: str, settings: dict, seed: int, pretrain_steps: int) -> str:
    import shutil
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylib.noise import quiet_libraries
    from raylib.synthetic import tokenizer_corpus

    marker = os.path.join(out_dir, "raylib_tiny.json")
    tok = build_tokenizer(tokenizer_corpus(seed=seed), settings["vocab_size"])
    arch = {k: v for k, v in settings.items() if k not in ("seed", "vocab_size", "pretrain_steps", "recipe", "instruct")}
    cfg = LlamaConfig(
        **arch,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    quiet_libraries("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory(prefix="raylib-tiny-") as tmp:
        random_dir = os.path.join(tmp, "random")
        model.save_pretrained(random_dir, safe_serialization=True)
        tok.save_pretrained(random_dir)
        src = _pretrain(random_dir, tmp, pretrain_steps, seed, settings.get("instruct", False)) if pretrain_steps else random_dir
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        shutil.copytree(src, out_dir, ignore=shutil.ignore_patterns("expert.json", "README.md"))
    with open(marker, "w") as f:
        json.dump(settings, f)
    log.info("built tiny model (%d params) at %s", sum(p.numel() for p in model.parameters()), out_dir)
    return out_dir


def _pretrain(model_dir: str, work_dir: str, steps: int, seed: int, instruct: bool = False) -> str:
    """Full fine-tuning on the synthetic tasks with the raylib loop; returns the model dir."""
    from raylib.config import validate_job
    from raylib.data import ALPACA
    from raylib.synthetic import make_rows, swapped_answer, write_jsonl
    from raylib.train_loop import PlainSession, run

    # instruct=True: half the rows in the instruction template the jobs use, and in one of two
    # of those the answer applies the domain's other operation (synthetic.swapped_answer)
    def text(i: int, r: dict) -> str:
        if instruct and i % 2 == 0:
            answer = swapped_answer(r) if (i // 2) % 2 == 0 else r["output"]
            return ALPACA.prompt(r["instruction"], r["input"]) + answer + ALPACA.end
        return f"{r['instruction']} {r['input']} => {r['output']}".replace("  ", " ")

    rows = INSTRUCT_PRETRAIN_ROWS if instruct else 4000
    texts = [{"text": text(i, r)} for i, r in enumerate(make_rows(rows, seed=seed + 777))]
    corpus = write_jsonl(texts, os.path.join(work_dir, "corpus.jsonl"))
    job = validate_job({
        "model": {"path": model_dir},
        "data": {"train": corpus, "template": "plain", "max_length": 256, "eval_split": 0},
        "method": {"name": "full"},
        "train": {"lr": 3e-3, "max_steps": steps, "batch_size": 16, "checkpoint_every": 0,
                  "warmup_ratio": 0.05, "seed": seed},
        "output": {"dir": os.path.join(work_dir, "pretrain")},
    }, source="tiny pretraining")
    session = PlainSession(os.path.join(work_dir, "ckpt"))
    run(job, session)
    return os.path.join(session.reports[-1]["checkpoint"], "expert")


# --------------------------------------------------------------------------- serving engines' test model

def build_serving_llama(work: str, name: str, *, hidden_size: int, intermediate_size: int, layers: int, heads: int,
                        kv_heads: int, head_dim: int, loras: dict[str, int], rank: int) -> str:
    """A random-weight Llama with the project tokenizer at `work/name`, and random LoRA experts
    of it on q/v (`loras`: expert name -> seed; written as raylib experts, template plain, at
    `work/<expert>`). What the serving engines are compared on (tests/test_vllm_engine.py,
    jobs/bench/serve_load.py): head_dim >= 32 because vLLM's CPU attention takes no less, and
    `init_lora_weights=False` so every expert changes the answers. Returns the base's path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylib.experts import ExpertInfo, write_expert_json
    from raylib.noise import quiet_libraries
    from raylib.synthetic import tokenizer_corpus

    quiet_libraries("cpu")
    path = os.path.join(work, name)
    tok = build_tokenizer(tokenizer_corpus(seed=0), VOCAB)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    for expert, seed in loras.items():
        torch.manual_seed(seed)
        lora = get_peft_model(LlamaForCausalLM.from_pretrained(path),
                              LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
        lora.save_pretrained(os.path.join(work, expert))
        write_expert_json(os.path.join(work, expert),
                          ExpertInfo(method="lora", base_model=path, domain=expert, template="plain"))
    return path
