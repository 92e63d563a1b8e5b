"""What every objective's training loop shares (litgpt-style setup -> fit).

`setup` builds, once and the same way for every objective: the seeded accelerator (Accelerate
or DeepSpeed, `backends.make_accelerator`), the tokenizer, the method, the base model with the
method applied (a reward head when the objective asks for one), and the parameter counts.

`fit` is the one training loop: LR schedule, resume from the latest checkpoint (or the eval
before the first step), the start/step/eval progress events, the eval and checkpoint cadence
(`Cadence`), the checkpoints (`checkpointing.report_checkpoint`), step times and the final
report. What differs between objectives is only what one optimizer step is, and that is a
`Steps` object:

- `train_loop.BatchSteps` (sft, classification, dpo/orpo/simpo/kto, reward models): the
  objective's batches, `train.grad_accum` of them per optimizer step;
- `objectives.rl.RolloutSteps` (reinforce, ppo): sample, score, update.

grpo is TRL's `GRPOTrainer`, whose own loop runs inside the worker (`objectives.rl.run_grpo`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

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
    if job.train.gradient_checkpointing and job.backend.name != "fsdp":  # fsdp: Accelerate's, per block (backends)
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


#: eval metrics kept per eval in the run's history (train_state, run.json), and (but "step") as
#: `<name>_before` from the eval before the first step
HISTORY_KEYS = ("step", "eval_loss", "eval_token_accuracy", "eval_reward_accuracy", "eval_reward_margin",
                "eval_reward", "reward", "eval_accuracy", "eval_macro_f1")


class Steps(Protocol):
    """One objective's optimizer step, as `fit` drives it. `evaluate` and `window` are
    collectives: every rank calls them at the same steps."""

    setup: Setup
    total_steps: int
    optimizer: Any
    unwrapped: Any  # the trained module for eval and checkpoints (not the DDP/DeepSpeed wrapper)
    engine: Any  # the DeepSpeed engine, or None
    modules: dict | None  # training-only modules checkpointed beside the expert (PPO's value head)
    data_summary: str  # what the data report says, for the start event

    def train_step(self, state) -> None:
        """Forward, backward and one optimizer step; advance the data position in `state`."""

    def window(self, state, elapsed: float) -> dict:
        """The training metrics since the last call (loss, tokens/s, rewards, ...), reduced over
        the ranks, and reset; add the tokens seen to `state.tokens_seen`."""

    def evaluate(self) -> dict:
        """The objective's eval metrics on data.eval ({} without eval data)."""

    def run_metrics(self) -> dict:
        """Numbers every report carries besides the step's (data report, packing efficiency)."""


def fit(job, session, steps: Steps) -> dict[str, Any]:
    """Train `steps` to `steps.total_steps` with every run's schedule, resume, progress, eval
    and checkpoints; `session` is Ray Train's (`train_loop.RaySession`) or a plain one."""
    import torch
    from transformers import get_scheduler

    from raylib import best, checkpointing
    from raylib.checkpointing import TrainState
    from raylib.metrics import steady_step_time

    built, total_steps = steps.setup, steps.total_steps
    accelerator, device_type, method = built.accelerator, built.device_type, built.method
    rank, world = accelerator.process_index, accelerator.num_processes
    node_ids = worker_node_ids(world)  # where each rank runs: placement evidence (SPREAD)
    scheduler = get_scheduler(job.train.lr_scheduler, steps.optimizer,
                              num_warmup_steps=int(job.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    method.begin_training(steps.unwrapped, total_steps)

    resume_dir = session.latest_checkpoint_dir()
    if resume_dir:
        state = checkpointing.restore(resume_dir, method=method, model=steps.unwrapped, optimizer=steps.optimizer,
                                      scheduler=scheduler, engine=steps.engine, modules=steps.modules)
        log.info("rank %d resumed from %s at step %d", rank, resume_dir, state.step)
    else:
        state = TrainState()
        before = steps.evaluate()
        state.eval_loss_before = before.get("eval_loss")
        state.eval_before = {k: before[k] for k in HISTORY_KEYS if k in before and k not in ("step", "eval_loss")}
    last_saved = state.step if resume_dir else -1
    base_metrics = {
        "objective": job.objective.name,
        "trainable_params": built.trainable,
        "total_params": built.total,
        "total_steps": total_steps,
        "world_size": world,
        "worker_node_ids": ",".join(node_ids),
        "num_nodes": len(set(node_ids)),
        "device": device_type,
        "torch_threads": torch.get_num_threads(),
        "mixed_precision": str(accelerator.mixed_precision),
    }
    session.progress({
        "type": "start", "total_steps": total_steps, "step": state.step, "trainable_params": built.trainable,
        "total_params": built.total, "eval_loss_before": state.eval_loss_before, "data": steps.data_summary,
        "resumed_from": resume_dir, "pid": os.getpid(), "node_ids": node_ids,
        "world_size": world, "device": device_type, "torch_threads": torch.get_num_threads(),
    })

    cadence = Cadence.of(job, total_steps)
    stopping, publish = best.early_stopping(job), best.publish_best(job)
    if stopping is not None and not resume_dir:  # the base's eval is the value to beat
        stopping.update(state, {"step": 0, **before})
    step_times: list[float] = []
    t_window = t_step = time.perf_counter()
    while state.step < total_steps and not state.stopped_early:
        steps.train_step(state)
        scheduler.step()
        state.step += 1
        now = time.perf_counter()
        step_times.append(now - t_step)
        t_step = now
        at_end, do_eval, do_ckpt = cadence.at(state.step)
        do_eval = do_eval or (do_ckpt and publish is not None)  # every checkpoint carries the metric it is ranked by
        # every report carries the training metrics of its own step's window
        if state.step % job.train.log_every == 0 or do_eval or do_ckpt:
            window = {**steps.window(state, max(now - t_window, 1e-9)), "lr": scheduler.get_last_lr()[0]}
            session.progress({"type": "step", "step": state.step, "total_steps": total_steps, "epoch": state.epoch,
                              **window})
            t_window = time.perf_counter()
        if not (do_eval or do_ckpt):
            continue
        metrics = {**base_metrics, **steps.run_metrics(), **window, "step": state.step, "epoch": state.epoch,
                   "tokens_seen": state.tokens_seen, "eval_loss_before": state.eval_loss_before,
                   **{f"{k}_before": v for k, v in state.eval_before.items()}}
        if do_eval:
            metrics.update(steps.evaluate())
            state.history.append({k: metrics[k] for k in HISTORY_KEYS if k in metrics})
            if publish is not None and publish.update(state, metrics):
                do_ckpt = True  # the best eval so far always has a checkpoint
            if stopping is not None:
                stopping.update(state, metrics)
                state.stopped_early = stopping.stop_reason(state)
                if state.stopped_early:
                    at_end = do_ckpt = True
                    metrics["stopped_early"] = state.stopped_early
                    log.info("rank %d: early stopping at step %d: %s", rank, state.step, state.stopped_early)
            session.progress({"type": "eval", **metrics})
        if at_end:
            metrics["step_time_p50"] = steady_step_time(step_times)
            metrics["peak_rss_mb"] = peak_rss_mb(accelerator)
            if device_type == "cuda":  # this rank's high-water mark of allocated GPU memory
                metrics["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if do_ckpt:
            checkpointing.report_checkpoint(session, job, method, steps.unwrapped, built.tokenizer, steps.optimizer,
                                            scheduler, state, metrics, rank, steps.engine, modules=steps.modules)
            last_saved = state.step
        else:
            session.report(metrics, None, None)
        t_step = time.perf_counter()  # eval/checkpoint time is not step time

    if last_saved != state.step:  # resumed from the final checkpoint: nothing left to save
        final = {**base_metrics, "step": state.step}
        if state.stopped_early:
            final["stopped_early"] = state.stopped_early
        session.report(final, None, None)
    return {"step": state.step, "step_times": step_times, "state": state, "model": steps.unwrapped,
            **steps.run_metrics()}


def peak_rss_mb(accelerator) -> float:
    """The largest high-water mark of resident memory over the ranks (collective): what a
    worker needs in host memory, e.g. with the whole dataset in it or only its stream."""
    import resource

    import torch

    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return accelerator.reduce(torch.tensor([mine], dtype=torch.float64, device=accelerator.device),
                              reduction="max").item() if accelerator.num_processes > 1 else mine


def worker_node_ids(world: int) -> list[str]:
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
