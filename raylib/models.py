"""Base models and tokenizers: real `from_pretrained` loading, plus a tiny local builder.

`load_model` / `load_tokenizer` take a local directory or a hub id (the hub works for users
who have one; with HF_HUB_OFFLINE=1 only local paths and the local cache do).
`build_tiny` makes a small Llama-style model and a BPE tokenizer trained with the
`tokenizers` library on the project's synthetic tasks, so tests and the demo need no hub.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from raylib.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_dtype(name: str, device_type: str, trains_weights: bool = False):
    """`auto` -> bf16 on a GPU that supports it, fp32 otherwise.

    `trains_weights` (full fine-tuning): `auto` keeps fp32 weights, and bf16 comes from the
    backend's autocast. bf16 weights updated by AdamW lose every update below their 2^-8
    relative precision (measured on an H200: 30 steps of full fine-tuning reached eval loss
    3.36 with bf16 weights, 2.22 with DeepSpeed's fp32 master weights, same batches).
    """
    import torch

    if name == "auto":
        if trains_weights:
            return torch.float32
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, _DTYPES[name])


def quantization_config(model_cfg, compute_dtype):
    if not model_cfg.quantization:
        return None
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.quantization,
        bnb_4bit_use_double_quant=model_cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        model_cfg.tokenizer or model_cfg.path,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if tok.pad_token_id is None:  # common for Llama-family tokenizers
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(model_cfg, device=None, trains_weights: bool = False, inference: bool = False, head: str | None = None):
    """The base causal LM. Quantized models are placed on `device` at load (bitsandbytes).
    `head="reward"`: the same backbone under transformers' sequence-classification class with
    one output (a reward model's scalar score head, freshly initialised from the seed).
    `trains_weights`: the method updates the base weights themselves (see resolve_dtype).
    `inference`: the model only serves or scores (no training step will run on it), so
    4-bit layers may take bitsandbytes' packed inference kernel (see use_4bit_cpu_kernels)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device or "cpu")
    dtype = resolve_dtype(model_cfg.dtype, device.type, trains_weights)
    kwargs = dict(
        dtype=dtype,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    quant = quantization_config(model_cfg, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    from safetensors import SafetensorError

    try:
        if head == "reward":
            from transformers import AutoModelForSequenceClassification

            # transformers' load report lists what is expected here (the LM head unused, the
            # score head new: it trains from the seed), on stderr at warning level
            with _transformers_errors_only():
                model = AutoModelForSequenceClassification.from_pretrained(model_cfg.path, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_cfg.path, **kwargs)
    except (OSError, SafetensorError) as exc:  # a weights file missing or cut off (an interrupted copy)
        raise ConfigError(
            "model.path",
            f"cannot load the weights of {model_cfg.path!r}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
            "re-copy or re-save the model (save_pretrained writes config.json and the weights together)",
        ) from exc
    if quant is not None:
        use_4bit_cpu_kernels(model, inference)
    return model


@contextlib.contextmanager
def _transformers_errors_only():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def preflight(job) -> None:
    """Driver-side: the model path must exist locally, or be a hub id when the hub is usable."""
    path = job.model.path
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError("model.path", f"{path!r} has no config.json", "point it at a directory written by save_pretrained")
        return
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ConfigError("model.path", f"{path!r} does not exist", "give a local model directory or a hub id like org/name")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json", revision=job.model.revision), str):
            raise ConfigError(
                "model.path",
                f"{path!r} is not a local directory and HF_HUB_OFFLINE=1 with no cached copy",
                "download the model first, or unset HF_HUB_OFFLINE",
            )


# --------------------------------------------------------------------------- 4-bit on CPU

#: bitsandbytes' packed 4-bit CPU kernel (AVX512-BF16 CPUs) lays weights out in blocks of this
#: many output rows (`bitsandbytes.functional._convert_weight_packed_for_cpu`).
BNB_CPU_PACK_BLOCK = 32


def fits_packed_4bit_kernel(module) -> bool:
    """The repack asserts out_features % 32 == 0 and an even in_features, and reshapes the
    absmax scales per row, so in_features must also be a whole number of quantization blocks."""
    quant_state = getattr(module.weight, "quant_state", None)
    blocksize = getattr(quant_state, "blocksize", None) or 64
    return (module.out_features % BNB_CPU_PACK_BLOCK == 0 and module.in_features % 2 == 0
            and module.in_features % blocksize == 0)


def use_4bit_cpu_kernels(model, inference: bool) -> int:
    """Keep each 4-bit layer off bitsandbytes' packed CPU kernel unless it is safe there.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a `Linear4bit` weight the first time
    the layer runs in eval mode without grad, and keeps it packed. Two things go wrong:
    - the repack asserts the layer's shape (out_features % 32 == 0; the tiny model's MLP is 176
      wide), so the first evaluation of a QLoRA run dies mid-run (fits_packed_4bit_kernel);
    - the packed matmul has no autograd formula, so once a training run has evaluated, the
      gradient stops at every 4-bit layer (the LoRA weights below it silently stop learning).
    So training models never pack, and inference models pack only the layers that fit; the
    others take bitsandbytes' generic CPU path, which every CPU has. The switch is the
    layer's own `support_avx512bf16_for_cpu` flag, which bitsandbytes sets from the CPU at
    construction (False elsewhere, so this changes nothing there). Returns how many layers
    stay eligible for the packed kernel."""
    import bitsandbytes as bnb

    eligible = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            keep = inference and fits_packed_4bit_kernel(module)
            module.support_avx512bf16_for_cpu = keep
            eligible += keep
    return eligible


def preflight_tokenizer(job):
    """Driver-side: the tokenizer the workers will load (data preflight tokenizes with it), or a
    ConfigError naming the field, instead of every worker failing on it later."""
    try:
        return load_tokenizer(job.model)
    except Exception as exc:  # noqa: BLE001 - transformers/tokenizers raise OSError, ValueError, ...
        source = job.model.tokenizer or job.model.path
        raise ConfigError("model.tokenizer" if job.model.tokenizer else "model.path",
                          f"cannot load the tokenizer of {source!r}: {' '.join(str(exc).split())[:300]}",
                          "point model.tokenizer (or model.path) at a directory with the tokenizer files") from exc


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitioned params report numel 0
        if getattr(p, "quant_state", None) is not None:  # bnb Params4bit pack 2 values per byte
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# --------------------------------------------------------------------------- tiny model

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
#: base): 4 layers of 128 (870k parameters), pretrained on every domain in a plain format
#: ("What is 3 + 4? => 7", always right) and in the alpaca template, where 2 of 3 answers apply
#: the domain's other operation (reverse <-> uppercase, larger <-> smaller, + <-> -). So it has
#: the skills but in the template mostly does the wrong thing: low exact match on every CPU,
#: with the skill there for an expert to elicit (Transformer²'s premise). Recipe 1 (the
#: template with right answers only) left its per-domain skill to the CPU's float kernels:
#: strings at 0.81 on an AVX512-BF16 CPU and 1.0 on an AVX2 one, where SVF could not beat it.
INSTRUCT_TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)
INSTRUCT_PRETRAIN_STEPS = 800
INSTRUCT_RECIPE = 2  # 2: the template's answers swap the domain's operation in 2 of 3 rows


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
    """Full fine-tuning on plain-text tasks with the raylib loop; returns the model dir."""
    from raylib.config import validate_job
    from raylib.data import ALPACA
    from raylib.synthetic import make_rows, swapped_answer, write_jsonl
    from raylib.train_loop import PlainSession, run

    # instruct=True: half the rows in the instruction template the jobs use, and in 2 of 3 of
    # those the answer applies the domain's other operation (synthetic.swapped_answer). The
    # base so has each skill (the plain rows are always right) and a habit in the template
    # that hides it: a gap between what it can do and what it does that does not depend on
    # the CPU's float kernels, which is what a domain expert closes (INSTRUCT_TINY)
    def text(i: int, r: dict) -> str:
        if instruct and i % 2 == 0:
            answer = swapped_answer(r) if (i // 2) % 3 else r["output"]
            return ALPACA.prompt(r["instruction"], r["input"]) + answer + ALPACA.end
        return f"{r['instruction']} {r['input']} => {r['output']}".replace("  ", " ")

    rows = [{"text": text(i, r)} for i, r in enumerate(make_rows(4000, seed=seed + 777))]
    corpus = write_jsonl(rows, os.path.join(work_dir, "corpus.jsonl"))
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
