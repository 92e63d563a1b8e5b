"""Honest endings: a failure anywhere (a worker, a reward function, a trial of a search, a
save) ends `raylib train/tune` and `ray job submit` with a non-zero exit and one paragraph
that says what failed and where its log is; a successful run exits 0 with a clean stderr."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml
from helpers import REPO, job_dict, run_cli, write_job

ENV = {"PYTHONPATH": REPO}  # the test reward module (tests/rl_rewards.py) for the Ray workers


def _error_paragraph(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-4000:]
    return lines[0]


@pytest.mark.slow
def test_a_raising_reward_function_fails_the_run_with_exit_1(tmp_path, tiny_model, demo_data):
    out = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", job_dict(
        tiny_model, demo_data, str(out),
        objective={"name": "reinforce", "reward": "tests.rl_rewards:explode", "num_samples": 2, "max_new_tokens": 4,
                   "eval_rows": 4},
        train={"max_steps": 2, "batch_size": 2, "checkpoint_every": 0}))
    proc = run_cli("train", job, "--local", env=ENV, cwd=REPO, timeout=900)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    err = _error_paragraph(proc.stderr)
    assert err.startswith("error: training failed: RewardError:"), err
    assert "tests.rl_rewards:explode" in err and "broken on purpose" in err, err
    assert "Worker output is in /" in err and f"{out}/metrics.jsonl" in err, err
    assert "expert saved" not in proc.stdout and not os.path.exists(out / "expert.json")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failing_trial_in_a_search_of_3_exits_1_and_names_it(request, tmp_path, tiny_model, demo_data, where):
    # the middle trial asks LoRA for modules the model does not have: it fails in its workers
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, demo_data, str(tmp_path / "out"),
                                                    train={"max_steps": 2, "checkpoint_every": 2}))
    search = tmp_path / "search.yaml"
    spec = {"space": {"method.target_modules": "grid [[q_proj], [no_such_module], [v_proj]]"},
            "algorithm": "grid", "max_concurrent": 1, "scheduler": {"name": "none"}, "metric": "eval_loss", "mode": "min"}
    env = {}
    if where == "s3":  # the search, its trials' checkpoints and experts all live in the bucket
        s3 = request.getfixturevalue("s3_server")
        spec["dir"], env = "s3://bucket/search", s3.env("rw")
    search.write_text(yaml.safe_dump(spec))
    proc = run_cli("tune", job, "--search", str(search), env=env, timeout=1500)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-4000:]
    err = _error_paragraph(proc.stderr)
    assert err.startswith("error: 1 of 3 trials failed:"), err
    assert "no_such_module" in err or "Target modules" in err, err
    assert "(logs: " in err, err
    assert proc.stdout.count("FINISHED") == 2 and proc.stdout.count("FAILED") == 1, proc.stdout
    if where == "s3":
        keys = s3.keys_under("search/")
        experts = [k for k in keys if k.startswith("search/trials/") and k.endswith("/expert.json") and k.count("/") == 3]
        assert len(experts) == 2, keys
        for name in ("results.csv", "search.json", "best_job.yaml", "metric_vs_step.png"):
            assert f"search/{name}" in keys, (name, keys)
        assert any(k.startswith("search/tune/") for k in keys), keys


def test_unexpected_exceptions_are_one_paragraph_with_a_traceback_file():
    """An error raylib did not foresee (here an OSError) still ends with exit 1 and one
    paragraph naming the file that holds the traceback, not with a traceback."""
    proc = run_cli("tiny", "/sys/raylib-test-no-such-place/tiny")
    assert proc.returncode == 1, proc.stderr
    err = _error_paragraph(proc.stderr)
    assert err.startswith("error: `raylib tiny` failed:") and "Error" in err, err
    assert "Traceback (most recent call last)" not in proc.stderr
    path = err.split("Full traceback in ")[1].split(" ")[0]
    assert os.path.isfile(path) and "Traceback (most recent call last)" in open(path).read()
    os.remove(path)


@pytest.mark.slow
def test_ray_job_submit_reports_failed_for_a_failing_run(tmp_path, tiny_model, demo_data):
    """jobs/finetune.py exits non-zero when its workers fail, so Ray marks the job FAILED.
    The failure must be one the driver's preflight cannot see (it reads config.json and the
    tokenizer, never the weights): a model whose weights file is cut off, which only the
    workers' from_pretrained reads."""
    from helpers import RayHead

    broken = tmp_path / "cut-off-model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    head = RayHead(num_cpus=2)
    try:
        out = str(tmp_path / "submitted")
        submission_id = f"raylib-fail-{os.getpid()}"
        cmd = ["ray", "job", "submit", "--address", head.dashboard, "--working-dir", REPO, "--submission-id",
               submission_id, "--", "python", "jobs/finetune.py", "jobs/examples/lora.yaml",
               "--set", f"model.path={broken}", "--set", f"data.train={demo_data['train']}",
               "--set", f"data.eval={demo_data['eval']}", "--set", f"output.dir={out}",
               "--set", "train.max_steps=2", "--set", "data.max_length=256"]
        proc = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=900, cwd=REPO)
        streamed = proc.stdout + proc.stderr  # `ray job submit` follows the job's log until it ends
        assert proc.returncode != 0, streamed[-4000:]
        assert "error: training failed:" in streamed and f"cannot load the weights of {str(broken)!r}" in streamed, streamed[-4000:]
        # Ray's own CLI with the head's environment (token auth): the status Ray recorded
        status = subprocess.run(["ray", "job", "status", "--address", head.dashboard, submission_id], env=head.env,
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert f"Job '{submission_id}' failed" in status.stdout + status.stderr, status.stdout + status.stderr
        logs = subprocess.run(["ray", "job", "logs", "--address", head.dashboard, submission_id], env=head.env,
                              capture_output=True, text=True, timeout=120, cwd=REPO).stdout
        assert "error: training failed:" in logs and f"cannot load the weights of {str(broken)!r}" in logs, logs[-4000:]
        assert "expert saved" not in logs
    finally:
        head.stop()


def test_root_cause_reaches_the_worker_exception_through_ray_trains_wrappers():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from raylib.errors import TrainingFailed
    from raylib.launch import root_cause
    from raylib.objectives.rewards import RewardError

    try:
        raise RewardError("reward function 'm:f' raised ValueError: boom") from ValueError("boom")
    except RewardError as exc:
        worker_exc = exc
    tb = "Traceback (most recent call last):\n  File x\nraylib.objectives.rewards.RewardError: reward function 'm:f' raised ValueError: boom"
    error = WorkerGroupError("rank 0 failed", {1: UserExceptionWithTraceback(ValueError("other"), "ValueError: other"),
                                                0: UserExceptionWithTraceback(worker_exc, tb)})
    kind, last, logs = root_cause(error)
    assert (kind, last) == ("RewardError", "reward function 'm:f' raised ValueError: boom")
    try:
        raise TrainingFailed("training failed: X: y. Worker output is in /logs") from error
    except TrainingFailed as exc:
        assert root_cause(exc)[:2] == ("TrainingFailed", "training failed: X: y. Worker output is in /logs")
