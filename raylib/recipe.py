"""What every objective's training loop shares (litgpt-style setup -> fit).

`setup` builds, once and the same way for every objective: the seeded accelerator (Accelerate
or DeepSpeed, `backends.make_accelerator`), the tokenizer, the method, the base model with the
method applied (a reward head when the objective asks for one), and the parameter counts.
`Cadence` says at which steps a loop evaluates and checkpoints. The loops then differ only in
what a step does: `train_loop.run` (sft, classification, dpo/orpo/simpo/kto, reward models)
runs its objective's batches, `objectives.rl.run` samples, scores and updates (reinforce, ppo);
both write checkpoints with `checkpointing.report_checkpoint` and report step times with
`metrics.steady_step_time`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("raylib.train")


@dataclass
class Setup:
    accelerator: Any
    device_type: str
    tokenizer: Any
    method: Any
    model: Any  # the method applied, not yet prepared by the accelerator
    trainable: int
    total: int


def setup(job, use_gpu: bool = False, head: str | None = None) -> Setup:
    """Seeded first, so every rank (and a rerun) starts from the same trainable weights."""
    import torch

    from raylib import backends, models, noise
    from raylib.methods import get_method

    device_type = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    noise.quiet_libraries(device_type)
    torch.manual_seed(job.train.seed)
    accelerator = backends.make_accelerator(job, device_type)
    tokenizer = models.load_tokenizer(job.model)
    method = get_method(job.method.name)
    model = models.load_model(job.model, accelerator.device, trains_weights=method.trains_base_weights, head=head)
    if head is not None:  # the score is read at the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if job.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = method.apply(model, job)
    trainable, total = models.count_parameters(model)
    if accelerator.process_index == 0:
        log.info("%s: %s trainable of %s parameters (%.3f%%)", job.method.name, f"{trainable:,}", f"{total:,}",
                 100 * trainable / total)
    return Setup(accelerator, device_type, tokenizer, method, model, trainable, total)


@dataclass(frozen=True)
class Cadence:
    """When a loop evaluates and checkpoints: every `train.checkpoint_every` steps a checkpoint,
    every `train.eval_every` (default: the checkpoint cadence) an eval, and both at the end."""

    total_steps: int
    checkpoint_every: int
    eval_every: int

    @classmethod
    def of(cls, job, total_steps: int) -> "Cadence":
        every = job.train.checkpoint_every
        return cls(total_steps, every, job.train.eval_every if job.train.eval_every is not None else every)

    def at(self, step: int) -> tuple[bool, bool, bool]:
        """(at the end, evaluate now, checkpoint now) after optimizer step `step`."""
        end = step >= self.total_steps
        return (end, end or bool(self.eval_every and step % self.eval_every == 0),
                end or bool(self.checkpoint_every and step % self.checkpoint_every == 0))
