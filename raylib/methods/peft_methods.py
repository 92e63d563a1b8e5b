"""PEFT-backed methods: thin adapters from our YAML options to PEFT's own configs.

The output of every method here is a PEFT adapter written with `save_pretrained`, so plain
`PeftModel.from_pretrained(base, dir)` loads it without raylib. Options PEFT has but we do
not name go through `extra:` straight into the PEFT config class.
"""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from typing import Any, Literal, Union

from pydantic import Field, PositiveInt

from raylib.methods import Method, MethodOptions

TargetModules = Union[Literal["all-linear"], list[str]]

#: methods that learn virtual tokens instead of touching weights (PEFT "prompt learning")
PROMPT_LEARNING = ("prefix", "ptuning", "prompt")


class LoraOptions(MethodOptions):
    name: Literal["lora"]
    r: PositiveInt = 16
    alpha: float = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"
    layers_to_transform: list[int] | None = None
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    extra: dict[str, Any] = Field(default_factory=dict, description="passed to peft.LoraConfig")


class QLoraOptions(LoraOptions):
    name: Literal["qlora"]  # type: ignore[assignment]


class AdaLoraOptions(MethodOptions):
    """AdaLoRA (Zhang et al., 2023): LoRA in SVD form whose per-matrix ranks are pruned from
    `init_r` toward an average of `target_r` by importance, on a schedule of optimizer steps:
    `tinit` warm-up steps at full rank, budget shrinking every `deltaT` steps until
    `total_steps - tfinal`, then `tfinal` steps at the final ranks. `total_step` is the run's
    step count (train.max_steps or epochs x steps per epoch), filled in by the worker."""

    name: Literal["adalora"]
    init_r: PositiveInt = 12
    target_r: PositiveInt = 8
    tinit: int = Field(0, ge=0)
    tfinal: int = Field(0, ge=0)
    deltaT: PositiveInt = 1
    beta1: float = Field(0.85, gt=0, lt=1)
    beta2: float = Field(0.85, gt=0, lt=1)
    orth_reg_weight: float = Field(0.5, ge=0)
    alpha: float = 8
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"
    layers_to_transform: list[int] | None = None
    modules_to_save: list[str] | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="passed to peft.AdaLoraConfig")


class IA3Options(MethodOptions):
    """(IA)^3 (Liu et al., 2022): learned per-channel scaling vectors. `target_modules: null`
    uses PEFT's default for the architecture (k, v and the MLP down projection for Llama), or
    raylib's where PEFT has none (every decoder Linear, MLP outputs as feedforward: `IA3`)."""

    name: Literal["ia3"]
    target_modules: TargetModules | None = None
    feedforward_modules: list[str] | None = Field(None, description="subset of target_modules scaled on their input")
    layers_to_transform: list[int] | None = None
    modules_to_save: list[str] | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="passed to peft.IA3Config")


class _PromptLearningOptions(MethodOptions):
    num_virtual_tokens: PositiveInt = 8
    #: not accepted: prompt learning adds virtual tokens, it does not target modules. The
    #: field exists so the error can name it and say what to do instead.
    target_modules: Any = Field(None, description="not supported by prompt-learning methods")
    modules_to_save: list[str] | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class PrefixOptions(_PromptLearningOptions):
    """Prefix tuning (Li & Liang, 2021): trained key/value prefixes in every layer."""

    name: Literal["prefix"]
    prefix_projection: bool = False
    encoder_hidden_size: PositiveInt | None = Field(None, description="MLP width when prefix_projection (default: model hidden size)")


class PTuningOptions(_PromptLearningOptions):
    """P-tuning (Liu et al., 2021): virtual token embeddings produced by a small encoder."""

    name: Literal["ptuning"]
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: PositiveInt = 128
    encoder_num_layers: PositiveInt = 2
    encoder_dropout: float = Field(0.0, ge=0, lt=1)


class PromptOptions(_PromptLearningOptions):
    """Prompt tuning (Lester et al., 2021): trained input embeddings for virtual tokens,
    random or initialised from the embeddings of `init_text` (tokenizer from model.path)."""

    name: Literal["prompt"]
    init: Literal["random", "text"] = "random"
    init_text: str | None = None


class PeftMethod(Method):
    """Shared save/load for every PEFT method: adapters in PEFT's own format."""

    task_type = "CAUSAL_LM"

    def task_type_for(self, job, model=None) -> str:
        """SEQ_CLS for a reward model or a sequence classifier (PEFT then also trains and saves
        its `score`/`classifier` head), SEQ_2_SEQ_LM for an encoder-decoder's SFT (`model`: the
        loaded base, whose config says; without it, as the driver validates options, only an
        explicit model.family does: no model config is read there)."""
        if job.objective.name == "reward" or getattr(job.objective, "labels", None):
            return "SEQ_CLS"
        if job.model.family == "seq2seq" or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return "SEQ_2_SEQ_LM"
        return self.task_type

    @abstractmethod
    def peft_config(self, job, model=None):
        """The PEFT config object built from `job.method` (`model`: the base, when known)."""

    def check(self, job) -> None:
        from raylib.errors import ConfigError

        try:
            self.peft_config(job)
        except (TypeError, ValueError) as exc:
            raise ConfigError("method", f"PEFT rejected the options: {exc}", "see the PEFT docs for this method's config") from exc

    def apply(self, model, job):
        from peft import get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False):
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=job.train.gradient_checkpointing
            )
        config = self.peft_config(job, model=model)
        new = getattr(model, "raylib_new_modules", None)  # a classifier's freshly initialised modules
        if new:
            # PEFT saves `classifier`/`score` itself under SEQ_CLS: add only what lies outside those
            # (BERT's pooler), never a part of a module already saved whole (RoBERTa's classifier.dense)
            saved = set(config.modules_to_save or []) | {"classifier", "score"}
            extra = [n for n in new if not any(n == m or n.startswith(m + ".") for m in saved)]
            if extra:
                config.modules_to_save = sorted(set(config.modules_to_save or []) | set(extra))
        return get_peft_model(model, config)

    def save(self, model, out_dir: str) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load_into(self, model, src_dir: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(os.path.join(src_dir, "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise RuntimeError(f"adapter in {src_dir} does not match the model: unexpected={unexpected[:5]}")

    def load(self, base_model, src_dir: str):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, src_dir)

    def merge(self, base_model, src_dir: str):
        """LoRA (and any PEFT adapter with merge support, e.g. IA3) folded into the weights."""
        return self.load(base_model, src_dir).merge_and_unload()


class LoRA(PeftMethod):
    name = "lora"
    Options = LoraOptions
    serve_sharing = "adapter"
    vllm_servable = True
    families = ("causal", "seq2seq", "encoder")

    def peft_config(self, job, model=None):
        from peft import LoraConfig

        o = job.method
        return LoraConfig(
            task_type=self.task_type_for(job, model),
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=resolve_targets(o.target_modules, o.layers_to_transform, model),
            layers_to_transform=o.layers_to_transform,
            modules_to_save=o.modules_to_save,
            bias=o.bias,
            use_rslora=o.use_rslora,
            use_dora=o.use_dora,
            **o.extra,
        )

    def check_model(self, job, layout) -> None:
        check_targets("method.target_modules", job.method.target_modules, layout)


class QLoRA(LoRA):
    """LoRA over a 4-bit NF4 base with paged 8-bit AdamW (Dettmers et al., 2023)."""

    name = "qlora"
    Options = QLoraOptions
    quantization = "nf4"
    default_optimizer = "paged_adamw_8bit"
    families = ("causal",)
    families_reason = "its 4-bit base path is built and tested on decoder-only language models; use lora"

    def check(self, job) -> None:
        from raylib.errors import ConfigError

        if job.model.quantization not in ("nf4", "fp4"):
            raise ConfigError(
                "model.quantization",
                f"qlora trains over a 4-bit base, not {job.model.quantization!r}",
                "set model.quantization to nf4 (default for qlora) or fp4, or use method.name: lora",
            )
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # ImportError or a broken native library
            raise ConfigError(
                "method.name",
                f"qlora needs bitsandbytes 4-bit kernels, which cannot load here: {exc}",
                "pip install bitsandbytes, or use method.name: lora",
            ) from exc
        super().check(job)


class AdaLoRA(PeftMethod):
    """AdaLoRA through PEFT. Two things the loop must do, or it silently becomes plain LoRA:
    call `update_and_allocate(step)` after every optimizer step (before zeroing grads; the
    rank allocator scores importance from them) -> `after_step`; and keep the orthogonal
    regulariser in the loss: `AdaLoraModel.forward` adds `orth_reg_weight x ||PᵀP - I||`
    to `outputs.loss` when the forward gets labels (peft 0.21), which our SFT loss does.
    """

    families = ("causal", "encoder")
    families_reason = "raylib runs AdaLoRA on decoder-only LMs and encoder classifiers; use lora"

    name = "adalora"
    Options = AdaLoraOptions

    def peft_config(self, job, model=None, total_step: int | None = None):
        from peft import AdaLoraConfig

        o = job.method
        return AdaLoraConfig(
            task_type=self.task_type_for(job, model),
            init_r=o.init_r,
            target_r=o.target_r,
            tinit=o.tinit,
            tfinal=o.tfinal,
            deltaT=o.deltaT,
            beta1=o.beta1,
            beta2=o.beta2,
            orth_reg_weight=o.orth_reg_weight,
            # the run's step count; with epochs it is known only in the worker, which sets it
            # in begin_training (a stand-in that passes PEFT's checks until then)
            total_step=total_step or job.train.max_steps or o.tinit + o.tfinal + 1,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=resolve_targets(o.target_modules, o.layers_to_transform, model),
            layers_to_transform=o.layers_to_transform,
            modules_to_save=o.modules_to_save,
            **o.extra,
        )

    def check(self, job) -> None:
        from raylib.errors import ConfigError

        o = job.method
        if o.target_r > o.init_r:
            raise ConfigError("method.target_r", f"target_r ({o.target_r}) is above init_r ({o.init_r})",
                              "AdaLoRA prunes ranks: set target_r <= init_r")
        if job.train.max_steps is not None:
            check_schedule(o, job.train.max_steps)
        super().check(job)

    def check_model(self, job, layout) -> None:
        check_targets("method.target_modules", job.method.target_modules, layout)

    def begin_training(self, model, total_steps: int) -> None:
        """total_step = the run's optimizer steps (the rank allocator holds this same config)."""
        cfg = model.peft_config[model.active_adapter]
        check_schedule(cfg, total_steps)
        cfg.total_step = total_steps

    def load(self, base_model, src_dir: str):
        import warnings

        with warnings.catch_warnings():
            # PEFT 0.21 matches rank_pattern keys against module names, but AdaLoRA's keys name
            # the lora_E tensors ("...q_proj.lora_E"): a false alarm on every AdaLoRA adapter
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            return super().load(base_model, src_dir)

    def after_step(self, model, step: int, engine=None) -> None:
        if engine is None:
            model.base_model.update_and_allocate(step)
            return
        # DeepSpeed: the importance scores were updated in before_engine_step (from the grads);
        # here PEFT's update_and_allocate's masking half, on whole tensors, written back to ZeRO
        alloc, cfg = model.base_model.rankallocator, model.peft_config[model.active_adapter]
        final = cfg.total_step - cfg.tfinal
        if step < final:
            budget, mask_now = alloc.budget_schedule(step)
            if mask_now:
                view = _ZeroView(model.base_model.model, "lora_E")
                cfg.rank_pattern = alloc.mask_to_budget(view, budget)
                view.write_back()
        elif step == final:  # the final budget: the pattern is fixed from here on
            view = _ZeroView(model.base_model.model, "lora_E")
            cfg.rank_pattern = alloc.mask_to_budget(view, alloc.budget_schedule(step)[0])
            view.write_back()
            alloc.reset_ipt()
        else:
            view = _ZeroView(model.base_model.model, "lora_E")
            alloc.mask_using_rank_pattern(view, cfg.rank_pattern)
            view.write_back()

    def before_engine_step(self, model, step: int, engine) -> None:
        """Sensitivity/uncertainty averages from |w x grad|, read while ZeRO still holds the
        gradients (after the engine's backward, before its step). PEFT scores the post-step
        weights against this step's gradients; here it is the pre-step weights: one step apart."""
        cfg = model.peft_config[model.active_adapter]
        if step < cfg.total_step - cfg.tfinal:
            model.base_model.rankallocator.update_ipt(_ZeroView(model.base_model.model, "lora_", with_grads=True))

    def save_train_state(self, model, state_dir: str) -> None:
        """The rank allocator's importance averages and the rank pattern: resuming without them
        would restart the budget from fresh scores."""
        import torch

        alloc, cfg = model.base_model.rankallocator, model.peft_config[model.active_adapter]
        torch.save({"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
                    "rank_pattern": cfg.rank_pattern}, os.path.join(state_dir, ADALORA_ALLOCATOR))

    def load_train_state(self, model, state_dir: str) -> None:
        import torch

        path = os.path.join(state_dir, ADALORA_ALLOCATOR)
        if not os.path.exists(path):  # a checkpoint from before the allocator was saved
            return
        saved = torch.load(path, map_location="cpu", weights_only=False)
        alloc, cfg = model.base_model.rankallocator, model.peft_config[model.active_adapter]
        device = next(p.device for p in model.parameters())
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, key, {n: t.to(device) for n, t in saved[key].items()})
        if saved["rank_pattern"]:
            cfg.rank_pattern = saved["rank_pattern"]

    def save(self, model, out_dir: str) -> None:
        """The PEFT adapter (ranks cut to the allocated pattern, as PEFT saves it) plus the
        full-rank trainable state for resuming (`adalora_resume.safetensors`)."""
        import json

        from safetensors.torch import save_file

        import warnings

        with warnings.catch_warnings():  # matrices pruned to rank 0 save as (0, n): PEFT mistakes them for ZeRO-3 shards
            warnings.filterwarnings("ignore", message=".*have invalid shape.*")
            model.save_pretrained(out_dir, safe_serialization=True)
        full = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(full, os.path.join(out_dir, ADALORA_RESUME))
        cfg = model.peft_config[model.active_adapter]
        with open(os.path.join(out_dir, ADALORA_RESUME + ".json"), "w") as f:
            json.dump({"rank_pattern": cfg.rank_pattern}, f)

    def load_into(self, model, src_dir: str) -> None:
        """Resume: full-rank weights back in place; the rank pattern if it was fixed already.
        The allocator's importance averages come back through `load_train_state`."""
        import json

        import torch
        from safetensors.torch import load_file

        state = load_file(os.path.join(src_dir, ADALORA_RESUME))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
        with open(os.path.join(src_dir, ADALORA_RESUME + ".json")) as f:
            pattern = json.load(f)["rank_pattern"]
        if pattern:
            model.peft_config[model.active_adapter].rank_pattern = pattern


ADALORA_RESUME = "adalora_resume.safetensors"
ADALORA_ALLOCATOR = "adalora_allocator.pt"


class _ZeroView:
    """The AdaLoRA tensors of a DeepSpeed model, whole, for PEFT's RankAllocator.

    `model` is the one PEFT's own update_and_allocate hands the allocator (the AdaLoraModel's
    inner model), so parameter names and rank-pattern keys are the same on both backends.
    The allocator walks `model.named_parameters()` and multiplies/masks each tensor in place;
    under ZeRO the module's tensors are partitioned (ZeRO-3) or shadowed by the optimizer's
    fp32 master copy (ZeRO-2), so it walks this view instead: full fp32 copies of the
    parameters whose names contain `part` (collective gathers, identical on every rank), with
    their full gradients attached when `with_grads`. Other adapter tensors appear as empty
    placeholders (the allocator needs only their names). `write_back` puts masked values into
    the optimizer's master copy and the module's weights.
    """

    def __init__(self, model, part: str, with_grads: bool = False):
        import torch
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        self._params = {}
        self._full = {}
        for n, p in model.named_parameters():
            if "lora_" not in n or not p.requires_grad:
                continue
            if part in n:
                full = safe_get_full_fp32_param(p).detach().clone()
                if with_grads:
                    full.grad = safe_get_full_grad(p).detach().to(full.dtype)
                self._params[n] = p
                self._full[n] = full
            else:
                self._full[n] = torch.empty(0)

    def named_parameters(self):
        return iter(self._full.items())

    def write_back(self) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        for n, p in self._params.items():
            value = self._full[n]
            safe_set_full_fp32_param(p, value)  # the optimizer's master copy
            if hasattr(p, "ds_id"):  # ZeRO-3: the module's partition, via a gather
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.to(p.dtype))
            else:
                p.data.copy_(value.to(p.dtype))


def resolve_targets(targets, layers_to_transform, model):
    """PEFT refuses `layers_to_transform` with the string "all-linear", so then we expand it
    ourselves: the leaf names of every Linear/Conv1D inside the decoder layers (never the LM
    head). Without the model (driver-side check) a stand-in name lets PEFT check the rest."""
    if targets != "all-linear" or layers_to_transform is None:
        return targets
    if model is None:
        return ["q_proj"]
    from raylib.methods.layout import of_model

    leaves = of_model(model).leaves()
    if not leaves:
        raise ValueError("target_modules: all-linear found no Linear layers inside numbered decoder layers")
    return sorted(leaves)


def check_targets(field: str, targets, layout) -> None:
    """Driver side: `targets` (a PEFT target_modules value) must name layers this model has.
    PEFT itself raises only inside the worker, and only when nothing matched; here a list that
    matches nothing is a ConfigError listing the model's layers, a partly matching one a warning."""
    from raylib.errors import ConfigError

    leaves = ", ".join(layout.leaves()) or "none"
    if targets == "all-linear" or targets is None:
        if targets == "all-linear" and not layout.layers:
            raise ConfigError(field, f"this {layout.model_type} model has no Linear/Conv1D layers inside numbered "
                              "decoder layers for all-linear to adapt", "name the modules to adapt in a list")
        return
    missing = layout.unmatched(list(targets))
    if len(missing) == len(targets):
        raise ConfigError(field, f"{sorted(missing)} name no module of this {layout.model_type} model "
                          f"(its decoder layers' Linear/Conv1D layers: {leaves})",
                          "use names from that list, or all-linear")
    if missing:
        logging.getLogger("raylib").warning("%s: %s name no module of this %s model (adapting the others; its "
                                            "layers: %s)", field, sorted(missing), layout.model_type, leaves)


def check_schedule(o, total_steps: int) -> None:
    """AdaLoRA needs a budgeting phase: tinit < total_steps - tfinal."""
    from raylib.errors import ConfigError

    if o.tinit >= total_steps - o.tfinal:
        raise ConfigError(
            "method.tinit",
            f"no rank-budgeting phase: tinit ({o.tinit}) >= total steps ({total_steps}) - tfinal ({o.tfinal})",
            "lower method.tinit / method.tfinal, or train longer (train.max_steps / train.epochs)",
        )


class IA3(PeftMethod):
    """(IA)^3 through PEFT. `target_modules: null` means PEFT's default for the architecture;
    PEFT has none for some it can adapt (e.g. Phi-3, whose k and v live in one fused qkv_proj)
    and raises inside the worker. For those raylib supplies one (`default_targets`): every
    Linear/Conv1D of the decoder layers, with each MLP's output projection as feedforward (its
    input scaled: the paper's scaling of the FFN's inner activations). The driver checks that
    such a default exists before Ray starts (`check_model`, on the meta-device model); the
    worker builds the same from the loaded model and logs it."""

    name = "ia3"
    Options = IA3Options
    families = ("causal", "encoder")
    families_reason = "raylib runs IA3 on decoder-only LMs and encoder classifiers; use lora"

    def peft_config(self, job, model=None):
        from peft import IA3Config

        o = job.method
        kwargs = dict(task_type=self.task_type_for(job, model), modules_to_save=o.modules_to_save, **o.extra)
        if o.target_modules is not None:
            kwargs["target_modules"] = o.target_modules
            kwargs["feedforward_modules"] = o.feedforward_modules or []
        elif model is not None and not has_peft_ia3_default(model.config.model_type):
            from raylib.methods.layout import of_model

            targets, feedforward = default_targets(of_model(model))
            kwargs["target_modules"], kwargs["feedforward_modules"] = targets, feedforward
            logging.getLogger("raylib").info(
                "ia3: PEFT has no default target modules for model type %r; using every linear layer of the "
                "decoder layers %s, with %s as feedforward (set method.target_modules to choose)",
                model.config.model_type, targets, feedforward)
        if o.layers_to_transform is not None:  # IA3Config has no layers_to_transform: a regex does it
            import re

            layers = "|".join(str(i) for i in o.layers_to_transform)
            leaves = "|".join(re.escape(m) for m in o.target_modules)
            kwargs["target_modules"] = rf".*\.(?:layers|h|blocks|layer)\.(?:{layers})\..*\.(?:{leaves})"
        elif o.feedforward_modules is not None:
            kwargs["feedforward_modules"] = o.feedforward_modules
        return IA3Config(**kwargs)

    def check(self, job) -> None:
        from raylib.errors import ConfigError

        o = job.method
        if o.layers_to_transform is not None and not isinstance(o.target_modules, list):
            raise ConfigError("method.layers_to_transform", "ia3 needs the module names to restrict to layers",
                              "also set method.target_modules to a list, e.g. [k_proj, v_proj, down_proj]")
        if o.feedforward_modules and isinstance(o.target_modules, list):
            extra = sorted(set(o.feedforward_modules) - set(o.target_modules))
            if extra:
                raise ConfigError("method.feedforward_modules", f"{extra} are not in method.target_modules",
                                  "feedforward_modules must be a subset of target_modules")
        super().check(job)

    def check_model(self, job, layout) -> None:
        """Explicit targets must exist; without them, a default must exist (PEFT's, or raylib's
        `default_targets`, which the worker then builds and logs)."""
        from raylib.errors import ConfigError

        o = job.method
        if o.target_modules is not None:
            check_targets("method.target_modules", o.target_modules, layout)
            return
        if has_peft_ia3_default(layout.model_type):
            return
        try:
            default_targets(layout)
        except ValueError as exc:
            raise ConfigError(
                "method.target_modules",
                f"PEFT has no IA3 default for model type {layout.model_type!r}, and {exc}",
                "set method.target_modules (e.g. the attention's key/value projections and the MLP's output "
                f"projection; this model's layers: {', '.join(layout.leaves()) or 'none'}) and "
                "method.feedforward_modules (the MLP's output projection)",
            ) from None


def has_peft_ia3_default(model_type: str) -> bool:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

    return model_type in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING


def default_targets(layout) -> tuple[list[str], list[str]]:
    """raylib's IA3 default where PEFT has none: (target_modules, feedforward_modules) as names
    relative to a decoder layer (`self_attn.qkv_proj`, `mlp.down_proj`), which PEFT matches as
    path suffixes in every layer and which keep GPT-2-style `attn.c_proj`/`mlp.c_proj` apart.
    ValueError when the model has no decoder Linear layers or no recognisable MLP."""
    if not layout.layers:
        raise ValueError("it has no Linear/Conv1D layers inside numbered decoder layers")
    feedforward = layout.mlp_outputs()
    if not feedforward:
        raise ValueError("raylib found no MLP block (mlp/feed_forward/ffn) whose output projection to scale")
    return sorted({layout.relative(p) for p in layout.layers}), feedforward


class _PromptLearning(PeftMethod):
    """Shared checks: no target_modules (nothing is injected into layers); no packing (PEFT
    drops position_ids for prompt learning, so packed examples would attend to each other
    and only the first would see the virtual tokens)."""

    serve_stepwise = False
    supports_packing = False
    families = ("causal", "encoder")
    families_reason = "raylib runs prompt learning on decoder-only LMs and encoder classifiers; use lora"

    def check(self, job) -> None:
        from raylib.errors import ConfigError

        o = job.method
        if o.target_modules is not None:
            raise ConfigError(
                "method.target_modules",
                f"{o.name} learns virtual tokens and does not target modules",
                "remove method.target_modules, or use method.name: lora / adalora / ia3 to adapt chosen modules",
            )
        if job.data.packing:
            raise ConfigError(
                "data.packing",
                f"{o.name} cannot train on packed sequences (PEFT ignores position_ids for prompt learning)",
                "set data.packing: false (the default for prompt-learning methods)",
            )
        super().check(job)

    def added_positions(self, job) -> int:
        return job.method.num_virtual_tokens

    def common(self, job) -> dict:
        o = job.method
        out = dict(task_type=self.task_type_for(job), num_virtual_tokens=o.num_virtual_tokens, **o.extra)
        if o.modules_to_save is not None:
            out["modules_to_save"] = o.modules_to_save
        return out


class PrefixTuning(_PromptLearning):
    name = "prefix"
    Options = PrefixOptions
    families = ("causal",)
    families_reason = ("PEFT's prefix tuning feeds the prefix as past key values, which encoders (BERT, ...) do "
                       "not take; use prompt or ptuning")

    def peft_config(self, job, model=None):
        from peft import PrefixTuningConfig

        o = job.method
        kwargs = self.common(job)
        if o.encoder_hidden_size is not None:
            kwargs["encoder_hidden_size"] = o.encoder_hidden_size
        return PrefixTuningConfig(prefix_projection=o.prefix_projection, **kwargs)


class PTuning(_PromptLearning):
    name = "ptuning"
    Options = PTuningOptions

    def peft_config(self, job, model=None):
        from peft import PromptEncoderConfig

        o = job.method
        return PromptEncoderConfig(
            encoder_reparameterization_type=o.encoder_reparameterization_type,
            encoder_hidden_size=o.encoder_hidden_size,
            encoder_num_layers=o.encoder_num_layers,
            encoder_dropout=o.encoder_dropout,
            **self.common(job),
        )


class PromptTuning(_PromptLearning):
    name = "prompt"
    Options = PromptOptions

    def check(self, job) -> None:
        from raylib.errors import ConfigError

        o = job.method
        if o.init == "text" and not (o.init_text and o.init_text.strip()):
            raise ConfigError("method.init_text", "init: text needs the text to initialise the prompt from",
                              "set method.init_text (e.g. 'Classify the sentiment of the sentence.') or init: random")
        if o.init == "random" and o.init_text:
            raise ConfigError("method.init_text", "init_text is only used with init: text",
                              "set method.init: text, or remove method.init_text")
        super().check(job)

    def peft_config(self, job, model=None):
        from peft import PromptTuningConfig, PromptTuningInit

        o = job.method
        kwargs = self.common(job)
        if o.init == "text":
            kwargs.update(
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=o.init_text,
                tokenizer_name_or_path=job.model.tokenizer or job.model.path,
            )
        return PromptTuningConfig(**kwargs)
