"""Frozen backbone + named classification heads (`method.name: heads`, seed 002).

One causal-LM backbone is shared by several tasks; each task has its own head (a Linear, or
a small MLP) over a pooled hidden state (the last real token, or the mean over tokens).
Options cover the seed's three scenarios:

- only the heads train (backbone frozen): the default;
- `freeze_tasks: [b]`: head b stays as initialised/loaded while the others train;
- `lora: {r, alpha, target_modules, ...}`: LoRA adapters on the backbone train with the heads.

Fast path (`cache_features`): with a frozen backbone and no LoRA the backbone's output for a
row never changes, so the worker computes the pooled features once for the train and eval
rows and trains the heads on them (`raylib.objectives.classification.prepare`). `auto` turns
it on exactly when it is valid; `jobs/bench/methods.py` measures the speed-up.

YAML::

    method:
      name: heads
      tasks:                     # task name -> its labels (rows carry `task` and `label`)
        domain: [arithmetic, strings, comparison]
        operation: [add, subtract, larger, smaller, reverse, uppercase]
      freeze_tasks: []
      pooling: mean              # mean | last (the last real token)
      head_hidden: null          # null: Linear head; N: Linear-GELU-Linear with width N
      head_dropout: 0.0
      cache_features: auto       # auto | true | false
      lora: null                 # or {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}
    objective: {name: classification}

Expert on disk: `heads.safetensors` (every head's weights), `heads_config.json` (tasks,
labels, pooling, shapes) and `expert.json`, plus the PEFT adapter files when the backbone had
LoRA. `Heads().load(base_causal_lm, dir)` rebuilds the classifier.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, Union

from pydantic import Field, PositiveInt, model_validator

from raylib.methods import Method, MethodOptions
from raylib.methods.peft_methods import TargetModules

HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads_config.json"


class BackboneLora(MethodOptions):
    """LoRA on the backbone (seed 002: r=4 on q_proj/v_proj)."""

    name: Literal["lora"] = "lora"
    r: PositiveInt = 8
    alpha: float = 16
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: TargetModules = Field(default_factory=lambda: ["q_proj", "v_proj"])
    layers_to_transform: list[int] | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="passed to peft.LoraConfig")


class HeadsOptions(MethodOptions):
    name: Literal["heads"]
    tasks: dict[str, list[str]] = Field(description="task name -> class labels (at least 2)")
    freeze_tasks: list[str] = Field(default_factory=list)
    pooling: Literal["last", "mean"] = "mean"
    head_hidden: PositiveInt | None = None
    head_dropout: float = Field(0.0, ge=0, lt=1)
    cache_features: Union[bool, Literal["auto"]] = "auto"
    lora: BackboneLora | None = None

    @model_validator(mode="after")
    def _labels(self) -> "HeadsOptions":
        if not self.tasks:
            raise ValueError("method.tasks needs at least one task: {name: [label, label, ...]}")
        for task, labels in self.tasks.items():
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise ValueError(f"method.tasks.{task} needs at least 2 distinct labels, got {labels}")
        return self

    def use_cache(self) -> bool:
        return self.lora is None if self.cache_features == "auto" else bool(self.cache_features)


# --------------------------------------------------------------------------- the model


class HeadsOutput(dict):
    """`.loss` (mean cross-entropy over the batch's rows) and `.logits` {task: [B, n_task]}."""

    __getattr__ = dict.get


def _make_classifier():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class MultiHeadClassifier(nn.Module):
        """A causal LM's decoder (frozen, or with LoRA) + one head per task."""

        def __init__(self, backbone, tasks: dict[str, list[str]], pooling="last", head_hidden=None, head_dropout=0.0):
            super().__init__()
            self.backbone = backbone  # the causal LM, or a PeftModel around it
            self.tasks = {t: list(v) for t, v in tasks.items()}
            self.task_names = list(self.tasks)
            self.pooling = pooling
            hidden = _causal_lm(backbone).config.hidden_size
            dtype = next(_causal_lm(backbone).parameters()).dtype
            if not dtype.is_floating_point:  # quantized base: heads in fp32
                dtype = torch.float32

            def head(n):
                if head_hidden:
                    return nn.Sequential(nn.Dropout(head_dropout), nn.Linear(hidden, head_hidden), nn.GELU(),
                                         nn.Linear(head_hidden, n))
                return nn.Sequential(nn.Dropout(head_dropout), nn.Linear(hidden, n))

            self.heads = nn.ModuleDict({t: head(len(v)) for t, v in self.tasks.items()}).to(dtype)

        @property
        def config(self):  # train_loop sets config.use_cache; the backbone's config is the one
            return _causal_lm(self.backbone).config

        def features(self, input_ids, attention_mask=None, **_):
            """Pooled last-layer hidden states [B, H] (after the final norm)."""
            decoder = _causal_lm(self.backbone).get_decoder()
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            h = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            if self.pooling == "mean":
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                return (h * m).sum(1) / m.sum(1).clamp(min=1)
            last = attention_mask.sum(1) - 1  # right padding
            return h[torch.arange(h.size(0), device=h.device), last]

        def forward(self, input_ids=None, attention_mask=None, features=None, task_ids=None, labels=None, **_):
            if features is None:
                features = self.features(input_ids, attention_mask)
            features = features.to(next(self.heads.parameters()).dtype)
            logits = {t: self.heads[t](features) for t in self.task_names}
            loss = None
            if labels is not None:
                if task_ids is None:
                    task_ids = torch.zeros_like(labels)
                loss = features.new_zeros(())
                for i, t in enumerate(self.task_names):
                    mask = task_ids == i
                    # every head stays in the graph (0-weight when absent) so DDP sees all grads
                    loss = loss + 0.0 * logits[t].sum()
                    if mask.any():
                        loss = loss + F.cross_entropy(logits[t][mask].float(), labels[mask], reduction="sum")
                loss = loss / labels.numel()
            return HeadsOutput(loss=loss, logits=logits)

    return MultiHeadClassifier


def _causal_lm(backbone):
    """The transformers model under an optional PeftModel wrapper (LoRA is injected in place)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def MultiHeadClassifier(*args, **kwargs):  # noqa: N802 - built lazily: torch is heavy
    return _make_classifier()(*args, **kwargs)


# --------------------------------------------------------------------------- the method


class Heads(Method):
    name = "heads"
    Options = HeadsOptions
    servable = False  # heads classify; they do not generate text
    supports_packing = False

    def check(self, job) -> None:
        from raylib.errors import ConfigError

        o = job.method
        if job.objective.name != "classification":
            raise ConfigError("objective.name", f"method heads trains classification heads, not {job.objective.name!r}",
                              "set objective: {name: classification}")
        unknown = [t for t in o.freeze_tasks if t not in o.tasks]
        if unknown:
            raise ConfigError("method.freeze_tasks", f"{unknown} are not tasks of method.tasks ({list(o.tasks)})",
                              "name tasks from method.tasks")
        if set(o.freeze_tasks) == set(o.tasks) and o.lora is None:
            raise ConfigError("method.freeze_tasks", "every head is frozen and the backbone too: nothing would train",
                              "leave at least one task out of freeze_tasks, or add method.lora")
        if o.cache_features is True and o.lora is not None:
            raise ConfigError("method.cache_features",
                              "cached features need a frozen backbone, but method.lora trains it",
                              "set cache_features: auto/false, or remove method.lora")
        if o.lora is not None:
            try:
                self._lora_config(o.lora)
            except (TypeError, ValueError) as exc:
                raise ConfigError("method.lora", f"PEFT rejected the options: {exc}", "see peft.LoraConfig") from exc

    def check_model(self, job, layout) -> None:
        """The backbone LoRA's targets (default q_proj/v_proj) must exist: Phi-3 fuses them into
        qkv_proj, GPT-2 has c_attn."""
        if job.method.lora is not None:
            from raylib.methods.peft_methods import check_targets

            check_targets("method.lora.target_modules", job.method.lora.target_modules, layout)

    @staticmethod
    def _lora_config(lo, model=None):
        from peft import LoraConfig

        from raylib.methods.peft_methods import resolve_targets

        return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                          target_modules=resolve_targets(lo.target_modules, lo.layers_to_transform, model),
                          layers_to_transform=lo.layers_to_transform, **lo.extra)

    def apply(self, model, job):
        o = job.method
        model.requires_grad_(False)
        backbone = model
        if o.lora is not None:
            from peft import get_peft_model, prepare_model_for_kbit_training

            if getattr(model, "is_quantized", False):
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.train.gradient_checkpointing)
            backbone = get_peft_model(model, self._lora_config(o.lora, model))
        clf = MultiHeadClassifier(backbone, o.tasks, o.pooling, o.head_hidden, o.head_dropout)
        clf.to(next(model.parameters()).device)
        for t in o.freeze_tasks:
            clf.heads[t].requires_grad_(False)
        return clf

    def save(self, model, out_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
        save_file(state, os.path.join(out_dir, HEADS_FILE))
        shapes = {t: list(model.heads[t][-1].weight.shape) for t in model.task_names}
        head_hidden = model.heads[model.task_names[0]][1].out_features if len(model.heads[model.task_names[0]]) > 2 else None
        with open(os.path.join(out_dir, HEADS_CONFIG), "w") as f:
            json.dump({"tasks": model.tasks, "pooling": model.pooling, "head_hidden": head_hidden, "shapes": shapes,
                       "lora": hasattr(model.backbone, "peft_config")}, f, indent=2)
        if hasattr(model.backbone, "peft_config"):
            model.backbone.save_pretrained(out_dir, safe_serialization=True)

    def load_into(self, model, src_dir: str) -> None:
        from safetensors.torch import load_file

        model.heads.load_state_dict(load_file(os.path.join(src_dir, HEADS_FILE)))
        if hasattr(model.backbone, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.backbone, load_file(os.path.join(src_dir, "adapter_model.safetensors")))

    def load(self, base_model, src_dir: str):
        """Base causal LM + a heads expert dir -> the classifier in eval mode."""
        from safetensors.torch import load_file

        with open(os.path.join(src_dir, HEADS_CONFIG)) as f:
            cfg = json.load(f)
        backbone = base_model
        if cfg.get("lora"):
            from peft import PeftModel

            backbone = PeftModel.from_pretrained(base_model, src_dir)
        clf = MultiHeadClassifier(backbone, cfg["tasks"], cfg["pooling"], cfg.get("head_hidden"))
        clf.heads.load_state_dict(load_file(os.path.join(src_dir, HEADS_FILE)))
        return clf.to(next(base_model.parameters()).device).eval()
