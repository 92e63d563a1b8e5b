"""Honest endings: a failure anywhere (a worker, a reward function, a trial of a search, a
save) ends `raylib train/tune` and `ray job submit` with a non-zero exit and one paragraph
that says what failed and where its log is; a successful run exits 0 with a clean stderr."""

from __future__ import annotations

import os

import pytest
import yaml
from helpers import REPO, job_dict, run_cli, stray_stderr, write_job

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
def test_a_failing_trial_in_a_search_of_3_exits_1_and_names_it(tmp_path, tiny_model, demo_data):
    # the middle trial asks LoRA for modules the model does not have: it fails in its workers
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, demo_data, str(tmp_path / "out"),
                                                    train={"max_steps": 2, "checkpoint_every": 2}))
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({
        "space": {"method.target_modules": "grid [[q_proj], [no_such_module], [v_proj]]"},
        "algorithm": "grid", "max_concurrent": 1, "scheduler": {"name": "none"}, "metric": "eval_loss", "mode": "min"}))
    proc = run_cli("tune", job, "--search", str(search), timeout=1200)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-4000:]
    err = _error_paragraph(proc.stderr)
    assert err.startswith("error: 1 of 3 trials failed:"), err
    assert "no_such_module" in err or "Target modules" in err, err
    assert "(logs: " in err, err
    assert proc.stdout.count("FINISHED") == 2 and proc.stdout.count("FAILED") == 1, proc.stdout


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
