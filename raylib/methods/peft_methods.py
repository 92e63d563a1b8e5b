"""PEFT-backed methods: thin adapters from our YAML options to PEFT's own configs.

The output of every method here is a PEFT adapter written with `save_pretrained`, so plain
`PeftModel.from_pretrained(base, dir)` loads it without raylib. Options PEFT has but we do
not name go through `extra:` straight into the PEFT config class.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from typing import Any, Literal, Union

from pydantic import Field, PositiveInt

from raylib.methods import Method, MethodOptions

TargetModules = Union[Literal["all-linear"], list[str]]


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


class PeftMethod(Method):
    """Shared save/load for every PEFT method: adapters in PEFT's own format."""

    task_type = "CAUSAL_LM"

    @abstractmethod
    def peft_config(self, job):
        """The PEFT config object built from `job.method`."""

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
        return get_peft_model(model, self.peft_config(job))

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

    def peft_config(self, job):
        from peft import LoraConfig

        o = job.method
        return LoraConfig(
            task_type=self.task_type,
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=o.target_modules,
            layers_to_transform=o.layers_to_transform,
            modules_to_save=o.modules_to_save,
            bias=o.bias,
            use_rslora=o.use_rslora,
            use_dora=o.use_dora,
            **o.extra,
        )


class QLoRA(LoRA):
    """LoRA over a 4-bit NF4 base with paged 8-bit AdamW (Dettmers et al., 2023)."""

    name = "qlora"
    Options = QLoraOptions
    quantization = "nf4"
    default_optimizer = "paged_adamw_8bit"

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
