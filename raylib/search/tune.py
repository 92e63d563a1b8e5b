"""`raylib tune`: Ray Tune over job configs, where every trial is a full Ray Train run.

Each trial is a Tune function trainable that applies its sampled values to the base job
and runs the same `TorchTrainer` `raylib train` builds (Ray Train V2's documented Tune
integration: the trainer runs inside the trial, `TuneReportCallback` forwards its reports).
So a trial may itself use several workers, trials spread over the cluster's nodes, ASHA
stops a trial by stopping its trainer, and `--resume` is Tune's own `Tuner.restore`
(each unfinished trial's Train run then restores from its latest checkpoint).

Layout of a search directory (default `<job output.dir>-search`):

    tune/                 Tune's experiment (readable by ray.tune.ExperimentAnalysis)
    trials/<trial_id>/    each trial's run: checkpoints/, and the expert if it finished
    results.csv           one row per trial: status, sampled values, last metrics, expert
    best_job.yaml         the best finished trial's job, ready for `raylib train`
    metric_vs_step.png    the search metric over steps for every trial
    search.json           the summary printed at the end
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from raylib.config import JobConfig, set_field, validate_job
from raylib.errors import ConfigError
from raylib.search.space import SearchConfig

log = logging.getLogger("raylib.tune")

EXPERIMENT = "tune"
TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes reserved for each trial's driver process


@dataclass
class SearchResult:
    search_dir: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    failed: list[dict[str, Any]] = field(default_factory=list)
    early_stopped: int = 0


def search_dir_for(job: JobConfig, search: SearchConfig) -> str:
    """A path or a URI (then trials, checkpoints and outputs all live in that storage)."""
    from raylib import storage

    where = search.dir or job.output.dir.rstrip("/") + "-search"
    return storage.resolve(where, "search.dir").uri


def preflight(job: JobConfig, search: SearchConfig, resume: bool) -> str:
    """Checks that need no cluster; returns the search directory."""
    from raylib import launch

    if job.provider != "ray":
        raise ConfigError("provider", f"a search runs its trials on this Ray cluster, not at provider {job.provider}",
                          "remove provider (and provider_options) from the job")
    launch.preflight(job, resume=False, probe=False)  # model, data (the search dir is probed below)
    if search.scheduler.name == "asha" and not (search.scheduler.max_t or job.train.max_steps):
        raise ConfigError("search.scheduler.max_t", "ASHA needs the trial length in steps",
                          "set train.max_steps in the job or scheduler.max_t in the search file")
    from raylib import storage

    out = search_dir_for(job, search)
    loc = storage.resolve(out, "search.dir")
    storage.probe(loc, "search.dir")
    exists = storage.exists(loc, EXPERIMENT)
    if exists and not resume:
        raise ConfigError("search.dir", f"{out!r} already holds a search", "pass --resume to continue it, or set dir to a new path")
    if resume and not exists:
        raise ConfigError("--resume", f"there is no search to resume in {out!r}", "drop --resume to start a new search")
    return out


def run_search(job: JobConfig, search: SearchConfig, *, resume: bool = False, address: str | None = None) -> SearchResult:
    """Run (or resume) the search and write its outputs. Trial failures are in the result."""
    from ray import tune

    from raylib import launch

    job = launch.resolve_paths(job)
    from raylib import storage

    out = preflight(job, search, resume)
    loc = storage.resolve(out, "search.dir")
    base = job.to_dict()
    metric, mode = search.metric, search.mode

    launch.connect(address)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, search_dir=out, metric=metric),
        # the trial only drives its trainer: its Train workers hold the CPUs/GPUs, the trial
        # itself asks for memory alone (Tune refuses an all-zero request)
        {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    if resume:
        tuner = tune.Tuner.restore(loc.join(EXPERIMENT).path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=loc.fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={p: d.to_tune() for p, d in search.space.items()},
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=search.num_samples or (1 if search.algorithm == "grid" else 4),
                # BasicVariantGenerator takes the limit itself (Tune ignores max_concurrent_trials for it)
                max_concurrent_trials=search.max_concurrent if search.algorithm == "optuna" else None,
                search_alg=_search_alg(search),
                scheduler=_scheduler(job, search),
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                **loc.ray_storage(),  # a local path, or a URI's pyarrow filesystem
                failure_config=tune.FailureConfig(max_failures=search.max_failures),
                verbose=1,
            ),
        )
    started = time.time()
    try:
        grid = tuner.fit()
    except Exception as exc:  # Tune itself failed (trial failures are in the grid, not raised)
        from raylib.errors import TrainingFailed

        kind, last, logs = launch.root_cause(exc)
        raise TrainingFailed(f"the search failed: {kind}: {last}. Trial and worker output is in {logs}; "
                             f"Tune's state is in {out}/{EXPERIMENT} (continue with --resume).") from exc
    result = _collect(grid, out, metric, mode)
    local = storage.staging_dir(loc)  # the summary files: written here, uploaded for a URI
    _write_outputs(result, base, job, search, time.time() - started, local)
    if loc.is_remote:
        for name in ("results.csv", "best_job.yaml", "metric_vs_step.png", "search.json"):
            if os.path.exists(os.path.join(local, name)):
                storage.upload_file(os.path.join(local, name), loc, name)
    return result


# --------------------------------------------------------------------------- one trial


def _trial(params: dict[str, Any], *, base: dict[str, Any], search_dir: str, metric: str) -> None:
    """One trial = one Ray Train run of the base job with `params` applied."""
    from ray import tune

    from raylib import launch

    raw = copy.deepcopy(base)
    for path, value in params.items():
        set_field(raw, path, value)
    from raylib import storage

    trial_loc = storage.resolve(search_dir, "search.dir").join("trials", tune.get_context().get_trial_id())
    trial_dir = trial_loc.uri
    raw["output"]["dir"] = trial_dir
    # each trial prepares its own data (its parameters may change data.*): in its workers,
    # unless the job asks for Ray Data explicitly (then inside the trial, on free cluster CPUs)
    raw["data"].setdefault("loader", "auto")
    if raw["data"]["loader"] == "auto":
        raw["data"]["loader"] = "local"
    job = validate_job(raw, source="trial")
    storage.write_text(trial_loc, "job.yaml", yaml.safe_dump(raw, sort_keys=False))
    started = time.time()
    trainer = launch.build_trainer(job, storage_path=trial_dir, callbacks=[_report_callback(metric)])
    launch.finish_run(trainer.fit(), trial_dir, started, job=job)


def _report_callback(metric: str):
    """Forward only the reports that carry the search metric (eval steps) to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReport()


# --------------------------------------------------------------------------- algorithms


def _search_alg(search: SearchConfig):
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=search.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.seed, max_concurrent=search.max_concurrent or 0)


def _scheduler(job: JobConfig, search: SearchConfig):
    s = search.scheduler
    if s.name == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = s.max_t or job.train.max_steps
    first_eval = job.train.eval_every or job.train.checkpoint_every or max_t
    return ASHAScheduler(
        time_attr="step",
        # ASHA stops every trial that reaches max_t; one step more lets a trial that made it
        # to the end finish on its own and publish its expert (the rungs stay the same)
        max_t=max_t + 1,
        grace_period=min(s.grace_period or first_eval, max_t),
        reduction_factor=s.reduction_factor,
    )


# --------------------------------------------------------------------------- outputs


def _collect(grid, out: str, metric: str, mode: str) -> SearchResult:
    from raylib import storage
    from raylib.experts import EXPERT_FILE

    rows, failed = [], []
    for r in grid:
        trial_id = _trial_id(r)
        trial_loc = storage.resolve(out, "search.dir").join("trials", trial_id)
        trial_dir = trial_loc.uri
        last = r.metrics or {}
        finished = storage.is_file(trial_loc, EXPERT_FILE)
        if finished:  # the run's own final metrics: Tune may not have persisted the last report
            last = {**last, **_run_metrics(trial_loc)}  # (driver killed after the trial ended)
        status = "FAILED" if r.error else ("FINISHED" if finished else "STOPPED")
        row = {
            "trial_id": trial_id,
            "status": status,
            **{f"config/{k}": v for k, v in (r.config or {}).items()},
            "step": last.get("step"),
            metric: last.get(metric),
            "expert": trial_dir if finished else "",
        }
        rows.append(row)
        if r.error:
            failed.append({"trial_id": trial_id, "error": _first_line(r.error), "log_dir": r.path})
        row["_history"] = _history(r, metric)
        if finished and row["step"] is not None and row[metric] is not None and (
                not row["_history"] or row["_history"][-1][0] < row["step"]):
            row["_history"].append((int(row["step"]), float(row[metric])))
    finished_rows = [r for r in rows if r["status"] == "FINISHED" and r.get(metric) is not None]
    pick = min if mode == "min" else max
    best = pick(finished_rows, key=lambda r: r[metric]) if finished_rows else None
    stopped = sum(1 for r in rows if r["status"] == "STOPPED")
    return SearchResult(search_dir=out, rows=rows, best=best, failed=failed, early_stopped=stopped)


def _run_metrics(trial_loc) -> dict:
    from raylib import storage

    try:
        return json.loads(storage.read_text(trial_loc, "run.json")).get("metrics", {})
    except (OSError, ValueError):
        return {}


def _trial_id(result) -> str:
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return trial_id
    # a trial that never reported: Tune's trial dir is <trainable>_<trial_id>_<n>_<params...>
    return os.path.basename(result.path).split("_")[1]


def _history(result, metric: str) -> list[tuple[int, float]]:
    df = result.metrics_dataframe
    if df is None or metric not in df or "step" not in df:
        return []
    df = df.dropna(subset=[metric, "step"])
    return [(int(s), float(v)) for s, v in zip(df["step"], df[metric])]


def _first_line(error: BaseException) -> str:
    from raylib.launch import root_cause

    kind, last, _ = root_cause(error)
    return f"{kind}: {last}"[:400]


def _write_outputs(result: SearchResult, base: dict, job: JobConfig, search: SearchConfig, wall: float,
                   local: str) -> None:
    """results.csv, best_job.yaml, metric_vs_step.png, search.json into the local directory `local`."""
    out, metric = result.search_dir, search.metric
    columns = [k for k in result.rows[0] if not k.startswith("_")] if result.rows else []
    with open(os.path.join(local, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.rows)
    if result.best is not None:
        raw = copy.deepcopy(base)
        for key, value in result.best.items():
            if key.startswith("config/"):
                set_field(raw, key.removeprefix("config/"), value)
        raw["output"]["dir"] = job.output.dir
        with open(os.path.join(local, "best_job.yaml"), "w") as f:
            yaml.safe_dump(raw, f, sort_keys=False)
    _plot(result, metric, os.path.join(local, "metric_vs_step.png"))
    summary = {
        "search_dir": out,
        "trials": len(result.rows),
        "finished": sum(r["status"] == "FINISHED" for r in result.rows),
        "early_stopped": result.early_stopped,
        "failed": result.failed,
        "best": {k: v for k, v in (result.best or {}).items() if not k.startswith("_")} or None,
        "best_job": f"{out}/best_job.yaml" if result.best else None,
        "wall_time_s": round(wall, 1),
    }
    with open(os.path.join(local, "search.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)


def _plot(result: SearchResult, metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result.rows:
        if row["_history"]:
            steps, values = zip(*row["_history"])
            ax.plot(steps, values, marker="o", label=f"{row['trial_id']} ({row['status'].lower()})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def format_table(result: SearchResult, metric: str) -> str:
    """The results table the CLI prints."""
    if not result.rows:
        return "no trials ran"
    keys = [k for k in result.rows[0] if k.startswith("config/")]
    header = ["trial", "status", *[k.removeprefix("config/") for k in keys], "step", metric]
    lines = [header]
    for r in result.rows:
        lines.append([r["trial_id"], r["status"], *[_fmt(r[k]) for k in keys], _fmt(r["step"]), _fmt(r.get(metric))])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
