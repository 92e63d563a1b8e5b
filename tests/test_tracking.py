"""output.tracking: MLflow (local file store) and TensorBoard get every step; loss_curve.png always."""

from __future__ import annotations

import glob
import os
import struct

import pytest
from helpers import job_dict

from raylib import launch
from raylib.config import validate_job

pytestmark = pytest.mark.slow


def _tb_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Read tensorboardX event files (TFRecord framing: len, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_mlflow_and_tensorboard_tracking_and_loss_curve(tiny_model, demo_data, tmp_path, ray_session):
    out = str(tmp_path / "run")
    job = validate_job(job_dict(tiny_model, demo_data, out, train={"max_steps": 6, "checkpoint_every": 3},
                                output={"tracking": ["mlflow", "tensorboard"], "experiment": "track-test"}))
    result = launch.train(job, show_progress=False)
    assert result.metrics["step"] == 6
    assert os.path.getsize(os.path.join(out, "loss_curve.png")) > 1000

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "1")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="file:" + os.path.join(out, "mlruns"))
    exp = client.get_experiment_by_name("track-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "lora" and run.data.params["train.max_steps"] == "6"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4, 5, 6]
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted(m.step for m in evals) == [3, 6]
    assert run.data.metrics["final_eval_loss"] < run.data.metrics["final_eval_loss_before"]

    scalars = _tb_scalars(os.path.join(out, "tensorboard"))
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in scalars["eval/loss"]] == [3, 6]
    assert scalars["eval/loss"][-1][1] < scalars["train/loss"][0][1]
    # placement evidence is in the run's metrics
    assert result.metrics["num_nodes"] == 1 and len(result.metrics["worker_node_ids"]) > 8
