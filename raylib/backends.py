"""Training backends: how the worker loop wraps model, optimizer and data for distribution.

`accelerate` (the default) wraps the model in DDP over the process group Ray Train already
set up (gloo on CPU, NCCL on GPU), with mixed precision and gradient accumulation.
"""

from __future__ import annotations


def resolve_mixed_precision(setting: str, device_type: str) -> str:
    """`auto` -> bf16 autocast on a bf16-capable GPU, none on CPU (CPU autocast is slow)."""
    if setting != "auto":
        return setting
    if device_type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(job, device_type: str):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        cpu=device_type == "cpu",
        mixed_precision=resolve_mixed_precision(job.backend.mixed_precision, device_type),
        gradient_accumulation_steps=job.train.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
    )


def build_optimizer(model, train_cfg):
    """Optimizer over the trainable parameters; no weight decay on biases and norms."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    name = train_cfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=0.9)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, lr=train_cfg.lr)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(groups, lr=train_cfg.lr)
    raise ValueError(f"unknown optimizer {name!r}")
