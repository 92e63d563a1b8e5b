"""Base models and tokenizers: real `from_pretrained` loading, plus a tiny local builder.

`load_model` / `load_tokenizer` take a local directory or a hub id (the hub works for users
who have one; with HF_HUB_OFFLINE=1 only local paths and the local cache do).
The tiny models tests and the demo build themselves (no hub) are in `raylib.tiny_models`.
"""

from __future__ import annotations

import contextlib
import functools
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
    return tokenizer_at(model_cfg.tokenizer or model_cfg.path, revision=model_cfg.revision,
                        trust_remote_code=model_cfg.trust_remote_code)


def tokenizer_at(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer at `path`, padded on the right, with eos as pad when it has no pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:  # common for Llama-family tokenizers
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# --------------------------------------------------------------------------- model families

FAMILIES = ("causal", "seq2seq", "encoder")


def family(model_cfg) -> str:
    """causal | seq2seq | encoder: `model.family`, or (auto) what the checkpoint's config says."""
    if model_cfg.family != "auto":
        return model_cfg.family
    try:
        return _detected_family(model_cfg.path, model_cfg.revision, model_cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - unreadable config: models.preflight / layout.read_config say why
        return "causal"


@functools.lru_cache(maxsize=32)
def _detected_family(path: str, revision: str | None, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    return family_of_config(AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code))


def family_of_config(config) -> str:
    """Encoder-decoders (T5, BART, ...) are seq2seq. Model types transformers has a masked-LM
    class for (BERT, RoBERTa, DeBERTa, ...) are encoders, unless the checkpoint was saved as a
    decoder (`is_decoder`, or a ...ForCausalLM / ...LMHeadModel architecture). Everything else
    is a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    saved_as_decoder = getattr(config, "is_decoder", False) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or []))
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not saved_as_decoder:
        return "encoder"
    return "causal"


def load_model(model_cfg, device=None, trains_weights: bool = False, inference: bool = False, head=None):
    """The base model: a causal LM, or the encoder-decoder's seq2seq LM (`family`).
    Quantized models are placed on `device` at load (bitsandbytes).
    `head="reward"`: the same backbone under transformers' sequence-classification class with
    one output (a reward model's scalar score head, freshly initialised from the seed).
    `head=[class names]`: a sequence classifier over those classes (encoders, or any backbone
    trained by `objective: classification` with `objective.labels`): label names in its config.
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
            model = load_reward_model(model_cfg.path, **kwargs)
        elif head is not None:
            model = load_classifier(model_cfg.path, list(head), **kwargs)
        elif family(model_cfg) == "seq2seq":
            from transformers import AutoModelForSeq2SeqLM

            model = AutoModelForSeq2SeqLM.from_pretrained(model_cfg.path, **kwargs)
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


def load_reward_model(path: str, device=None, **kwargs):
    """A backbone as a reward model: transformers' sequence-classification class with one
    output (the score of the last real token). A causal LM checkpoint gets a fresh score head
    (seeded by the caller); a saved reward model loads whole."""
    from transformers import AutoModelForSequenceClassification

    # transformers' load report lists what is expected here (the LM head unused, the score
    # head new), on stderr at warning level
    with _transformers_errors_only():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    return model.to(device) if device is not None and "device_map" not in kwargs else model


def load_classifier(path: str, labels: list[str], **kwargs):
    """transformers' sequence-classification class over `labels` (a new classifier head on a
    pretrained backbone, or a saved classifier whole), with the label names in its config."""
    from transformers import AutoModelForSequenceClassification

    with _transformers_errors_only():  # the head is new: expected, listed at warning level
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, output_loading_info=True, **kwargs)
    # modules initialised here, not read from the checkpoint (the classifier; BERT's and
    # DeBERTa's pooler under a masked-LM checkpoint): an adapter must save them too, or the
    # published expert would load with other random weights (PeftMethod.apply)
    model.raylib_new_modules = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])})
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
