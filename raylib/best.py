"""The eval metric a run watches: early stopping (`train.early_stopping`) and the checkpoint
`output.publish: best` publishes (`output.best`).

Both are a `Watch` over one eval metric, driven by `recipe.fit` at every eval. Their records
(best value, its step, evals since it) live in `TrainState.watch`, so a resumed run stops and
picks exactly as the uninterrupted one would.

- Early stopping counts the eval before the first step as the first value: a run whose evals
  never beat the base by `min_delta` stops after `patience` evals. It writes a checkpoint at
  the step it stops, records the reason (`stopped_early` in the metrics, run.json, the
  summary) and exits 0; a resumed stopped run does not train on.
- `publish: best`: every checkpoint is evaluated (so each carries the metric), an eval that
  improves the metric writes a checkpoint (so the best eval always has one), Ray keeps the
  best checkpoints by that metric (`CheckpointConfig(checkpoint_score_attribute=...)`), and
  the driver publishes the best one's expert (`launch.finish_run`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Watch:
    role: str  # "early_stopping" | "publish": its key in TrainState.watch
    metric: str
    mode: str  # "min" | "max"
    min_delta: float = 0.0
    patience: int | None = None

    def update(self, state, metrics: dict) -> bool:
        """Record this eval's value; True when it is the best so far (by more than min_delta)."""
        value = float(metrics[self.metric])
        record = state.watch.get(self.role)
        if record is None or (value < record["value"] - self.min_delta if self.mode == "min"
                              else value > record["value"] + self.min_delta):
            state.watch[self.role] = {"metric": self.metric, "value": value, "step": metrics["step"], "bad_evals": 0}
            return True
        record["bad_evals"] += 1
        return False

    def stop_reason(self, state) -> str | None:
        record = state.watch.get(self.role)
        if not self.patience or record is None or record["bad_evals"] < self.patience:
            return None
        return (f"{self.metric} did not improve by more than {self.min_delta:g} in {self.patience} evals "
                f"(best {record['value']:.4g} at step {record['step']})")


def early_stopping(job) -> Watch | None:
    es = job.train.early_stopping
    if es is None:
        return None
    return Watch("early_stopping", es.metric, es.mode, es.min_delta, es.patience)


def publish_best(job) -> Watch | None:
    """The metric and mode `output.publish: best` picks by (output.best, else the early-stopping
    metric, else eval_loss, lower is better), or None for `publish: last`."""
    if job.output.publish != "best":
        return None
    if job.output.best is not None:
        return Watch("publish", job.output.best.metric, job.output.best.mode)
    es = job.train.early_stopping
    return Watch("publish", es.metric, es.mode) if es is not None else Watch("publish", "eval_loss", "min")


def default_mode(metric: str) -> str:
    """Losses (and perplexity) fall as a model improves; accuracies, F1 and rewards rise."""
    return "min" if "loss" in metric or "perplexity" in metric else "max"


def check(job) -> None:
    """Driver-side: the watched metrics are ones the objective's eval reports, there is eval
    data, and the run evaluates during training. ConfigError naming the field otherwise."""
    from raylib.errors import ConfigError
    from raylib.objectives import eval_metrics

    watches = [(w, field) for w, field in ((early_stopping(job), "train.early_stopping.metric"),
                                          (publish_best(job), "output.best.metric")) if w is not None]
    if not watches:
        return
    valid = eval_metrics(job)
    for watch, field in watches:
        if field == "output.best.metric" and job.output.best is None:
            field = "output.publish"  # the default metric (eval_loss) is what is missing
        if not valid:
            raise ConfigError(field, f"objective {job.objective.name!r} reports no eval metrics during training "
                              "(grpo runs inside TRL's trainer)", "remove it, or use objective reinforce or ppo")
        if watch.metric not in valid:
            raise ConfigError(field, f"{watch.metric!r} is not an eval metric of objective {job.objective.name!r}",
                              f"choose one of {', '.join(valid)}")
    if job.data.eval is None and job.data.eval_split == 0:
        raise ConfigError("data.eval_split", f"{watches[0][1]} needs eval data, but data.eval is unset and "
                          "data.eval_split is 0", "set data.eval to a file, or data.eval_split above 0")
    eval_every = job.train.eval_every if job.train.eval_every is not None else job.train.checkpoint_every
    if job.train.early_stopping is not None and not eval_every:
            raise ConfigError("train.eval_every", "early stopping needs evals during training, but this run evaluates "
                          "only at the end", "set train.eval_every to the steps between evals")
