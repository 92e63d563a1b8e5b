"""SVF and the RL objectives through Ray Train workers on a local Ray."""

from __future__ import annotations

import json
import os

import pytest
from helpers import job_dict

from raylib import launch
from raylib.config import validate_job
from raylib.errors import TrainingFailed
from raylib.methods import svf
from raylib.synthetic import write_dataset


@pytest.mark.slow
def test_two_worker_svf_sft_job_decomposes_once(ray_session, tiny_model, demo_data, tmp_path):
    out, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    job = validate_job(job_dict(tiny_model, demo_data, out, scaling={"num_workers": 2},
                                method={"name": "svf", "targets": "all-linear", "cache_dir": cache},
                                train={"max_steps": 6, "checkpoint_every": 3, "lr": 0.05}, output={"domain": "mixed"}))
    result = launch.train(job, show_progress=False)
    m = result.metrics
    assert m["world_size"] == 2 and m["step"] == 6 and m["trainable_params"] == 768
    assert m["eval_loss"] < m["eval_loss_before"]
    assert len([f for f in os.listdir(cache) if f.endswith(".safetensors")]) == 1
    info = json.load(open(os.path.join(out, "expert.json")))
    assert info["method"] == "svf" and info["domain"] == "mixed" and info["base_model"] == tiny_model
    z = svf.load_z(out)
    assert len(z) == 14 and any((v - 1).abs().max() > 1e-4 for v in z.values())


def _rl_job(tiny_model, tmp_path, name, reward="tests.rl_rewards:is_number", workers=1, **train):
    data = write_dataset(str(tmp_path / "data"), 200, 32, ["comparison"])
    return validate_job(job_dict(
        tiny_model, data, str(tmp_path / "run"), scaling={"num_workers": workers},
        method={"name": "svf", "targets": "all-linear", "cache_dir": str(tmp_path / "c")},
        objective={"name": name, "reward": reward, "num_samples": 4, "max_new_tokens": 8, "kl_coef": 0.01,
                   "eval_rows": 32},
        train={"lr": 0.02, "batch_size": 4, "lr_scheduler": "constant", **train},
    ))


@pytest.mark.parametrize("name", ["reinforce", "ppo"])
def test_two_worker_rl_job(name, ray_session, tiny_model, tmp_path):
    """ppo: the actor-critic module (policy + value head) is what DDP wraps and syncs."""
    job = _rl_job(tiny_model, tmp_path, name, workers=2, max_steps=6, checkpoint_every=3)
    result = launch.train(job, show_progress=False)
    m = result.metrics
    assert m["world_size"] == 2 and m["step"] == 6 and m["objective"] == name
    assert m["eval_reward"] > m["eval_reward_before"], m
    ckpts = sorted(d for d in os.listdir(os.path.join(job.output.dir, "checkpoints")) if d.startswith("step_"))
    assert ckpts == ["step_0000003", "step_0000006"]
    assert os.path.isfile(os.path.join(job.output.dir, svf.Z_FILE))
    if name == "ppo":
        ckpt = os.path.join(job.output.dir, "checkpoints", "step_0000006", "train_state", "value_head.pt")
        assert os.path.isfile(ckpt)


def test_a_raising_reward_fails_the_run_with_its_name(ray_session, tiny_model, tmp_path):
    job = _rl_job(tiny_model, tmp_path, "ppo", reward="tests.rl_rewards:explode", max_steps=2, checkpoint_every=0)
    with pytest.raises(TrainingFailed, match="reward function 'tests.rl_rewards:explode' raised ValueError") as info:
        launch.train(job, show_progress=False)
    assert info.value.exit_code == 1  # the CLI exits with it


def test_grpo_job_in_a_ray_worker(ray_session, tiny_model, tmp_path):
    job = _rl_job(tiny_model, tmp_path, "grpo", max_steps=2, checkpoint_every=1)
    result = launch.train(job, show_progress=False)
    assert result.metrics["step"] == 2 and result.metrics["objective"] == "grpo"
    assert result.metrics["reward"] is not None
    assert os.path.isfile(os.path.join(job.output.dir, svf.Z_FILE))
