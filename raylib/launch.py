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
from urllib.parse import urlsplit

import yaml

from raylib import data as data_mod
from raylib import ingest, models, noise, objectives, storage, tracking
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
    published: dict[str, Any] | None = None  # which checkpoint the expert came from (run.json "published")


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
    return storage.is_file(storage.resolve(output_dir), CHECKPOINTS, SNAPSHOT)


def preflight(job: JobConfig, resume: bool = False, probe: bool = True) -> data_mod.DataReport:
    """Every check that needs no cluster. Raises ConfigError/DataError.

    `output.dir` (a path or a URI) must be writable: a probe object is written and deleted,
    so a wrong bucket, missing credentials or a read-only directory stop the job here.
    """
    out = job.output.dir
    loc = storage.resolve(out)  # rejects credentials in a URI
    if not loc.is_remote and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError("output.dir", f"{out!r} is a file", "choose a directory path")
    if probe:  # first: cheap, and the most common mistake on a cluster
        storage.probe(loc)
    models.preflight(job)
    check_architecture(job)
    ingest.check(job)
    tracking.check(job)
    report = objectives.preflight(job, models.preflight_tokenizer(job))
    if has_run(out) and not resume:
        raise ConfigError(
            "output.dir",
            f"{out!r} already holds a run",
            "pass --resume to continue it, or set output.dir to a new directory",
        )
    if resume and not has_run(out):
        raise ConfigError("--resume", f"there is no run to resume in {out!r}", "drop --resume to start a new run")
    return report


def check_architecture(job: JobConfig) -> None:
    """What the method cannot do on this model's architecture, found from its config alone (a
    meta-device model: no weights): the sequence length against learned position embeddings,
    then the method's own `check_model` (IA3 defaults, target names, SVF's layer types)."""
    from raylib.methods import get_method
    from raylib.methods import layout as layout_mod

    check_family(job)
    layout = layout_mod.from_job(job)
    if layout is None:
        return
    method = get_method(job.method.name)
    layout_mod.check_positions(job, layout, method.added_positions(job))
    method.check_model(job, layout)


def check_family(job: JobConfig) -> None:
    """What each model family trains here: decoder LMs everything; encoders (BERT, RoBERTa,
    DeBERTa) sequence classification (`objective: classification` with `labels`);
    encoder-decoders (T5, BART) SFT from instruction/input to output. And the methods that
    run on the family (`Method.families`). ConfigError naming the field otherwise."""
    from raylib.methods import METHODS, get_method

    fam = models.family(job.model)
    method = get_method(job.method.name)
    if fam not in method.families:
        others = [m.name for m in METHODS.values() if fam in m.families]
        raise ConfigError("method.name", f"{job.method.name!r} does not train {fam} models here: {method.families_reason}",
                          f"use one of {', '.join(others)}")
    objective = job.objective.name
    if fam == "encoder" and not (objective == "classification" and getattr(job.objective, "labels", None)):
        raise ConfigError("objective.name", f"{job.model.path!r} is an encoder ({fam}); encoders train sequence "
                          f"classification here, not {objective}",
                          "set objective: {name: classification, labels: [<class>, ...]} with text/label rows")
    if fam == "seq2seq":
        if objective != "sft":
            raise ConfigError("objective.name", f"{job.model.path!r} is an encoder-decoder; it trains sft here, "
                              f"not {objective}", "set objective.name: sft, or use a decoder-only model")
        if job.data.template != "alpaca":
            raise ConfigError("data.template", f"an encoder-decoder maps instruction/input to output (template "
                              f"alpaca); {job.data.template!r} rows have no such pair", "set data.template: alpaca")
        if job.data.packing and "packing" in job.data.model_fields_set:
            raise ConfigError("data.packing", "an encoder-decoder trains one example per row (no packing)",
                              "remove data.packing")
        if job.objective.loss:
            raise ConfigError("objective.loss", "custom losses get decoder-only model outputs; an encoder-decoder's "
                              "is not wired to them", "remove objective.loss")


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
    noise.filter_ray_driver_output()


def give_local_worker_the_machine(job: JobConfig) -> None:
    """`--local`: the one worker gets every CPU of its node (torch runs that many threads;
    Ray sets OMP_NUM_THREADS from the worker's CPUs) unless the job names
    `scaling.resources_per_worker`. With the default `{CPU: 1}` a local run used one core:
    on 2 cores a LoRA job ran at 328 ms/step against 205 ms/step with both."""
    import ray

    if "resources_per_worker" in job.scaling.model_fields_set:
        return
    cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    job.scaling.resources_per_worker = {"CPU": max(1.0, float(int(cpus)))}


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
    loc = storage.resolve(out)

    from raylib.tracking import Tracker, write_loss_curve

    connect(address)
    if local:
        give_local_worker_the_machine(job)
    # streamed data is prepared on the cluster before any training worker starts (a DataError
    # here spends none); local-loader jobs prepare theirs in the workers
    ingested = ingest.build(job) if ingest.resolve(job) == "ray" else None
    storage.write_text(loc, "job.yaml", yaml.safe_dump(job.to_dict(), sort_keys=False))
    sink = ProgressSink.remote()
    trainer = build_trainer(job, storage_path=out, progress_sink=sink, ingested=ingested)
    started = time.time()
    staging = storage.staging_dir(loc)  # local runs: out itself; remote: a local dir uploaded at the end
    metrics_file = os.path.join(staging, "metrics.jsonl")
    if loc.is_remote:  # start from the run's own log (a resumed run may come from another machine)
        if os.path.exists(metrics_file):
            os.remove(metrics_file)
        if resume and storage.is_file(loc, "metrics.jsonl"):
            with open(metrics_file, "w") as f:
                f.write(storage.read_text(loc, "metrics.jsonl"))
    tracker = Tracker(job, staging)
    printer = ProgressPrinter(sink, metrics_file, enabled=show_progress, listeners=[tracker])
    try:
        with printer:
            result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and friends
        tracker.close("FAILED")
        write_loss_curve(staging)
        _upload_run_files(loc, staging)
        raise TrainingFailed(_failure_summary(exc, out)) from exc
    finally:
        ray.kill(sink)
    try:
        run = finish_run(result, out, started, local_run_dir=staging, job=job)
    except Exception:
        tracker.close("FAILED")
        _upload_run_files(loc, staging)
        raise
    tracker.close("FINISHED", run.metrics)
    _upload_run_files(loc, staging)
    return run


def _upload_run_files(loc: storage.Location, staging: str) -> None:
    """Remote runs: copy what the driver wrote locally (progress log, loss curve, MLflow /
    TensorBoard files) next to the expert. Local runs wrote them in place."""
    if not loc.is_remote:
        return
    for name in ("metrics.jsonl", "loss_curve.png", "tracking.json", "mlruns", "tensorboard", "wandb"):
        path = os.path.join(staging, name)
        try:
            if os.path.isfile(path):
                storage.upload_file(path, loc, name)
            elif os.path.isdir(path):
                storage.upload_dir(path, loc.join(name))
        except Exception as exc:  # the run's outcome matters more than its progress log
            log.warning("could not upload %s to %s: %s", path, loc.uri, exc)


def finish_run(result, out: str, started: float, local_run_dir: str | None = None, job: JobConfig | None = None
               ) -> RunResult:
    """A finished Ray Train result -> the expert published at `out` plus run.json.

    The expert is the last checkpoint's, or the best one's under the job's `output.publish: best`
    (run.json's "published" says which: step and metrics of that checkpoint).

    `out` may be a URI: the final checkpoint's expert is copied there (expert.json last).
    A failure here (a save or upload) is a failed run, never a silent success.
    `local_run_dir` holds the driver's progress log (the run dir itself for local runs, a
    staging dir for remote ones): the loss curve is drawn from it.
    """
    import tempfile

    if result.error is not None:
        raise TrainingFailed(_failure_summary(result.error, out))
    if result.checkpoint is None:
        raise TrainingFailed(f"the run finished without a checkpoint; see {out}/metrics.jsonl and the Ray logs")
    loc = storage.resolve(out)
    ckpt, ckpt_metrics = published_checkpoint(result, job)
    ckpt_dir = ckpt.path if not loc.is_remote else f"{urlsplit(out).scheme}://{ckpt.path}"
    metrics = dict(result.metrics or {})
    metrics["wall_time_s"] = round(time.time() - started, 2)
    which = job.output.publish if job is not None else "last"
    published = {"which": which, "checkpoint": ckpt_dir, "step": ckpt_metrics.get("step"),
                 **{k: v for k, v in ckpt_metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))}}
    try:
        if loc.is_remote:
            with tempfile.TemporaryDirectory(prefix="raylib-expert-") as tmp:
                src = storage.Location(ckpt_dir + "/expert", ckpt.filesystem, ckpt.path + "/expert")
                storage.download_dir(src, tmp)
                storage.delete_file(loc, EXPERT_FILE)
                storage.upload_dir(tmp, loc, last=EXPERT_FILE)
        else:
            publish_expert(os.path.join(ckpt_dir, "expert"), out)
        storage.write_text(loc, "run.json", json.dumps(
            {"checkpoint": ckpt_dir, "expert": out, "published": published, "metrics": metrics}, indent=2,
            default=str))
    except Exception as exc:
        raise TrainingFailed(
            f"training finished but publishing the expert to {out} failed: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:400]}. The last checkpoint is intact at {ckpt_dir} "
            f"(its expert/ subdirectory is the trained expert)."
        ) from exc
    from raylib.tracking import write_loss_curve

    write_loss_curve(local_run_dir or out, ckpt_dir if not loc.is_remote else None)
    return RunResult(expert_dir=out, checkpoint_dir=ckpt_dir, metrics=metrics, published=published)


def build_trainer(job: JobConfig, *, storage_path: str, progress_sink=None, callbacks: list | None = None,
                  ingested: "ingest.Ingested | None" = None):
    """The TorchTrainer for a validated job (shared by `train` and each `tune` trial).

    Ray Train keeps the run under `<storage_path>/checkpoints/` and restores it from there
    when the same trainer is built again (driver restart, resumed search). A job whose data
    streams (`ingest.resolve`) gets its Ray Data datasets (`ingested`, or built here).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from raylib.train_loop import train_worker

    use_gpu = _use_gpu(job.scaling.use_gpu, job.scaling.num_workers)
    resources = dict(job.scaling.resources_per_worker)
    if use_gpu:
        resources.setdefault("GPU", 1)
    if ingested is None and ingest.resolve(job) == "ray":
        ingested = ingest.build(job)
    data = {"datasets": ingested.trainer_datasets, "dataset_config": ingested.data_config()} if ingested else {}
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": job.to_dict(), "progress": progress_sink, "use_gpu": use_gpu,
                           "data": ingested.info if ingested else None},
        **data,
        scaling_config=ScalingConfig(
            num_workers=job.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=job.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=CHECKPOINTS,
            **storage.resolve(storage_path).ray_storage(),  # a path, or a URI's pyarrow filesystem
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=_checkpoint_config(job),
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's INFO goes to its log files
            callbacks=callbacks or None,
        ),
    )


def _checkpoint_config(job):
    """Ray keeps the newest `keep_checkpoints`, or under `publish: best` the best ones by the
    published metric (and always the latest, which a resume starts from)."""
    from ray.train import CheckpointConfig

    from raylib.best import publish_best

    watch = publish_best(job)
    if watch is None:
        return CheckpointConfig(num_to_keep=job.train.keep_checkpoints)
    return CheckpointConfig(num_to_keep=job.train.keep_checkpoints, checkpoint_score_attribute=watch.metric,
                            checkpoint_score_order=watch.mode)


def published_checkpoint(result, job) -> tuple[Any, dict]:
    """The checkpoint whose expert a run publishes, and its metrics: the last, or under
    `output.publish: best` the best of those Ray kept by the published metric."""
    from raylib.best import publish_best

    watch = publish_best(job) if job is not None else None
    if watch is not None:
        ranked = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(watch.metric) is not None]
        if ranked:
            pick = min if watch.mode == "min" else max
            return pick(ranked, key=lambda cm: cm[1][watch.metric])
    return result.checkpoint, dict(result.metrics or {})


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


def root_cause(exc: BaseException) -> tuple[str, str, str]:
    """(exception type, its last message line, where the worker logs are) for a failure
    raised anywhere in the cluster (Ray wraps worker exceptions in its own)."""
    import re

    import ray

    from raylib.errors import RaylibError

    cause, seen = exc, set()
    while id(cause) not in seen:
        seen.add(id(cause))
        failures = getattr(cause, "worker_failures", None)  # Ray Train: {rank: exception}
        candidates = [
            failures[min(failures)] if failures else None,
            getattr(cause, "controller_failure", None),  # Ray Train's controller
            getattr(cause, "_base_exc", None),  # Ray Train: the user's exception with its traceback
            getattr(cause, "cause", None),  # RayTaskError: the task's exception
        ]
        nxt = next((c for c in candidates if isinstance(c, BaseException)), None)
        if nxt is None:
            if isinstance(cause, RaylibError):  # ours already say what and where
                break
            nxt = cause.__cause__
        if nxt is None:
            break
        cause = nxt
    kind = type(cause).__name__
    text = str(cause).strip().splitlines()
    last = next((line.strip() for line in reversed(text) if line.strip()), kind)
    last = re.sub(rf"^(?:[\w.]+\.)?{re.escape(kind)}: ", "", last)  # "pkg.RewardError: ..." -> "..."
    logs = "the Ray logs"
    try:
        logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # not on the head node: the job's own log holds the worker output
        pass
    return kind, last[:500].rstrip("."), logs


def _failure_summary(exc: BaseException, out: str) -> str:
    kind, last, logs = root_cause(exc)
    return (
        f"training failed: {kind}: {last}. "
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
    if m.get("stopped_early"):
        print(f"stopped early at step {m.get('step')}: {m['stopped_early']}", file=stream)
    if result.published and result.published.get("which") == "best":
        print(f"published the best checkpoint: step {result.published.get('step')}", file=stream)
    print(f"expert saved to {result.expert_dir}", file=stream)
    if result.checkpoint_dir:
        print(f"last checkpoint: {result.checkpoint_dir}", file=stream)
