"""Training checkpoints: a directory Ray Train persists, which is also a usable expert.

Layout of one checkpoint:

    expert/        the trained weights in the method's format + tokenizer + expert.json
    train_state/   optimizer.pt, scheduler.pt, state.json (step, epoch, batch position)
                   (DeepSpeed: deepspeed/ holds the engine checkpoint, every rank's ZeRO
                   shard, instead of optimizer.pt; FSDP2: fsdp/ holds every rank's shard
                   of the trainable weights and optimizer state, torch.distributed.checkpoint)

`state.json` is written last: a checkpoint directory without it is incomplete and is never
resumed from. Ray Train copies the directory to storage and only registers it once the copy
is complete, so a kill mid-write leaves the previous checkpoint as the latest.

$RAYLIB_CHECKPOINT_WRITE_DELAY_S (fault-injection for tests): sleep that long between the
weights and the train state, which widens the window in which a checkpoint is half written
(tests/test_fault_tolerance.py kills the run inside it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from raylib.experts import ExpertInfo, write_expert_json

STATE_FILE = "state.json"
DEEPSPEED_DIR = os.path.join("train_state", "deepspeed")
FSDP_DIR = os.path.join("train_state", "fsdp")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    tokens_seen: int = 0
    eval_loss_before: float | None = None
    eval_before: dict = field(default_factory=dict)  # the other eval metrics before the first step
    history: list = field(default_factory=list)  # eval results: [{"step", "eval_loss", ...}]
    watch: dict = field(default_factory=dict)  # early stopping / publish-best records (raylib.best)
    stopped_early: str | None = None  # why early stopping ended the run


def save(ckpt_dir: str, *, method, model, tokenizer, optimizer, scheduler, state: TrainState, info: ExpertInfo,
         modules: dict | None = None) -> str:
    """`modules`: training-only modules that are not part of the expert (PPO's value head),
    written as train_state/<name>.pt and read back by `restore(modules=...)`."""
    import torch

    expert_dir = os.path.join(ckpt_dir, "expert")
    state_dir = os.path.join(ckpt_dir, "train_state")
    os.makedirs(expert_dir, exist_ok=True)
    os.makedirs(state_dir, exist_ok=True)
    method.save(model, expert_dir)
    tokenizer.save_pretrained(expert_dir)
    write_expert_json(expert_dir, info)
    delay = float(os.environ.get("RAYLIB_CHECKPOINT_WRITE_DELAY_S") or 0)
    if delay:
        import time

        time.sleep(delay)
    method.save_train_state(model, state_dir)
    for name, module in (modules or {}).items():
        torch.save(module.state_dict(), os.path.join(state_dir, f"{name}.pt"))
    if optimizer is not None:  # DeepSpeed / FSDP2: the sharded checkpoint holds the optimizer state
        torch.save(optimizer.state_dict(), os.path.join(state_dir, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(state_dir, "scheduler.pt"))
    tmp = os.path.join(state_dir, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(state), f)
    os.replace(tmp, os.path.join(state_dir, STATE_FILE))
    return ckpt_dir


def is_complete(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, "train_state", STATE_FILE))


def restore(ckpt_dir: str, *, method, model, optimizer, scheduler, engine=None, modules: dict | None = None) -> TrainState:
    import torch

    if not is_complete(ckpt_dir):
        raise RuntimeError(f"checkpoint {ckpt_dir} is incomplete (no train_state/{STATE_FILE})")
    state_dir = os.path.join(ckpt_dir, "train_state")
    from raylib.backends import is_fsdp2

    if engine is not None:  # DeepSpeed: weights + optimizer from the engine's own checkpoint
        from raylib.backends import load_engine_state

        load_engine_state(engine, os.path.join(ckpt_dir, DEEPSPEED_DIR))
    elif is_fsdp2(model):  # FSDP2: every rank reads its shards of the trainable weights + optimizer
        from raylib.backends import load_fsdp_state

        load_fsdp_state(model, optimizer, os.path.join(ckpt_dir, FSDP_DIR))
    else:
        method.load_into(model, os.path.join(ckpt_dir, "expert"))
        optimizer.load_state_dict(torch.load(os.path.join(state_dir, "optimizer.pt"), weights_only=False))
    method.load_train_state(model, state_dir)
    for name, module in (modules or {}).items():
        module.load_state_dict(torch.load(os.path.join(state_dir, f"{name}.pt"), weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(state_dir, "scheduler.pt"), weights_only=False))
    with open(os.path.join(state_dir, STATE_FILE)) as f:
        return TrainState(**json.load(f))


# --------------------------------------------------------------------------- every objective's writer


def report_checkpoint(session, job, method, model, tokenizer, optimizer, scheduler, state, metrics, rank, engine=None,
                      modules: dict | None = None) -> None:
    """Rank 0 writes the checkpoint (DDP replicas are identical); every rank reports.

    Under DeepSpeed every rank also writes its ZeRO shard of the engine state into its own
    temporary directory and reports it under the same name: Ray Train merges the ranks'
    files into one checkpoint directory and registers it only once all ranks reported.
    FSDP2 the same way: every rank's shard under train_state/fsdp/, the expert consolidated.
    """
    import tempfile

    from raylib.backends import is_fsdp2

    name = f"step_{state.step:07d}"
    if engine is not None:
        return _report_deepspeed_checkpoint(session, job, method, model, tokenizer, scheduler, state, metrics, rank, engine, name)
    if is_fsdp2(model):
        return _report_fsdp_checkpoint(session, job, method, model, tokenizer, optimizer, scheduler, state, metrics,
                                       rank, name, modules)
    if rank != 0:
        session.report(metrics, None, name)
        return
    with tempfile.TemporaryDirectory(prefix="raylib-ckpt-") as tmp:
        save(tmp, method=method, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
             state=state, info=expert_info(job, metrics, state), modules=modules)
        session.report(metrics, tmp, name)


def _report_deepspeed_checkpoint(session, job, method, model, tokenizer, scheduler, state, metrics, rank, engine, name) -> None:
    import tempfile

    from raylib.backends import gathered_trainable, save_engine_state

    with tempfile.TemporaryDirectory(prefix="raylib-ckpt-") as tmp:
        save_engine_state(engine, os.path.join(tmp, DEEPSPEED_DIR))  # collective
        with gathered_trainable(model):  # ZeRO-3: whole trainable tensors on every rank
            if rank == 0:
                save(tmp, method=method, model=model, tokenizer=tokenizer, optimizer=None, scheduler=scheduler,
                     state=state, info=expert_info(job, metrics, state))
        session.report(metrics, tmp, name)


def _report_fsdp_checkpoint(session, job, method, model, tokenizer, optimizer, scheduler, state, metrics, rank, name,
                            modules) -> None:
    import tempfile

    from raylib.backends import fsdp_consolidated, save_fsdp_state

    with tempfile.TemporaryDirectory(prefix="raylib-ckpt-") as tmp:
        save_fsdp_state(model, optimizer, os.path.join(tmp, FSDP_DIR))  # collective
        with fsdp_consolidated(model, rank):  # collective: whole trainable tensors on rank 0
            if rank == 0:
                save(tmp, method=method, model=model, tokenizer=tokenizer, optimizer=None, scheduler=scheduler,
                     state=state, info=expert_info(job, metrics, state), modules=modules)
        session.report(metrics, tmp, name)


def expert_info(job, metrics, state) -> ExpertInfo:
    """expert.json of a checkpoint: what trained it, on what, and its numeric metrics."""
    from raylib.models import family

    return ExpertInfo(
        method=job.method.name,
        base_model=job.model.path,
        family=family(job.model),
        domain=job.output.domain,
        template=job.data.template,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None},
        config=job.to_dict(),
        step=state.step,
    )
