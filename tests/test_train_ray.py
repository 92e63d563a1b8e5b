"""Jobs through Ray Train on a local Ray: 2 workers, checkpoints, kill-and-resume, full FT."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import yaml
from helpers import job_dict, run_cli, run_python, stray_stderr, write_job

from raylib import launch
from raylib.config import validate_job
from raylib.errors import ConfigError, TrainingFailed


def _events(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_worker_lora_job(ray_session, tiny_model, demo_data, tmp_path):
    out = str(tmp_path / "run")
    job = validate_job(job_dict(tiny_model, demo_data, out, scaling={"num_workers": 2},
                                train={"max_steps": 12, "checkpoint_every": 6}, output={"domain": "mixed"}))
    result = launch.train(job, show_progress=False)

    m = result.metrics
    assert m["world_size"] == 2 and m["step"] == 12
    assert m["eval_loss"] < m["eval_loss_before"] - 0.5, m
    assert 0 < m["trainable_params"] < m["total_params"]
    ckpts = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_"))
    assert ckpts == ["step_0000006", "step_0000012"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "expert.json", "job.yaml"):
        assert os.path.isfile(os.path.join(out, name)), name
    info = json.load(open(os.path.join(out, "expert.json")))
    assert info["method"] == "lora" and info["base_model"] == tiny_model and info["domain"] == "mixed"
    assert info["metrics"]["eval_loss"] == pytest.approx(m["eval_loss"])
    steps = [e for e in _events(out) if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 13)) and all(e["tokens_per_s"] > 0 for e in steps)

    # plain peft/transformers load it (no raylib import) and the adapter changes the model
    proc = run_python(f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained({out!r})
ids = tok("What is 2 + 3?", return_tensors="pt").input_ids
base = AutoModelForCausalLM.from_pretrained({tiny_model!r})
with torch.no_grad():
    before = base(ids).logits
model = PeftModel.from_pretrained(base, {out!r}).eval()
with torch.no_grad():
    after = model(ids).logits
print((after - before).abs().max().item())
print(len(model.generate(ids, max_new_tokens=4, do_sample=False)[0]) > ids.shape[1])
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    delta, generated = proc.stdout.split()
    assert float(delta) > 1e-3 and generated == "True"

    with pytest.raises(ConfigError, match="already holds a run"):
        launch.train(job, show_progress=False)


def _kill_a_train_worker() -> int:
    import ray
    from ray.util.state import list_actors

    # name this session's cluster: other Ray instances on the machine make autodetection fail
    workers = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    pid = workers[0].pid
    os.kill(pid, 9)
    return pid


def test_killed_worker_then_resume_continues_from_the_checkpoint(ray_session, tiny_model, demo_data, tmp_path):
    out = str(tmp_path / "run")
    job = validate_job(job_dict(tiny_model, demo_data, out, scaling={"num_workers": 2},
                                train={"max_steps": 60, "checkpoint_every": 4, "max_failures": 0}))
    failure: list[BaseException] = []

    def first_run():
        try:
            launch.train(job, show_progress=False)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            failure.append(exc)

    thread = threading.Thread(target=first_run)
    thread.start()
    snapshot = os.path.join(out, "checkpoints", launch.SNAPSHOT)
    deadline = time.time() + 300
    while not os.path.exists(snapshot) and time.time() < deadline and thread.is_alive():
        time.sleep(0.1)
    assert os.path.exists(snapshot), "no checkpoint was registered"
    _kill_a_train_worker()
    thread.join(timeout=300)
    assert failure and isinstance(failure[0], TrainingFailed), failure
    assert "--resume" in str(failure[0])

    result = launch.train(job, resume=True, show_progress=False)
    events = _events(out)
    restart = max(i for i, e in enumerate(events) if e["type"] == "start")
    resumed_at = events[restart]["step"]
    assert events[restart]["resumed_from"] and resumed_at >= 4 and resumed_at % 4 == 0
    steps = [e["step"] for e in events[restart:] if e["type"] == "step"]
    assert steps == list(range(resumed_at + 1, 61))  # continues, does not restart at 1
    assert result.metrics["step"] == 60


def test_full_finetune_local_mode_generates(ray_session, tiny_model, demo_data, tmp_path):
    out = str(tmp_path / "full")
    job = validate_job(job_dict(tiny_model, demo_data, out, method={"name": "full"},
                                scaling={"num_workers": 2}, train={"max_steps": 6, "lr": 5e-4, "checkpoint_every": 0}))
    result = launch.train(job, local=True, show_progress=False)  # --local: one worker
    assert result.metrics["world_size"] == 1
    # ... with every CPU of the node (ray_session has 2), as torch threads
    assert result.metrics["torch_threads"] == 2
    with open(os.path.join(out, "job.yaml")) as f:
        assert yaml.safe_load(f)["scaling"]["resources_per_worker"] == {"CPU": 2.0}
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    assert result.metrics["trainable_params"] == result.metrics["total_params"]
    proc = run_python(f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({out!r})
model = AutoModelForCausalLM.from_pretrained({out!r})
ids = tok("Uppercase the word. lamp =>", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=5, do_sample=False)
print(repr(tok.decode(out[0, ids.shape[1]:])))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip()) > 2


def test_local_cli_run_reports_its_threads_and_keeps_named_resources(tiny_model, demo_data, tmp_path):
    """`raylib train --local` with resources the job names: they are kept, and the start
    line says what the worker got; a successful run's stderr is progress only."""
    job = write_job(tmp_path / "job.yaml", job_dict(
        tiny_model, demo_data, str(tmp_path / "run"), scaling={"resources_per_worker": {"CPU": 1}},
        train={"max_steps": 2, "checkpoint_every": 0}))
    proc = run_cli("train", job, "--local", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = [line for line in proc.stderr.splitlines() if line.startswith("training:")]
    assert len(start) == 1 and start[0].endswith("; 1 worker on cpu, 1 torch thread"), proc.stderr[-3000:]
    assert stray_stderr(proc.stderr) == [], proc.stderr[-3000:]
