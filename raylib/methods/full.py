"""Full fine-tuning: every weight trains; the output is a complete HF model directory."""

from __future__ import annotations

import glob
import os
from typing import Literal

from raylib.methods import Method, MethodOptions


class FullOptions(MethodOptions):
    name: Literal["full"]


class FullFineTuning(Method):
    name = "full"
    Options = FullOptions
    trains_base_weights = True
    vllm_servable = True
    families = ("causal", "seq2seq", "encoder")

    def check(self, job) -> None:
        from raylib.errors import ConfigError

        if job.model.quantization:
            raise ConfigError(
                "model.quantization",
                f"full fine-tuning cannot train {job.model.quantization}-quantized weights",
                "remove model.quantization, or use method.name: qlora",
            )

    def apply(self, model, job):
        model.requires_grad_(True)
        return model

    def save(self, model, out_dir: str) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load_into(self, model, src_dir: str) -> None:
        """Load (possibly sharded) safetensors written by `save_pretrained` in place."""
        from safetensors.torch import load_file

        files = sorted(glob.glob(os.path.join(src_dir, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {src_dir}")
        state = {}
        for f in files:
            state.update(load_file(f))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise RuntimeError(
                f"{src_dir} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}"
            )

    def load(self, base_model, src_dir: str):
        # the base's own class: a causal or seq2seq LM, or a sequence classifier (reward
        # models, encoders) saved with its head
        return type(base_model).from_pretrained(src_dir, dtype=base_model.dtype)
