"""`ray job submit -- python jobs/finetune.py ...` against a `ray start --head` cluster."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import REPO, RayHead

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(num_cpus=2)
    yield head
    head.stop()


def test_ray_job_submit_runs_the_example_job(ray_head, tiny_model, demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # for the in-process JobSubmissionClient below
    out = str(tmp_path / "submitted")
    submission_id = f"raylib-test-{os.getpid()}"
    cmd = [
        "ray",  # the venv's, first on PATH
        "job", "submit", "--address", ray_head.dashboard, "--working-dir", REPO,
        "--submission-id", submission_id, "--",
        "python", "jobs/finetune.py", "jobs/examples/lora.yaml",
        "--set", f"model.path={tiny_model}", "--set", f"data.train={demo_data['train']}",
        "--set", f"data.eval={demo_data['eval']}", "--set", f"output.dir={out}",
        "--set", "train.max_steps=6", "--set", "train.checkpoint_every=3", "--set", "data.max_length=256",
    ]
    proc = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=900, cwd=REPO)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard)
    assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "expert saved to" in client.get_job_logs(submission_id)
    info = json.load(open(os.path.join(out, "expert.json")))
    assert info["method"] == "lora" and info["metrics"]["step"] == 6
    assert info["metrics"]["eval_loss"] < info["metrics"]["eval_loss_before"]
    assert sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_")) == [
        "step_0000003", "step_0000006"]
