"""output.tracking: [wandb] in W&B's offline mode: the run's config, metrics by step, final
metrics and the loss-curve image, read back from W&B's own run file with W&B's own protobuf
schema (the file is LevelDB-log framed: 32 KiB blocks of crc32 · length · type · data)."""

from __future__ import annotations

import glob
import json
import os

import pytest
from helpers import job_dict

from raylib import launch
from raylib.config import validate_job
from raylib.errors import ConfigError

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _wandb_records(path: str) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    records, pending, pos = [], b"", 7  # ":W&B", a 2-byte magic, a version byte
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return [pb.Record.FromString(r) for r in records]


def test_wandb_offline_run_has_config_metrics_by_step_and_loss_curve(tiny_model, demo_data, tmp_path, ray_session,
                                                                     monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = str(tmp_path / "run")
    job = validate_job(job_dict(tiny_model, demo_data, out, train={"max_steps": 6, "checkpoint_every": 3},
                                output={"tracking": ["wandb"], "experiment": "wb-test",
                                        "wandb": {"mode": "offline"}}))
    result = launch.train(job, show_progress=False)
    assert result.metrics["step"] == 6

    run_id = json.load(open(os.path.join(out, "tracking.json")))["wandb_run_id"]
    (run_file,) = glob.glob(os.path.join(out, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
    records = _wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == run_id and run.project == "wb-test" and run.display_name == "wb-test"

    config = {i.key: json.loads(i.value_json) for i in run.config.update}  # the run record, then any updates
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["method"]["name"] == "lora" and config["train"]["max_steps"] == 6

    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            step = json.loads(row.get("_step", "null"))
            history.setdefault(step, {}).update(row)
    loss_steps = sorted(s for s, row in history.items() if "train/loss" in row)
    assert loss_steps == [1, 2, 3, 4, 5, 6], history.keys()
    assert sorted(s for s, row in history.items() if "eval/loss" in row) == [3, 6]
    assert float(history[6]["eval/loss"]) < float(history[1]["train/loss"])
    (curve,) = [row for row in history.values() if "loss_curve/_type" in row]  # an image: nested keys
    assert json.loads(curve["loss_curve/_type"]) == "image-file"
    image = os.path.join(os.path.dirname(run_file), "files", json.loads(curve["loss_curve/path"]))
    assert os.path.getsize(image) == json.loads(curve["loss_curve/size"]) > 1000

    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in r.summary.update})
    assert summary["final_eval_loss"] < summary["final_eval_loss_before"]
    assert "exit" in kinds  # the run was finished, not left open


def test_wandb_is_checked_before_ray(tiny_model, demo_data, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    online = validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "a"), output={"tracking": ["wandb"]}))
    with pytest.raises(ConfigError) as err:
        launch.preflight(online)
    assert err.value.field == "output.wandb.mode" and "WANDB_API_KEY" in str(err.value)
    stray = validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "b"), output={"wandb": {"project": "x"}}))
    with pytest.raises(ConfigError) as err:
        launch.preflight(stray)
    assert err.value.field == "output.wandb"
