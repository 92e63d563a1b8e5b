"""The per-worker training loop. Reads top to bottom:

    load tokenizer + base model -> apply the method -> data -> optimizer/scheduler
    -> (resume from the latest checkpoint) -> eval before -> train steps with periodic
    eval and checkpoints -> final eval + final checkpoint (which holds the expert).

`train_worker` is what Ray Train runs in every worker. `run` takes a `session` so the same
loop also runs without Ray (`PlainSession`), which the overhead benchmark uses as baseline.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

from raylib import backends, checkpointing, recipe
from raylib.checkpointing import TrainState
from raylib.metrics import steady_step_time
from raylib.objectives import WORKER_LOOP_OBJECTIVES, loop_objective

log = logging.getLogger("raylib.train")

#: eval metrics kept per eval in the run's history (train_state, run.json)
HISTORY_KEYS = ("step", "eval_loss", "eval_token_accuracy", "eval_reward_accuracy", "eval_reward_margin")


# --------------------------------------------------------------------------- sessions


class RaySession:
    """Ray Train's view of the run: rank, resume checkpoint, reports, progress events."""

    def __init__(self, progress_sink=None):
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self._sink = progress_sink

    def latest_checkpoint_dir(self) -> str | None:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            return None
        # local storage: the directory itself; remote storage (s3://, gs://, ...): a local copy
        import pyarrow.fs

        local = isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem) and os.path.isdir(ckpt.path)
        return ckpt.path if local else ckpt.to_directory()

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str | None) -> None:
        ckpt = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name if ckpt else None)

    def progress(self, event: dict) -> None:
        if self._sink is not None and self.rank == 0:
            self._sink.push.remote(event)  # fire and forget: never blocks a step


class PlainSession:
    """One process, no Ray: checkpoints go to `ckpt_root`, reports are kept in memory."""

    rank, world = 0, 1

    def __init__(self, ckpt_root: str | None = None, resume_from: str | None = None):
        self.ckpt_root = ckpt_root or tempfile.mkdtemp(prefix="raylib-plain-")
        self.resume_from = resume_from
        self.reports: list[dict] = []
        self.events: list[dict] = []

    def latest_checkpoint_dir(self) -> str | None:
        return self.resume_from

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str | None) -> None:
        if checkpoint_dir:
            import shutil

            dest = os.path.join(self.ckpt_root, name or "checkpoint")
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
            metrics = {**metrics, "checkpoint": dest}
        self.reports.append(metrics)

    def progress(self, event: dict) -> None:
        self.events.append(event)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point, run in every worker."""
    from raylib.config import JobConfig

    job = JobConfig.model_validate(config["job"])
    if job.objective.name not in WORKER_LOOP_OBJECTIVES:  # RL objectives have their own loop
        from raylib.objectives import rl

        return rl.run(job, RaySession(config.get("progress")), use_gpu=config.get("use_gpu", False))
    run(job, RaySession(config.get("progress")), use_gpu=config.get("use_gpu", False))


# --------------------------------------------------------------------------- the loop


def run(job, session, use_gpu: bool = False) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    objective = loop_objective(job)  # what a batch is, the loss, the eval (and a reward head)
    built = recipe.setup(job, use_gpu, head=getattr(objective, "model_head", None))
    accelerator, device_type, tokenizer, method, model = (built.accelerator, built.device_type, built.tokenizer,
                                                          built.method, built.model)
    trainable, total = built.trainable, built.total
    rank, world = accelerator.process_index, accelerator.num_processes
    node_ids = _worker_node_ids(world)  # where each rank runs: placement evidence (SPREAD)

    # data (heads may cache backbone features here)
    prepared = objective.prepare(job, tokenizer, model, accelerator.device)
    collator = objective.collator(job, tokenizer)
    loader = DataLoader(prepared.train, batch_size=job.train.batch_size, shuffle=True, collate_fn=collator)

    # optimizer, distribution, schedule
    optimizer = backends.build_optimizer(model, job.train)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / job.train.grad_accum)
    total_steps = job.train.max_steps or steps_per_epoch * job.train.epochs
    scheduler = get_scheduler(
        job.train.lr_scheduler,
        optimizer,
        num_warmup_steps=int(job.train.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    unwrapped = accelerator.unwrap_model(model)
    engine = backends.deepspeed_engine(accelerator, model)  # None on the accelerate backend
    method.begin_training(unwrapped, total_steps)

    def evaluate() -> dict:
        if not prepared.eval:
            return {}
        return objective.evaluate(
            unwrapped, prepared.eval, collator, job.train.batch_size, rank, world, accelerator.device,
            lambda t: accelerator.reduce(t, reduction="sum"),
            lockstep=backends.needs_lockstep(engine),
        )

    # resume or start
    resume_dir = session.latest_checkpoint_dir()
    if resume_dir:
        state = checkpointing.restore(resume_dir, method=method, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                                      engine=engine)
        log.info("rank %d resumed from %s at step %d", rank, resume_dir, state.step)
    else:
        state = TrainState()
        before = evaluate()
        state.eval_loss_before = before.get("eval_loss")
        state.eval_before = {k: before[k] for k in HISTORY_KEYS if k in before and k not in ("step", "eval_loss")}
    last_saved = state.step if resume_dir else -1
    base_metrics = {
        "trainable_params": trainable,
        "total_params": total,
        "total_steps": total_steps,
        "world_size": world,
        "worker_node_ids": ",".join(node_ids),
        "num_nodes": len(set(node_ids)),
        "device": device_type,
        "torch_threads": torch.get_num_threads(),
        "mixed_precision": str(accelerator.mixed_precision),
        **prepared.report.as_metrics(),
    }
    session.progress({
        "type": "start", "total_steps": total_steps, "step": state.step, "trainable_params": trainable,
        "total_params": total, "eval_loss_before": state.eval_loss_before, "data": prepared.report.summary(),
        "resumed_from": resume_dir, "pid": os.getpid(), "node_ids": node_ids,
        "world_size": world, "device": device_type, "torch_threads": torch.get_num_threads(),
    })

    cadence = recipe.Cadence.of(job, total_steps)
    window = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss*n, label tokens, tokens
    step_times: list[float] = []
    padded = real = 0
    t_window = t_step = time.perf_counter()
    model.train()

    while state.step < total_steps:
        loader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
        for batch in batches:
            n_tokens = batch.pop("num_tokens")
            n_labels = (batch["labels"] != -100).sum()
            padded += batch["input_ids"].numel() if "input_ids" in batch else int(n_tokens)  # cached features
            real += int(n_tokens)
            with accelerator.accumulate(model):
                loss = objective.loss(model, batch)
                if engine is not None:  # DeepSpeed: backward, (the method's look at the grads), step
                    backends.engine_backward_and_step(
                        engine, loss, accelerator.sync_gradients,
                        before_step=lambda: method.before_engine_step(unwrapped, state.step, engine))
                else:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and job.train.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), job.train.max_grad_norm)
                optimizer.step()  # a no-op under DeepSpeed (the engine stepped)
                if accelerator.sync_gradients:
                    method.after_step(unwrapped, state.step, engine)  # gradients still there (AdaLoRA)
                optimizer.zero_grad()
            window += torch.stack([loss.detach().double() * n_labels, n_labels.double(), n_tokens.double()])
            state.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue

            scheduler.step()
            state.step += 1
            now = time.perf_counter()
            step_times.append(now - t_step)
            t_step = now

            if state.step % job.train.log_every == 0 or state.step == total_steps:
                sums = accelerator.reduce(window, reduction="sum")
                elapsed = max(now - t_window, 1e-9)
                state.tokens_seen += int(sums[2].item())
                session.progress({
                    "type": "step", "step": state.step, "total_steps": total_steps, "epoch": state.epoch,
                    "loss": sums[0].item() / max(sums[1].item(), 1.0), "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": sums[2].item() / elapsed,
                })
                window.zero_()
                t_window = time.perf_counter()

            at_end, do_eval, do_ckpt = cadence.at(state.step)
            if do_eval or do_ckpt:
                metrics = {**base_metrics, "step": state.step, "epoch": state.epoch, "tokens_seen": state.tokens_seen,
                           "eval_loss_before": state.eval_loss_before, "packing_efficiency": real / max(padded, 1),
                           **{f"{k}_before": v for k, v in state.eval_before.items()}}
                if do_eval:
                    metrics.update(evaluate())
                    state.history.append({k: metrics[k] for k in HISTORY_KEYS if k in metrics})
                    session.progress({"type": "eval", **metrics})
                if at_end:
                    metrics["step_time_p50"] = steady_step_time(step_times)
                    if device_type == "cuda":  # this rank's high-water mark of allocated GPU memory
                        metrics["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
                if do_ckpt:
                    checkpointing.report_checkpoint(session, job, method, unwrapped, tokenizer, optimizer, scheduler,
                                                   state, metrics, rank, engine)
                    last_saved = state.step
                else:
                    session.report(metrics, None, None)
                t_step = time.perf_counter()  # eval/checkpoint time is not step time
            if at_end:
                break
        else:  # the epoch ran out before total_steps
            state.epoch += 1
            state.batches_in_epoch = 0

    if last_saved != state.step:  # resumed from the final checkpoint: nothing left to save
        session.report({**base_metrics, "step": state.step}, None, None)
    return {"step": state.step, "step_times": step_times, "packing_efficiency": real / max(padded, 1), "state": state,
            "model": unwrapped}


def _worker_node_ids(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (empty outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        node = ray.get_runtime_context().get_node_id()
    except Exception:
        return []
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        ids: list = [None] * world
        dist.all_gather_object(ids, node)
        return [str(i) for i in ids]
    return [node]
