"""`raylib submit/status/logs/stop` through Ray's Job SDK against a `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from helpers import RAYLIB, RayHead, job_dict, run_cli, write_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(num_cpus=2)
    yield head
    head.stop()


def test_submit_streams_logs_and_returns_the_job_status(ray_head, tiny_model, demo_data, tmp_path):
    out = str(tmp_path / "run")
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, demo_data, out, train={"max_steps": 4, "checkpoint_every": 2}))
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_MODE"}  # raylib sends the token itself
    started = time.time()
    proc = run_cli("submit", job, "--address", ray_head.dashboard, "--submission-id", "raylib-ok", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "expert saved to" in proc.stdout  # the job's own output, streamed
    assert "raylib-ok: SUCCEEDED" in proc.stderr
    info = json.load(open(os.path.join(out, "expert.json")))
    assert info["metrics"]["step"] == 4
    print(f"submit ran in {time.time() - started:.0f} s")

    st = run_cli("status", "raylib-ok", "--address", ray_head.dashboard, env=env)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout and "--job-env RAYLIB_JOB_YAML" in st.stdout
    lg = run_cli("logs", "raylib-ok", "--address", ray_head.dashboard, env=env)
    assert lg.returncode == 0 and "expert saved to" in lg.stdout



def test_stop_a_running_job(ray_head, tiny_model, demo_data, tmp_path):
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_MODE"}
    job = write_job(tmp_path / "long.yaml", job_dict(tiny_model, demo_data, str(tmp_path / "long"),
                                                     train={"max_steps": 5000, "checkpoint_every": 0}))
    # submit streams the logs in the background; stopping the job makes it exit 1
    follower = subprocess.Popen([RAYLIB, "submit", job, "--address", ray_head.dashboard, "--submission-id", "raylib-long"],
                                env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        st = run_cli("status", "raylib-long", "--address", ray_head.dashboard, env=env)
        if "RUNNING" in st.stdout:
            break
        time.sleep(2)
    assert "RUNNING" in st.stdout, st.stdout
    sp = run_cli("stop", "raylib-long", "--address", ray_head.dashboard, env=env, timeout=200)
    assert sp.returncode == 0 and "STOPPED" in sp.stdout, sp.stdout + sp.stderr
    st = run_cli("status", "raylib-long", "--address", ray_head.dashboard, env=env)
    assert st.returncode == 1 and "STOPPED" in st.stdout
    out, err = follower.communicate(timeout=120)
    assert follower.returncode == 1 and "ended STOPPED" in err, err[-2000:]


def test_submit_rejects_an_invalid_job_before_sending(tmp_path):
    job = write_job(tmp_path / "j.yaml", {"model": {"path": "m"}, "data": {"train": "t.jsonl"},
                                          "method": {"name": "lora", "rr": 8}, "output": {"dir": "o"}})
    proc = run_cli("submit", job, "--address", "http://127.0.0.1:9")  # nothing listens there
    assert proc.returncode == 2 and "method.rr" in proc.stderr
