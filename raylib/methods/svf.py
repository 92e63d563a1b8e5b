"""SVF: singular-value fine-tuning (Transformer², Sun et al. 2025), `method.name: svf`.

Every targeted Linear weight is decomposed once, W = U·diag(σ)·Vᵀ, and the only trainable
parameters are one vector z per matrix (length = number of singular values): the adapted
weight is U·diag(σ⊙z)·Vᵀ. z = 1 is the base model exactly (up to float rounding). GPT-2's
Conv1D layers are Linears with a transposed weight and are adapted the same way (merging
gives them back as Conv1D).

YAML (`method:`)::

    name: svf
    targets: mlp            # mlp | attn | all-linear | [q_proj, v_proj, ...] (module leaf names)
    layers: null            # decoder layer indices to adapt (default: all)
    init_mean: 1.0          # z initialisation: mean and std of a normal around it
    init_std: 0.0
    forward: auto           # auto | rebuild | factored (see below)
    cache_dir: null         # SVD factor cache (default $RAYLIB_SVF_CACHE or ~/.cache/raylib/svf)

Decomposition cache: the factors are written once per (base model identity, targeted
modules) to `<cache_dir>/<key>.safetensors`. The identity is the model config plus, for
each weight file of a local model dir, its name, size and a hash of its first and last MiB
(a content hash of the weights for non-local models). A file lock serialises concurrent
workers and serve replicas: the first computes, the others wait and load.

Forward strategies (per shape, `forward: auto`): (a) "rebuild" forms U·diag(σ⊙z)·Vᵀ once
per forward call and runs a dense matmul; (b) "factored" computes U·((σ⊙z)⊙(Vᵀx)). (a) costs
r·m·n + T·m·n multiply-adds, (b) T·r·(m+n); with r = min(m, n), (b) only wins for small T
(few tokens per call). `auto` picks by that cost model using the job's tokens per micro-batch
(batch_size·max_length), which means "rebuild" for every training shape we measured
(`jobs/bench/svf.py` measures both). Without autograd, (a) caches the rebuilt weight until z
changes, so inference with a fixed expert runs at plain-Linear speed.

Expert on disk: `svf_z.safetensors` ({module name: z}), `svf_config.json` (targets, layers,
module shapes) and the `expert.json` every raylib expert has (method svf, base_model,
domain, metrics, config incl. targets).

Public API (stable; used by serve and CEM code)::

    apply_svf(model, targets="mlp", layers=None, *, init_mean=1.0, init_std=0.0,
              forward="auto", tokens_hint=2048, cache_dir=None, model_path=None) -> model
        Replace targeted Linears by SVFLinear in place (all other params frozen).
    svf_modules(model) -> dict[str, SVFLinear]
    get_z(model) -> dict[str, Tensor]              # detached copies
    set_z(model, z: dict | None, strict=True)      # in place; None = base model (z = 1)
    base_mode(model)                               # context manager: z = 1 inside
    load_z(expert_dir) -> dict[str, Tensor]
    load_experts(expert_dirs) -> list[dict[str, Tensor]]
    mix(zs, alphas) -> dict[str, Tensor]           # 1 + Σ αₖ (zₖ - 1); alphas: [K] or per layer [K][L]
    apply_expert(model, expert_dir_or_dirs, alphas=None)   # load (+ mix) + set_z
    merge(model) -> model                          # SVFLinear -> plain nn.Linear in place
    export_merged(base_model_path, expert_dir, out_dir, alphas=None) -> out_dir
        A normal HF model dir (save_pretrained + tokenizer) with the expert merged in.
    svf_param_counts(shapes: dict[str, (out, in)]) -> int   # trainable count (Σ min(out, in))
    target_linears(model, targets, layers) -> dict[str, nn.Linear]

A serve replica keeps one base model with SVF applied and calls `set_z` (or
`apply_expert`) per request to switch experts without reloading anything.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Literal, Sequence, Union

from pydantic import Field

from raylib.methods import Method, MethodOptions
from raylib.methods.layout import DECODER_LAYER

Z_FILE = "svf_z.safetensors"
CONFIG_FILE = "svf_config.json"

ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "dense",
              "c_attn", "c_proj", "out_proj", "Wqkv")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
             "dense_h_to_4h", "dense_4h_to_h")
_LAYER_RE = DECODER_LAYER


class SVFOptions(MethodOptions):
    name: Literal["svf"]
    targets: Union[Literal["mlp", "attn", "all-linear"], list[str]] = "mlp"
    layers: list[int] | None = None
    init_mean: float = 1.0
    init_std: float = Field(0.0, ge=0)
    forward: Literal["auto", "rebuild", "factored"] = "auto"
    cache_dir: str | None = None


# --------------------------------------------------------------------------- targets


def _kind(name: str, module_path: str) -> str | None:
    leaf = name
    if leaf in MLP_NAMES or ".mlp." in f".{module_path}." or ".feed_forward." in f".{module_path}.":
        return "mlp"
    if leaf in ATTN_NAMES or "attn" in module_path or "attention" in module_path:
        return "attn"
    return None


def selected(path: str, targets="mlp", layers: Sequence[int] | None = None) -> bool:
    """Whether the options select the layer at `path` (given it is a Linear/Conv1D): only
    layers inside numbered decoder layers, never the output head or embeddings."""
    m = _LAYER_RE.search(f".{path}.")
    if m is None:
        return False
    if layers is not None and int(m.group(1)) not in layers:
        return False
    leaf = path.rsplit(".", 1)[-1]
    if isinstance(targets, str):
        return targets == "all-linear" or _kind(leaf, path) == targets
    return leaf in targets


def target_linears(model, targets="mlp", layers: Sequence[int] | None = None) -> dict:
    """{module name: nn.Linear / Conv1D} the options select, in model order (`selected`)."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    from raylib.methods.svf_layers import SVFLinear

    return {path: module for path, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D, SVFLinear)) and selected(path, targets, layers)}


def svf_param_counts(shapes: dict) -> int:
    """Trainable SVF parameters for {name: (out, in)}: one z entry per singular value."""
    return sum(min(o, i) for o, i in shapes.values())


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(f".{name}.")
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- public API


def apply_svf(model, targets="mlp", layers=None, *, init_mean: float = 1.0, init_std: float = 0.0,
              forward: str = "auto", tokens_hint: int = 2048, cache_dir: str | None = None,
              model_path: str | None = None):
    """Replace the targeted Linears of `model` by SVFLinear (in place); freeze everything else."""
    from raylib.methods.svf_layers import SVFLinear, choose_mode, decompose, is_conv1d, linear_shape, model_identity

    linears = {n: m for n, m in target_linears(model, targets, layers).items() if not isinstance(m, SVFLinear)}
    if not linears:
        raise ValueError(f"svf: no Linear/Conv1D layers match targets={targets!r} layers={layers!r}")
    factors = decompose(linears, model_identity(model, model_path or getattr(model, "name_or_path", None)), cache_dir)
    model.requires_grad_(False)
    for name, lin in linears.items():
        U, S, Vh = (t.to(device=lin.weight.device, dtype=lin.weight.dtype) for t in factors[name])
        mode = forward if forward != "auto" else choose_mode(*linear_shape(lin), tokens_hint)
        layer = SVFLinear(U, S.float(), Vh, lin.bias, mode=mode, init_mean=init_mean, init_std=init_std,
                          conv1d=is_conv1d(lin))
        layer.z.data = layer.z.data.to(lin.weight.device)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer)
    model.svf_config = {"targets": targets, "layers": list(layers) if layers is not None else None,
                        "shapes": {n: list(linear_shape(m)) for n, m in linears.items()}}
    return model


def svf_modules(model) -> dict:
    from raylib.methods.svf_layers import SVFLinear

    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, SVFLinear)}


def _unwrap(model):
    """The model inside a DDP/DeepSpeed wrapper (names then match the base model's)."""
    return getattr(model, "module", model)


def get_z(model) -> dict:
    return {n: m.z.detach().clone() for n, m in svf_modules(model).items()}


def set_z(model, z: dict | None, strict: bool = True) -> None:
    """Set every z in place (no reallocation, so optimizers/DDP keep their references).
    `z=None` restores the base model (all ones)."""
    import torch

    mods = svf_modules(model)
    if z is not None and strict:
        missing, unexpected = set(mods) - set(z), set(z) - set(mods)
        if missing or unexpected:
            raise KeyError(f"z vectors do not match the model: missing={sorted(missing)[:3]} unexpected={sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, m in mods.items():
            if z is None:
                m.z.fill_(1.0)
            elif name in z:
                m.z.copy_(z[name].to(device=m.z.device, dtype=m.z.dtype))


@contextlib.contextmanager
def base_mode(model):
    """Inside the block the model is the base model (z = 1); z is restored afterwards."""
    saved = get_z(model)
    set_z(model, None)
    try:
        yield model
    finally:
        set_z(model, saved)


def load_z(expert_dir: str) -> dict:
    from safetensors.torch import load_file

    path = os.path.join(expert_dir, Z_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{expert_dir} is not an SVF expert (no {Z_FILE})")
    return load_file(path)


def read_svf_config(expert_dir: str) -> dict:
    with open(os.path.join(expert_dir, CONFIG_FILE)) as f:
        return json.load(f)


def load_experts(expert_dirs: Sequence[str]) -> list[dict]:
    zs = [load_z(d) for d in expert_dirs]
    for d, z in zip(expert_dirs[1:], zs[1:]):
        if set(z) != set(zs[0]):
            raise ValueError(f"{d} targets other modules than {expert_dirs[0]}: cannot mix them")
    return zs


def mix(zs: Sequence[dict], alphas) -> dict:
    """z_mix = 1 + Σₖ αₖ·(zₖ − 1): each expert's change to the base (z = 1) scaled by its
    weight, as PEFT's linear `add_weighted_adapter` scales LoRA deltas. Weights that sum to 1
    give the convex mix Σₖ αₖ·zₖ; all zeros give the base model; one expert at 0.5 is that
    expert at half strength (where Σ αₖ·zₖ would halve every singular value of the model).
    `alphas`: K floats, or K lists of one weight per decoder layer (a module's layer index
    picks the weight; modules outside numbered layers use the mean)."""
    import torch

    if len(alphas) != len(zs):
        raise ValueError(f"{len(alphas)} alphas for {len(zs)} experts")
    out = {}
    for name in zs[0]:
        li = layer_index(name)
        acc = torch.ones_like(zs[0][name], dtype=torch.float32)
        for a, z in zip(alphas, zs):
            if isinstance(a, (list, tuple)) or (hasattr(a, "ndim") and a.ndim > 0):
                a = a[li] if li is not None else sum(a) / len(a)
            acc = acc + float(a) * (z[name].float() - 1.0)
        out[name] = acc
    return out


def apply_expert(model, experts, alphas=None) -> None:
    """Set the model's z from one expert dir, or a mix of several (`alphas` required)."""
    if isinstance(experts, (str, os.PathLike)):
        set_z(model, load_z(str(experts)))
        return
    zs = load_experts(list(experts))
    set_z(model, zs[0] if len(zs) == 1 and alphas is None else mix(zs, alphas))


def merge(model):
    """Replace every SVFLinear by a plain nn.Linear (Conv1D where it was one) with its current
    merged weight (in place)."""
    target = _unwrap(model)
    for name, m in list(svf_modules(target).items()):
        parent_name, _, leaf = name.rpartition(".")
        setattr(target.get_submodule(parent_name) if parent_name else target, leaf, m.to_linear())
    if hasattr(target, "svf_config"):
        del target.svf_config
    return model


def export_merged(base_model_path: str, expert_dir, out_dir: str, alphas=None, cache_dir: str | None = None) -> str:
    """Base + expert (or a mix of experts) -> a normal HF model dir anyone can from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = expert_dir if isinstance(expert_dir, (str, os.PathLike)) else list(expert_dir)[0]
    cfg = read_svf_config(str(first))
    model = AutoModelForCausalLM.from_pretrained(base_model_path)
    apply_svf(model, cfg["targets"], cfg["layers"], forward="rebuild", cache_dir=cache_dir, model_path=base_model_path)
    apply_expert(model, expert_dir, alphas)
    merge(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(first) if os.path.isfile(os.path.join(str(first), "tokenizer_config.json"))
                                  else base_model_path).save_pretrained(out_dir)
    return out_dir


def save_z(model, out_dir: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    target = _unwrap(model)
    save_file({n: z.float().cpu().contiguous() for n, z in get_z(target).items()}, os.path.join(out_dir, Z_FILE))
    cfg = getattr(target, "svf_config", None) or {}
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump({**cfg, "trainable_params": sum(m.rank for m in svf_modules(target).values())}, f, indent=2)


# --------------------------------------------------------------------------- the Method


class SVF(Method):
    name = "svf"
    Options = SVFOptions
    serve_sharing = "z"
    #: z starts at 1 and scales singular values: a useful change is tens of percent, so its
    #: step is ~100x LoRA's (the SFT rate jobs/bench/svf_quality.py measures; the RL examples
    #: set 0.02)
    default_lr = 0.05

    def check(self, job) -> None:
        from raylib.errors import ConfigError

        if job.model.quantization:
            raise ConfigError("model.quantization", "svf decomposes full-precision weights, not quantized ones",
                              "remove model.quantization")
        t = job.method.targets
        if isinstance(t, list) and not t:
            raise ConfigError("method.targets", "empty list", "use mlp, attn, all-linear or module names like [q_proj]")

    def check_model(self, job, layout) -> None:
        """The targets must select at least one layer of this architecture (mlp/attn are found
        by module names and paths, which some families spell differently)."""
        from raylib.errors import ConfigError

        o = job.method
        if not any(selected(p, o.targets, o.layers) for p in layout.layers):
            raise ConfigError(
                "method.targets",
                f"targets={o.targets!r}" + (f" in layers {o.layers}" if o.layers is not None else "")
                + f" select no Linear/Conv1D layer of this {layout.model_type} model "
                f"(its decoder layers' Linear/Conv1D layers: {', '.join(layout.leaves()) or 'none'})",
                "use all-linear, or a list of names from that list" + (", or other method.layers" if o.layers else ""),
            )

    def apply(self, model, job):
        o = job.method
        return apply_svf(model, o.targets, o.layers, init_mean=o.init_mean, init_std=o.init_std, forward=o.forward,
                         tokens_hint=job.train.batch_size * job.data.max_length, cache_dir=o.cache_dir,
                         model_path=job.model.path)

    def save(self, model, out_dir: str) -> None:
        save_z(model, out_dir)

    def load_into(self, model, src_dir: str) -> None:
        set_z(model, load_z(src_dir))

    def merge(self, base_model, src_dir: str):
        """U·diag(σ⊙z)·Vᵀ written back as plain Linear weights (`merge` above)."""
        return merge(self.load(base_model, src_dir))

    def load(self, base_model, src_dir: str):
        cfg = read_svf_config(src_dir)
        apply_svf(base_model, cfg["targets"], cfg["layers"], forward="rebuild")
        set_z(base_model, load_z(src_dir))
        return base_model
