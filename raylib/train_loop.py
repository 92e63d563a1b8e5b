"""What Ray Train runs in every worker, and the batch objectives' optimizer step.

`train_worker` is the Ray Train entry point: it picks the objective's `Steps` (`BatchSteps`
here for sft, classification, preference and reward models; `objectives.rl.RolloutSteps` for
reinforce and ppo; TRL's trainer for grpo) and hands them to `recipe.fit`, the one loop
(schedule, resume, progress, eval and checkpoint cadence). `run` takes a `session` so the
same loop also runs without Ray (`PlainSession`), which the overhead benchmark uses as
baseline.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

from raylib import backends, recipe
from raylib.objectives import BATCH_OBJECTIVES, loop_objective

log = logging.getLogger("raylib.train")


# --------------------------------------------------------------------------- sessions


class RaySession:
    """Ray Train's view of the run: rank, resume checkpoint, reports, progress events."""

    def __init__(self, progress_sink=None):
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self._sink = progress_sink
        self._last_push = None  # the latest progress event's push (rank 0)

    def latest_checkpoint_dir(self) -> str | None:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            return None
        # local storage: the directory itself; remote storage (s3://, gs://, ...): a local copy
        import pyarrow.fs

        local = isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem) and os.path.isdir(ckpt.path)
        return ckpt.path if local else ckpt.to_directory()

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str | None) -> None:
        self._flush_progress()
        ckpt = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name if ckpt else None)

    def progress(self, event: dict) -> None:
        if self._sink is not None and self.rank == 0:
            self._last_push = self._sink.push.remote(event)  # fire and forget: never blocks a step

    def _flush_progress(self) -> None:
        """Wait until the sink has taken every event pushed so far (one caller's calls to an
        actor run in order, so the latest is enough). Without it the run's last step and eval
        events could still be in flight when fit() returns and the driver closes its trackers:
        a loaded machine lost step 6 of 6 from a W&B run."""
        if self._last_push is None:
            return
        import ray

        try:
            ray.get(self._last_push, timeout=30)
        except Exception:  # the driver is gone or shutting down: progress is best effort
            pass
        self._last_push = None


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
    session, use_gpu = RaySession(config.get("progress")), config.get("use_gpu", False)
    run(job, session, use_gpu=use_gpu, streamed=config.get("data"))


# --------------------------------------------------------------------------- the steps


def run(job, session, use_gpu: bool = False, streamed: dict | None = None) -> dict[str, Any]:
    """Train one job in this process, whatever its objective: `recipe.fit` over `BatchSteps`,
    or for reinforce/ppo/grpo `objectives.rl.run`. `streamed`: the driver's Ray Data ingestion
    info (`ingest.build`) when the data streams (batch objectives only)."""
    if job.objective.name not in BATCH_OBJECTIVES:  # reinforce, ppo (RolloutSteps) and grpo (TRL)
        from raylib.objectives import rl

        return rl.run(job, session, use_gpu=use_gpu)
    return recipe.fit(job, session, BatchSteps(job, use_gpu, streamed))


class BatchSteps:
    """sft, classification, dpo/orpo/simpo/kto and reward models: the objective (what a batch
    is, the loss, the eval; `objectives.loop_objective`) over a DataLoader of its prepared
    data, `train.grad_accum` micro-batches per optimizer step (Accelerate's `accumulate`, or
    the DeepSpeed engine's own step). The data is prepared here (`loader: local`) or streamed
    from the Ray Data shard the driver prepared (`streamed`, `ingest.ShardLoader`)."""

    def __init__(self, job, use_gpu: bool = False, streamed: dict | None = None):
        import torch
        from torch.utils.data import DataLoader

        self.job = job
        self.objective = objective = loop_objective(job)
        self.setup = built = recipe.setup(job, use_gpu, head=getattr(objective, "model_head", None))
        accelerator = built.accelerator
        self.collator = objective.collator(job, built.tokenizer)
        optimizer = backends.build_optimizer(built.model, job.train)
        self.streamed = streamed is not None
        if self.streamed:
            from raylib import data, ingest

            self.loader, evals, report = ingest.worker_data(streamed, job, accelerator.num_processes, self.collator,
                                                            accelerator.device)
            self.prepared = data.Prepared([], evals, report)
            self.model, self.optimizer = accelerator.prepare(built.model, optimizer)
        else:  # data (heads may cache backbone features here)
            cpu_started = time.process_time()
            self.prepared = objective.prepare(job, built.tokenizer, built.model, accelerator.device)
            spent = torch.tensor([time.process_time() - cpu_started], dtype=torch.float64, device=accelerator.device)
            self.prepared.report.prepare_cpu_s = accelerator.reduce(spent, reduction="sum").item()  # every rank's
            loader = DataLoader(self.prepared.train, batch_size=job.train.batch_size, shuffle=True,
                                collate_fn=self.collator)
            self.model, self.optimizer, self.loader = accelerator.prepare(built.model, optimizer, loader)
        self.total_steps = job.train.max_steps or math.ceil(len(self.loader) / job.train.grad_accum) * job.train.epochs
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.engine = backends.deepspeed_engine(accelerator, self.model)  # None on the accelerate backend
        self.modules = None
        self.data_summary = self.prepared.report.summary()
        self._window = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss*n, label tokens, tokens
        self._padded = self._real = 0
        self._batches = None  # the micro-batch stream, opened at the first step (after a resume)

    def _micro_batches(self, state):
        """The loader's batches from the data position in `state` on, epoch after epoch."""
        while True:
            skip = state.batches_in_epoch
            if self.streamed:
                yield from self.loader.epoch(state.epoch, skip)
            else:
                self.loader.set_epoch(state.epoch)
                yield from (self.setup.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader)
            state.epoch += 1
            state.batches_in_epoch = 0

    def train_step(self, state) -> None:
        import torch

        accelerator, model, method, engine = self.setup.accelerator, self.model, self.setup.method, self.engine
        if self._batches is None:
            self._batches = self._micro_batches(state)
        model.train()
        for batch in self._batches:
            n_tokens = batch.pop("num_tokens")
            n_padded = batch.pop("num_padded", None)  # encoder-decoders: both sides
            n_labels = (batch["labels"] != -100).sum()
            if n_padded is not None:
                self._padded += int(n_padded)
            else:
                self._padded += batch["input_ids"].numel() if "input_ids" in batch else int(n_tokens)  # cached features
            self._real += int(n_tokens)
            with accelerator.accumulate(model):
                loss = self.objective.loss(model, batch)
                if engine is not None:  # DeepSpeed: backward, (the method's look at the grads), step
                    backends.engine_backward_and_step(
                        engine, loss, accelerator.sync_gradients,
                        before_step=lambda: method.before_engine_step(self.unwrapped, state.step, engine))
                else:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and self.job.train.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), self.job.train.max_grad_norm)
                self.optimizer.step()  # a no-op under DeepSpeed (the engine stepped)
                if accelerator.sync_gradients:
                    method.after_step(self.unwrapped, state.step, engine)  # gradients still there (AdaLoRA)
                self.optimizer.zero_grad()
            self._window += torch.stack([loss.detach().double() * n_labels, n_labels.double(), n_tokens.double()])
            state.batches_in_epoch += 1
            if accelerator.sync_gradients:
                return

    def window(self, state, elapsed: float) -> dict:
        sums = self.setup.accelerator.reduce(self._window, reduction="sum")
        self._window.zero_()
        state.tokens_seen += int(sums[2].item())
        return {"loss": sums[0].item() / max(sums[1].item(), 1.0), "tokens_per_s": sums[2].item() / elapsed}

    def evaluate(self) -> dict:
        if not self.prepared.eval:
            return {}
        accelerator = self.setup.accelerator
        return self.objective.evaluate(
            self.unwrapped, self.prepared.eval, self.collator, self.job.train.batch_size, accelerator.process_index,
            accelerator.num_processes, accelerator.device, lambda t: accelerator.reduce(t, reduction="sum"),
            lockstep=backends.needs_lockstep(self.engine, self.model),
        )

    def run_metrics(self) -> dict:
        return {**self.prepared.report.as_metrics(), "packing_efficiency": self._real / max(self._padded, 1),
                "data_loader": "ray" if self.streamed else "local"}
