"""The method registry: one entry per fine-tuning method, selected by `method.name`.

A method is a small object with a pydantic `Options` model (its YAML keys, validated before
Ray starts) and four operations the training loop and the serve layer call:

- `check(job)`: extra driver-side validation (e.g. build the PEFT config to catch bad keys);
- `check_model(job, layout)`: driver-side validation against the base model's architecture
  (`raylib.methods.layout`: its layers, built from config.json on the meta device), run by
  `launch.preflight` before Ray starts: what the method cannot do on this architecture is a
  ConfigError there, not a failed run;
- `apply(model, job)`: turn a loaded base model into the model to train (freeze, wrap, ...);
- `save(model, out_dir)`: write the trained weights in an ecosystem format;
- `load_into(model, src_dir)`: put saved trained weights back into a model built by `apply`
  (resume from a checkpoint);
- `load(base_model, src_dir)`: base model + saved expert -> model ready for inference.

Optional hooks (defaults do nothing), so the training loop stays method-agnostic:

- `begin_training(model, total_steps)`: once the run's step count is known (schedules).
- `after_step(model, step, engine)`: called once per optimizer step, after `optimizer.step()`
  and before the gradients are zeroed (AdaLoRA's rank allocator reads them there).
- `before_engine_step(model, step, engine)`: DeepSpeed only, between the engine's backward and
  its step: the only moment ZeRO's partitioned gradients can be read.
- `save_train_state(model, state_dir)` / `load_train_state(model, state_dir)`: method state
  that is not weights (AdaLoRA's importance averages), written into the checkpoint's
  train_state/ and read back on resume on both backends.

Adding a method = one module with a `Method` subclass + one line in `METHODS`.
Modules here must stay cheap to import (no torch/peft at import time): the config schema is
built from these Options and is validated before anything heavy loads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from raylib.config import JobConfig


class MethodOptions(BaseModel):
    """Base of every method's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    name: str


class Method(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]
    #: quantized loading the method needs (e.g. qlora -> "nf4"), None for full precision
    quantization: ClassVar[str | None] = None
    #: optimizer the method defaults to when train.optimizer is not set
    default_optimizer: ClassVar[str] = "adamw"
    #: the method trains the base model's own weights (full fine-tuning): model.dtype `auto`
    #: then loads them in fp32, and bf16 is autocast only (models.resolve_dtype)
    trains_base_weights: ClassVar[bool] = False
    #: model families (models.family) the method trains: "causal", "seq2seq", "encoder"
    families: ClassVar[tuple[str, ...]] = ("causal",)
    #: why it trains no others (the ConfigError's text for the rest)
    families_reason: ClassVar[str] = "it is built and tested on decoder-only language models"

    def check(self, job: "JobConfig") -> None:
        """Driver-side validation beyond the schema. Raise ConfigError."""

    def check_model(self, job: "JobConfig", layout) -> None:
        """Driver-side validation against the base model's `layout.Layout`. Raise ConfigError."""

    def added_positions(self, job: "JobConfig") -> int:
        """Positions the method adds in front of every sequence (prompt learning's virtual
        tokens): they count against a model's learned position embeddings."""
        return 0

    #: False for methods that cannot train on packed sequences (data.packing defaults to off)
    supports_packing: ClassVar[bool] = True
    #: train.lr when the job gives none (None: the schema's 2e-4, a LoRA-scale step)
    default_lr: ClassVar[float | None] = None

    # Serving capabilities (raylib.serve reads these; it checks no method names).
    #: the expert generates text (heads experts classify)
    servable: ClassVar[bool] = True
    #: how an expert shares a replica's base weights: "adapter" = a named adapter of one
    #: PeftModel, several per batch row by row (LoRA; mixes with add_weighted_adapter);
    #: "z" = SVF z vectors on one decomposed model (one expert per forward; mixes of z);
    #: None = a model of its own
    serve_sharing: ClassVar[str | None] = None
    #: its forward is a plain causal-LM step over a KV cache, so the HF engine decodes it in
    #: continuous batches; prompt learning adds virtual tokens inside PEFT's forward and runs
    #: through PEFT's generate instead
    serve_stepwise: ClassVar[bool] = True
    #: vLLM can serve it: as a LoRARequest (serve_sharing "adapter") or as its own model (full)
    vllm_servable: ClassVar[bool] = False

    def begin_training(self, model, total_steps: int) -> None:
        """Once, before the first step, with the run's optimizer step count (unwrapped model)."""

    def after_step(self, model, step: int, engine=None) -> None:
        """Per optimizer step, gradients still present; `step` counts from 0 (unwrapped model).
        `engine` is the DeepSpeed engine (None on accelerate): its step has consumed the grads."""

    def before_engine_step(self, model, step: int, engine) -> None:
        """DeepSpeed only: after the engine's backward, before its step (gradients readable)."""

    def save_train_state(self, model, state_dir: str) -> None:
        """Non-weight training state into a checkpoint's train_state/ (rank 0)."""

    def load_train_state(self, model, state_dir: str) -> None:
        """Read back what `save_train_state` wrote (every rank, after the weights)."""

    @abstractmethod
    def apply(self, model, job: "JobConfig"):
        """Base model -> the model to train (only the method's parameters trainable)."""

    @abstractmethod
    def save(self, model, out_dir: str) -> None:
        """Write the trained weights in the ecosystem's format (unwrapped model)."""

    @abstractmethod
    def load_into(self, model, src_dir: str) -> None:
        """Load weights written by `save` into a model built by `apply` (resume)."""

    @abstractmethod
    def load(self, base_model, src_dir: str):
        """Base model + a saved expert -> model ready for inference."""

    def merge(self, base_model, src_dir: str):
        """Base model + a saved expert -> a plain HF model with the expert folded into its
        weights (what `raylib export --merge` saves). Default: load, which suits methods whose
        expert already is a full model."""
        return self.load(base_model, src_dir)


def _registry() -> dict[str, Method]:
    from raylib.methods.full import FullFineTuning
    from raylib.methods.heads import Heads
    from raylib.methods.peft_methods import IA3, LoRA, PTuning, PrefixTuning, PromptTuning, QLoRA, AdaLoRA

    methods = [FullFineTuning(), LoRA(), QLoRA(), AdaLoRA(), IA3(), PrefixTuning(), PTuning(), PromptTuning(), Heads()]
    from raylib.methods.svf import SVF

    methods.append(SVF())
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _registry()


def get_method(name: str) -> Method:
    return METHODS[name]
