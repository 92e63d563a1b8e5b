"""The frozen base of a model a method has been applied to: the reference policy of RL's KL
term and of DPO/KTO, without loading a second copy of the model.

- SVF: the same network with z = 1 (`svf.base_mode`);
- PEFT methods (LoRA family, IA3, prompt learning): `disable_adapter()`;
- full fine-tuning: the weights themselves are trained, so the base is only available as a
  copy (`frozen_copy`), or before the first step (the preference objectives precompute
  their reference log-probs then).
"""

from __future__ import annotations

import contextlib


def has_builtin_base(model) -> bool:
    """The model can act as its own frozen base (SVF or a PEFT model): no copy needed."""
    from raylib.methods import svf

    return bool(svf.svf_modules(model)) or hasattr(getattr(model, "module", model), "disable_adapter")


@contextlib.contextmanager
def frozen_base(model, frozen_copy=None):
    """Inside the block: the module that computes the base model's outputs."""
    from raylib.methods import svf

    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine -> the module
    if svf.svf_modules(inner):
        with svf.base_mode(inner):
            yield inner
    elif hasattr(inner, "disable_adapter"):
        with inner.disable_adapter():
            yield inner
    else:
        yield frozen_copy
