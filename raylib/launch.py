"""From a validated job to a Ray Train run, and from its result to a published expert.

Local mode is this same code path with one worker on an embedded `ray.init()`.
Everything a user can get wrong is checked before Ray starts (`preflight`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import yaml

from raylib import data as data_mod
from raylib import models
from raylib.config import JobConfig
from raylib.errors import ConfigError, TrainingFailed
from raylib.experts import EXPERT_FILE

log = logging.getLogger("raylib")

CHECKPOINTS = "checkpoints"  # Ray Train run name: checkpoints live in <output.dir>/checkpoints/
SNAPSHOT = "checkpoint_manager_snapshot.json"  # written by Ray Train V2 once a run has state


@dataclass
class RunResult:
    expert_dir: str
    checkpoint_dir: str | None
    metrics: dict[str, Any]


# --------------------------------------------------------------------------- before Ray


def _is_uri(path: str) -> bool:
    return "://" in path


def resolve_paths(job: JobConfig) -> JobConfig:
    """Relative paths -> absolute, against this process's cwd.

    Ray Train workers run in a directory of Ray's own, so a relative path would not mean
    there what the user meant here.
    """
    job = job.model_copy(deep=True)

    def absolute(p: str | None) -> str | None:
        if p is None or _is_uri(p) or p.startswith("hf:") or os.path.isabs(p):
            return p
        return os.path.abspath(os.path.expanduser(p))

    if os.path.exists(job.model.path):
        job.model.path = absolute(job.model.path)
    if job.model.tokenizer and os.path.exists(job.model.tokenizer):
        job.model.tokenizer = absolute(job.model.tokenizer)
    job.data.train = absolute(job.data.train)
    job.data.eval = absolute(job.data.eval)
    job.output.dir = absolute(job.output.dir)
    return job


def has_run(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, CHECKPOINTS, SNAPSHOT))


def preflight(job: JobConfig, resume: bool = False) -> data_mod.DataReport:
    """Every check that needs no cluster. Raises ConfigError/DataError."""
    models.preflight(job)
    report = data_mod.preflight(job)
    out = job.output.dir
    if not _is_uri(out):
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConfigError("output.dir", f"{out!r} is a file", "choose a directory path")
        parent = out
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise ConfigError("output.dir", f"{out!r} is not writable (no write permission on {parent!r})", "choose a writable directory")
        if has_run(out) and not resume:
            raise ConfigError(
                "output.dir",
                f"{out!r} already holds a run",
                "pass --resume to continue it, or set output.dir to a new directory",
            )
        if resume and not has_run(out):
            raise ConfigError("--resume", f"there is no run to resume in {out!r}", "drop --resume to start a new run")
    return report


# --------------------------------------------------------------------------- Ray


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` / $RAY_ADDRESS, or start an embedded local Ray.

    With neither, this always starts a fresh embedded Ray (`address="local"`), never a
    cluster Ray happens to find on the machine; `--address auto` opts into that.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})


def _use_gpu(setting, num_workers: int) -> bool:
    import ray

    if setting != "auto":
        return bool(setting)
    return ray.cluster_resources().get("GPU", 0) >= num_workers


def train(
    job: JobConfig,
    *,
    address: str | None = None,
    local: bool = False,
    resume: bool = False,
    show_progress: bool = True,
) -> RunResult:
    """Validate, run the job on Ray Train, publish the final expert at `output.dir`."""
    import ray

    from raylib.progress import ProgressPrinter, ProgressSink

    job = resolve_paths(job)
    if local:
        job.scaling.num_workers = 1
    preflight(job, resume=resume)
    out = job.output.dir
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "job.yaml"), "w") as f:
        yaml.safe_dump(job.to_dict(), f, sort_keys=False)

    from raylib.tracking import Tracker, write_loss_curve

    connect(address)
    sink = ProgressSink.remote()
    trainer = build_trainer(job, storage_path=out, progress_sink=sink)
    started = time.time()
    tracker = Tracker(job, out)
    printer = ProgressPrinter(sink, os.path.join(out, "metrics.jsonl"), enabled=show_progress, listeners=[tracker])
    try:
        with printer:
            result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and friends
        tracker.close("FAILED")
        write_loss_curve(out)
        raise TrainingFailed(_failure_summary(exc, out)) from exc
    finally:
        ray.kill(sink)
    run = finish_run(result, out, started)
    tracker.close("FINISHED", run.metrics)
    return run


def finish_run(result, out: str, started: float) -> RunResult:
    """A finished Ray Train result -> the expert published at `out` plus run.json."""
    if result.checkpoint is None:
        raise TrainingFailed(f"the run finished without a checkpoint; see {out}/metrics.jsonl and the Ray logs")
    ckpt_dir = result.checkpoint.path
    metrics = dict(result.metrics or {})
    metrics["wall_time_s"] = round(time.time() - started, 2)
    publish_expert(os.path.join(ckpt_dir, "expert"), out)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump({"checkpoint": ckpt_dir, "expert": out, "metrics": metrics}, f, indent=2, default=str)
    from raylib.tracking import write_loss_curve

    write_loss_curve(out, ckpt_dir)
    return RunResult(expert_dir=out, checkpoint_dir=ckpt_dir, metrics=metrics)


def build_trainer(job: JobConfig, *, storage_path: str, progress_sink=None, callbacks: list | None = None):
    """The TorchTrainer for a validated job (shared by `train` and each `tune` trial).

    Ray Train keeps the run under `<storage_path>/checkpoints/` and restores it from there
    when the same trainer is built again (driver restart, resumed search).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from raylib.train_loop import train_worker

    use_gpu = _use_gpu(job.scaling.use_gpu, job.scaling.num_workers)
    resources = dict(job.scaling.resources_per_worker)
    if use_gpu:
        resources.setdefault("GPU", 1)
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": job.to_dict(), "progress": progress_sink, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(
            num_workers=job.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=job.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=CHECKPOINTS,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's INFO goes to its log files
            callbacks=callbacks or None,
        ),
    )


def publish_expert(src: str, dest: str) -> None:
    """Copy the final checkpoint's expert to `dest`; expert.json last marks it complete."""
    os.makedirs(dest, exist_ok=True)
    marker = os.path.join(dest, EXPERT_FILE)
    if os.path.exists(marker):
        os.remove(marker)
    for name in os.listdir(src):
        if name == EXPERT_FILE:
            continue
        s, d = os.path.join(src, name), os.path.join(dest, name)
        if os.path.isdir(s):
            shutil.copytree(s, d, dirs_exist_ok=True)
        else:
            shutil.copy2(s, d + ".tmp")
            os.replace(d + ".tmp", d)
    shutil.copy2(os.path.join(src, EXPERT_FILE), marker + ".tmp")
    os.replace(marker + ".tmp", marker)


def _failure_summary(exc: Exception, out: str) -> str:
    import ray

    cause = exc
    while getattr(cause, "__cause__", None) is not None and cause.__cause__ is not cause:
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(cause).__name__)
    logs = "the Ray logs"
    try:
        logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # not on the head node: the job's own log holds the worker output
        pass
    return (
        f"training failed: {type(cause).__name__}: {last[:500]}. "
        f"Worker output is in {logs}; metrics so far in {out}/metrics.jsonl; "
        f"rerun with --resume to continue from the last checkpoint."
    )


def print_summary(result: RunResult, stream=sys.stdout) -> None:
    m = result.metrics
    before, after = m.get("eval_loss_before"), m.get("eval_loss")
    if isinstance(before, float) and isinstance(after, float):
        print(f"eval loss: {before:.4f} -> {after:.4f} ({after - before:+.4f})", file=stream)
    if m.get("step_time_p50"):
        print(f"steps: {m.get('step')}, median step {m['step_time_p50'] * 1000:.1f} ms, packing efficiency {m.get('packing_efficiency', 0):.3f}", file=stream)
    print(f"expert saved to {result.expert_dir}", file=stream)
    if result.checkpoint_dir:
        print(f"last checkpoint: {result.checkpoint_dir}", file=stream)
