"""A base model's architecture as the methods see it: which layers they can adapt, of what kind
and shape, and where those layers sit — read from the real model (worker) or from its config
alone (driver, before Ray starts).

Driver side, `from_job(job)` reads `config.json` (`AutoConfig`) and builds the model on the meta
device (no weights allocated, seconds even for 70B configs), so architecture-specific problems
— PEFT has no IA3 default for the model type, target names the model does not have, sequences
longer than learned position embeddings — are ConfigErrors with a fix before any Ray resources
are spent, instead of a failed run. Worker side, `of_model(model)` gives the same description
of the loaded model, so defaults the driver announced (IA3's targets) are what the worker builds.

Adaptable layers are `nn.Linear` (incl. bitsandbytes' 4/8-bit subclasses) and transformers'
`Conv1D` (GPT-2 family: weight stored transposed, (in, out)) inside numbered decoder layers;
the LM head and embeddings are never among them. Cheap to import (torch loads lazily).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

log = logging.getLogger("raylib")

#: a module inside (decoder) layer N: model.layers.N. / transformer.h.N. / gpt_neox.layers.N. /
#: encoder.layer.N. (BERT) / encoder.block.N. (T5) / ...
DECODER_LAYER = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")
#: blocks that are a layer's MLP (feed-forward network)
_MLP_BLOCK = re.compile(r"(?:^|\.)(mlp|feed_forward|ffn|block_sparse_moe)(?:\.|$)")


@dataclass(frozen=True)
class Layer:
    """One adaptable layer: `kind` "linear" or "conv1d", shape as a Linear's (out, in)."""

    kind: str
    out_features: int
    in_features: int


@dataclass
class Layout:
    model_type: str
    #: adaptable layers inside decoder layers, in model order: path -> Layer
    layers: dict[str, Layer] = field(default_factory=dict)
    #: every module path (targets may name non-Linear modules, e.g. embeddings)
    modules: list[str] = field(default_factory=list)
    #: size of a learned absolute position table (GPT-2's wpe): positions past it do not exist
    learned_positions: int | None = None

    def relative(self, path: str) -> str:
        """The path inside its decoder layer (`self_attn.qkv_proj`, `mlp.c_proj`): a suffix that
        names the same module in every layer, and tells GPT-2's two `c_proj`s apart."""
        m = DECODER_LAYER.search(f".{path}.")
        return f".{path}"[m.end():] if m else path

    def leaves(self) -> list[str]:
        """Leaf names of the adaptable layers (`q_proj`, `c_attn`, ...), in model order."""
        return list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in self.layers))

    def mlp_outputs(self) -> list[str]:
        """Relative names of each MLP's output projection (Llama's down_proj, GPT-2's mlp.c_proj,
        GPT-NeoX's dense_4h_to_h): the last adaptable layer of every MLP block in model order,
        which is the one mapping the MLP's inner width back to the hidden size."""
        last: dict[str, str] = {}
        for path in self.layers:
            m = _MLP_BLOCK.search(path)
            if m:
                last[path[: m.end()]] = path
        return sorted({self.relative(p) for p in last.values()})

    def unmatched(self, names: list[str]) -> list[str]:
        """Entries of a PEFT `target_modules` list that name no module (PEFT matches a name
        exactly or as the end of a module path after a dot)."""
        return [n for n in names if not any(p == n or p.endswith("." + n) for p in self.modules)]


#: learned absolute position tables outside the decoder layers (GPT-2, OPT)
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def of_model(model) -> Layout:
    """The layout of a built model (real weights, quantized, or on the meta device)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    cfg = getattr(model, "config", None)
    layout = Layout(model_type=getattr(cfg, "model_type", "") or "")
    for path, module in model.named_modules():
        if not path:
            continue
        layout.modules.append(path)
        if DECODER_LAYER.search(f".{path}.") is None:
            if isinstance(module, nn.Embedding) and path.rsplit(".", 1)[-1] in _POSITION_TABLES:
                # OPT's table has 2 extra rows (an offset): the usable length is the config's
                layout.learned_positions = getattr(cfg, "max_position_embeddings", None) or module.num_embeddings
            continue
        if isinstance(module, Conv1D):
            layout.layers[path] = Layer("conv1d", module.nf, module.nx)
        elif isinstance(module, nn.Linear):
            layout.layers[path] = Layer("linear", module.out_features, module.in_features)
    return layout


def meta_model(config, trust_remote_code: bool = False):
    """The model of `config` on the meta device (no weights read or allocated): the causal LM,
    the encoder-decoder's seq2seq LM, or the encoder's masked-LM model (models.family_of_config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    from raylib.models import family_of_config

    auto = {"seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModelForMaskedLM}.get(family_of_config(config),
                                                                                  AutoModelForCausalLM)
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def read_config(job):
    """`AutoConfig` of the job's model. A config transformers cannot read fails here, driver
    side, exactly as the workers' `from_pretrained` would."""
    from transformers import AutoConfig

    from raylib.errors import ConfigError

    try:
        return AutoConfig.from_pretrained(job.model.path, revision=job.model.revision,
                                          trust_remote_code=job.model.trust_remote_code)
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError here
        text = " ".join(str(exc).split())[:300]
        raise ConfigError("model.path", f"transformers cannot read the config of {job.model.path!r}: {text}",
                          "upgrade transformers for a newer architecture, or set model.trust_remote_code: true "
                          "for a model that ships its own code") from exc


def from_job(job) -> Layout | None:
    """The job's model layout, driver side; None when the architecture cannot be built on the
    meta device (the architecture checks are then skipped and the workers report problems)."""
    config = read_config(job)  # unreadable: a ConfigError, not a skipped check
    try:
        model = meta_model(config, job.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - exotic remote code; not a reason to refuse the job
        log.debug("no meta-device model for %s (%s): architecture checks skipped", job.model.path, exc)
        return None
    return of_model(model)


def check_positions(job, layout: Layout, extra: int = 0) -> None:
    """Learned absolute positions (GPT-2, OPT) end at their table's size: a longer sequence is an
    IndexError inside the forward. `extra`: positions a method adds (virtual tokens)."""
    from raylib.errors import ConfigError

    limit = layout.learned_positions
    if limit is None or job.data.max_length + extra <= limit:
        return
    added = f" + {extra} virtual tokens ({job.method.name})" if extra else ""
    raise ConfigError(
        "data.max_length",
        f"{job.data.max_length}{added} exceeds the {limit} learned position embeddings of this "
        f"{layout.model_type} model",
        f"set data.max_length to at most {limit - extra}",
    )
