"""Metric tracking (`output.tracking: [mlflow, tensorboard, wandb]`) and the loss-curve PNG.

Where it runs: on the driver, fed by the same progress events rank 0 sends for the progress
bar (every step's loss/lr/tokens-per-s and every eval). Ray's own integrations do not fit
Ray Train V2 here: `MLflowLoggerCallback`/`TBXLoggerCallback` are Ray Tune callbacks, which
V2's `RunConfig(callbacks=...)` rejects (only `ray.train.UserCallback`), and V2's reports
reach the driver only at eval/checkpoint steps. So raylib calls the libraries directly
(mlflow, tensorboardX), from the one process that sees every event and owns output.dir.

- MLflow: tracking URI `output.mlflow_uri`, else $MLFLOW_TRACKING_URI, else a local file
  store `<output.dir>/mlruns` (`mlflow ui --backend-store-uri <output.dir>/mlruns`).
  Experiment = `output.experiment` (default "raylib"); params = the flattened job. The run id
  is kept in `<output.dir>/tracking.json`, so `--resume` continues the same MLflow run.
- TensorBoard: event files in `<output.dir>/tensorboard` (`tensorboard --logdir ...`).
- Weights & Biases: one W&B run per raylib run (`output.wandb`: project, default
  `output.experiment` or "raylib"; entity; mode online | offline, default $WANDB_MODE, else
  online), its files under `<output.dir>/wandb`; config = the job, metrics by step, the final
  metrics in the run summary and `loss_curve.png` as an image at the end. The run id is kept
  in `tracking.json`, so `--resume` continues the same W&B run. Offline runs upload later with
  `wandb sync <output.dir>/wandb/offline-run-*`.
- `loss_curve.png` (train loss per step, eval loss per eval) is written at the end of every
  run from `<output.dir>/metrics.jsonl`, whether tracking is on or not.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("raylib")

STEP_KEYS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s"}
EVAL_KEYS = {"eval_loss": "eval/loss", "eval_token_accuracy": "eval/token_accuracy",
             "eval_reward_accuracy": "eval/reward_accuracy", "eval_reward_margin": "eval/reward_margin",
             "eval_accuracy": "eval/accuracy", "eval_reward": "eval/reward"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """Receives progress events on the driver and forwards them to MLflow / TensorBoard."""

    def __init__(self, job, out_dir: str):
        self.out_dir = out_dir
        self.kinds = list(job.output.tracking)
        self._mlflow = self._tb = self._wandb = None
        state_path = os.path.join(out_dir, "tracking.json")
        state = json.load(open(state_path)) if os.path.isfile(state_path) else {}
        if "mlflow" in self.kinds:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "1")  # mlflow 3 warns/refuses file stores otherwise
            # the client API with an explicit run id: the fluent API's active run is
            # thread-local, and events arrive on the progress printer's thread
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            uri = job.output.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.join(out_dir, "mlruns")
            client = MlflowClient(tracking_uri=uri)
            self._run_id = state.get("mlflow_run_id") if state.get("mlflow_uri") == uri else None
            if self._run_id:  # --resume: the same MLflow run continues
                client.update_run(self._run_id, status="RUNNING")
            else:
                name = job.output.experiment or "raylib"
                exp = client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp else client.create_experiment(name)
                self._run_id = client.create_run(exp_id, run_name=job.run_name).info.run_id
                params = [Param(k, str(v)[:500]) for k, v in _flatten(job.to_dict()).items()]
                for i in range(0, len(params), 100):
                    client.log_batch(self._run_id, params=params[i:i + 100])
            state.update(mlflow_run_id=self._run_id, mlflow_uri=uri)
            self._mlflow = client
        if "tensorboard" in self.kinds:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            state["tensorboard_dir"] = os.path.join(out_dir, "tensorboard")
        if "wandb" in self.kinds:
            self._wandb = _start_wandb(job, out_dir, state)
        if self.kinds:
            with open(state_path, "w") as f:
                json.dump(state, f, indent=2)

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        keys = STEP_KEYS if kind == "step" else EVAL_KEYS if kind == "eval" else None
        if keys is None or event.get("step") is None:
            return
        values = {name: float(event[k]) for k, name in keys.items() if isinstance(event.get(k), (int, float))}
        if not values:
            return
        step = int(event["step"])
        try:
            if self._mlflow is not None:
                self._log_mlflow({k.replace("/", "_"): v for k, v in values.items()}, step)
            if self._tb is not None:
                for k, v in values.items():
                    self._tb.add_scalar(k, v, step)
            if self._wandb is not None:
                self._wandb.log(values, step=step)
        except Exception as exc:  # tracking never takes a run down
            log.warning("metric tracking failed at step %d: %s", step, exc)

    def _log_mlflow(self, values: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._mlflow.log_batch(self._run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, status: str = "FINISHED", final: dict | None = None) -> None:
        if self._mlflow is not None:
            if final:
                nums = {k: float(v) for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                self._log_mlflow({f"final_{k}": v for k, v in nums.items()}, 0)
            self._mlflow.set_terminated(self._run_id, status=status)
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._close_wandb(status, final)

    def _close_wandb(self, status: str, final: dict | None) -> None:
        import wandb

        try:
            for k, v in (final or {}).items():
                if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                    self._wandb.summary[f"final_{k}"] = v
            curve = os.path.join(self.out_dir, "loss_curve.png")
            if os.path.isfile(curve):
                self._wandb.log({"loss_curve": wandb.Image(curve)})
        except Exception as exc:  # tracking never takes a run down
            log.warning("W&B: could not log the final metrics: %s", exc)
        self._wandb.finish(exit_code=0 if status == "FINISHED" else 1)


def wandb_mode(job) -> str:
    """online | offline: output.wandb.mode, else $WANDB_MODE, else online."""
    return job.output.wandb.mode or os.environ.get("WANDB_MODE") or "online"


def check(job) -> None:
    """Driver-side, before Ray: the trackers asked for are installed, and an online W&B run
    has an API key (W&B would otherwise fail or prompt when the run starts)."""
    import importlib.util

    from raylib.errors import ConfigError

    modules = {"mlflow": "mlflow", "tensorboard": "tensorboardX", "wandb": "wandb"}
    for kind in job.output.tracking:
        if importlib.util.find_spec(modules[kind]) is None:
            raise ConfigError("output.tracking", f"{kind} is not installed here", "pip install 'raylib[tracking]'")
    if "wandb" not in job.output.tracking:
        if any(v is not None for v in job.output.wandb.model_dump().values()):
            raise ConfigError("output.wandb", "is set, but output.tracking does not list wandb",
                              "add wandb to output.tracking, or remove output.wandb")
        return
    mode = wandb_mode(job)
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError("output.wandb.mode", f"$WANDB_MODE is {mode!r}", "use online, offline or disabled")
    if mode == "online" and not os.environ.get("WANDB_API_KEY") and not _netrc_has_wandb():
        raise ConfigError("output.wandb.mode", "W&B runs online, but no API key is set (WANDB_API_KEY or `wandb login`)",
                          "export WANDB_API_KEY=..., or set output.wandb.mode: offline (upload later with wandb sync)")


def _netrc_has_wandb() -> bool:
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in h for h in hosts)


def _start_wandb(job, out_dir: str, state: dict):
    """One W&B run for the raylib run (the same one again on --resume, by the id in
    tracking.json). console off and silent: the driver's stdout/stderr stay raylib's."""
    import wandb

    run_id = state.get("wandb_run_id")  # None: W&B names a new run
    run = wandb.init(
        project=job.output.wandb.project or job.output.experiment or "raylib", entity=job.output.wandb.entity,
        name=job.run_name, id=run_id, resume="allow" if run_id else None, dir=out_dir, config=job.to_dict(),
        mode=wandb_mode(job), settings=wandb.Settings(silent=True, console="off"),
    )
    state.update(wandb_run_id=run.id, wandb_dir=os.path.join(out_dir, "wandb"))
    return run


def read_events(run_dir: str, checkpoint_dir: str | None = None) -> list[dict]:
    """The run's progress events (metrics.jsonl); without them (a Tune trial has no progress
    sink), the eval history saved in the checkpoint's train state."""
    path = os.path.join(run_dir, "metrics.jsonl")
    events = []
    if os.path.isfile(path):
        for line in open(path):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    if not events and checkpoint_dir:
        state = os.path.join(checkpoint_dir, "train_state", "state.json")
        if os.path.isfile(state):
            events = [{"type": "eval", **h} for h in json.load(open(state)).get("history", [])]
    return events


def write_loss_curve(run_dir: str, checkpoint_dir: str | None = None) -> str | None:
    try:
        return plot_loss_curve(read_events(run_dir, checkpoint_dir), os.path.join(run_dir, "loss_curve.png"))
    except Exception as exc:  # a plot never fails a run
        log.warning("could not write loss_curve.png: %s", exc)
        return None


def plot_loss_curve(events: list[dict], png_path: str) -> str | None:
    """Train loss per step and eval loss per eval -> PNG (None if there is nothing to plot)."""
    eval_steps, eval_losses = [], []
    seen = {}
    for e in events:
        if e.get("type") == "step" and isinstance(e.get("loss"), (int, float)):
            seen[int(e["step"])] = float(e["loss"])  # a resumed run repeats steps: keep the last
        elif e.get("type") == "eval" and isinstance(e.get("eval_loss"), (int, float)):
            eval_steps.append(int(e["step"]))
            eval_losses.append(float(e["eval_loss"]))
    steps, losses = zip(*sorted(seen.items())) if seen else ((), ())
    if not steps and not eval_steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if steps:
        ax.plot(steps, losses, label="train loss", linewidth=1)
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(png_path))))
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
