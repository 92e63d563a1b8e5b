"""Storage across nodes: output.dir as a URI on a real S3 API (moto on 127.0.0.1).

Credentials come from the environment only; a wrong bucket, missing or read-only
credentials, or credentials inside the URI stop the job before Ray starts.
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import job_dict, run_cli, run_python, stray_stderr as _stray_stderr, write_job


def _no_ray_started(proc) -> bool:
    return "Started a local Ray" not in proc.stdout + proc.stderr and "ray.init" not in proc.stderr


def _job(tmp_path, tiny_model, demo_data, out, **sections):
    return write_job(tmp_path / "job.yaml", job_dict(tiny_model, demo_data, out, **sections))


@pytest.mark.parametrize("uri, expected", [
    ("s3://AKIAEXAMPLE:secret@bucket/run", "carries credentials"),
    ("s3://bucket/run?access_key=AKIA&secret_key=x", "carries a credential"),
])
def test_credentials_in_the_uri_are_rejected(tmp_path, tiny_model, demo_data, uri, expected):
    proc = run_cli("train", _job(tmp_path, tiny_model, demo_data, uri))
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: output.dir:") and expected in err and len(err.splitlines()) == 1, err
    assert "AKIA" not in err and _no_ray_started(proc)


def test_unwritable_local_output_dir_fails_before_ray(tmp_path, tiny_model, demo_data):
    # /sys refuses new directories even to root (a chmod-ed directory would not stop root)
    proc = run_cli("train", _job(tmp_path, tiny_model, demo_data, "/sys/raylib-test-not-writable/run"))
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: output.dir:") and "not writable" in err and len(err.splitlines()) == 1, err
    assert _no_ray_started(proc)


def test_missing_bucket_fails_before_ray_with_one_line(s3_server, tmp_path, tiny_model, demo_data):
    proc = run_cli("train", _job(tmp_path, tiny_model, demo_data, "s3://missing-bucket/run"), env=s3_server.env("rw"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: output.dir: cannot write to s3://missing-bucket/run") and len(err.splitlines()) == 1, err
    assert "bucket does not exist" in err and _no_ray_started(proc)


@pytest.mark.parametrize("bucket, user, expected", [
    ("bucket", None, "no credentials found in the environment"),
    ("bucket", "ro", "Access Denied"),
    ("bucket", "bad", "Access Key Id you provided does not exist"),
])
def test_missing_or_read_only_credentials_fail_the_preflight(s3_server, monkeypatch, tmp_path, tiny_model, demo_data,
                                                             bucket, user, expected):
    from raylib import launch
    from raylib.config import validate_job
    from raylib.errors import ConfigError

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env("rw" if user == "bad" else user)
    if user == "bad":
        env["AWS_ACCESS_KEY_ID"] = "AKIANOTAKEY"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    job = validate_job(job_dict(tiny_model, demo_data, f"s3://{bucket}/run"))
    with pytest.raises(ConfigError, match="output.dir: cannot write to s3://bucket/run") as info:
        launch.preflight(launch.resolve_paths(job))
    assert expected in str(info.value)
    assert s3_server.keys_under("run/") == []


@pytest.mark.slow
def test_two_worker_job_on_s3_resumes_and_the_expert_loads_with_peft(s3_server, tmp_path, tiny_model, demo_data,
                                                                     monkeypatch):
    env = s3_server.env("rw")
    job = _job(tmp_path, tiny_model, demo_data, "s3://bucket/run", scaling={"num_workers": 2},
               train={"max_steps": 6, "checkpoint_every": 3}, output={"domain": "mixed"})
    first = run_cli("train", job, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert _stray_stderr(first.stderr) == [], first.stderr[-3000:]  # a successful run: progress and warnings only
    keys = s3_server.keys_under("run/")
    for name in ("expert.json", "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "job.yaml",
                 "run.json", "metrics.jsonl", "checkpoints/checkpoint_manager_snapshot.json"):
        assert f"run/{name}" in keys, (name, keys)
    steps = sorted({k.split("/")[2] for k in keys if k.startswith("run/checkpoints/step_")})
    assert steps == ["step_0000003", "step_0000006"], keys
    assert "expert saved to s3://bucket/run" in first.stdout

    # without --resume the run is protected; with it, training continues from step 6 on S3
    again = run_cli("train", job, env=env, timeout=300)
    assert again.returncode == 2 and "already holds a run" in again.stderr, again.stderr[-2000:]
    resumed = run_cli("train", job, "--resume", "--set", "train.max_steps=9", env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert "resumed from step 6" in resumed.stderr, resumed.stderr[-3000:]
    steps = sorted({k.split("/")[2] for k in s3_server.keys_under("run/checkpoints/") if "/step_" in k})
    assert steps[-1] == "step_0000009", steps

    # the expert comes back from S3 into the local cache and plain PEFT loads it
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RAYLIB_EXPERT_CACHE", str(tmp_path / "cache"))
    from raylib.experts import read_expert, resolve_expert

    local = resolve_expert("s3://bucket/run")
    info = read_expert(local)
    assert info.method == "lora" and info.step == 9 and info.domain == "mixed"
    assert not os.path.exists(os.path.join(local, "checkpoints"))
    assert resolve_expert("s3://bucket/run") == local  # cached while expert.json is unchanged
    proc = run_python(f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained({local!r})
ids = tok("What is 2 + 3?", return_tensors="pt").input_ids
base = AutoModelForCausalLM.from_pretrained({tiny_model!r})
with torch.no_grad():
    before = base(ids).logits
model = PeftModel.from_pretrained(base, {local!r}).eval()
with torch.no_grad():
    print((model(ids).logits - before).abs().max().item())
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) > 1e-3
    run_json = json.loads(s3_server.client().get_object(Bucket="bucket", Key="run/run.json")["Body"].read())
    assert run_json["checkpoint"] == "s3://bucket/run/checkpoints/step_0000009" and run_json["metrics"]["step"] == 9


def test_resolve_expert_from_an_fsspec_uri_caches_and_refetches(tmp_path, monkeypatch):
    """Any fsspec scheme works (here fsspec's in-memory filesystem): the expert is copied
    without its checkpoints, reused while expert.json is unchanged, fetched again after."""
    from raylib import storage
    from raylib.errors import ConfigError
    from raylib.experts import resolve_expert

    monkeypatch.setenv("RAYLIB_EXPERT_CACHE", str(tmp_path / "cache"))
    loc = storage.resolve("memory://raylib-test/run")
    assert loc.is_remote
    storage.write_text(loc, "adapter_config.json", "{}")
    storage.write_text(loc, "checkpoints/step_0000001/expert/big.bin", "x" * 1000)
    with pytest.raises(ConfigError, match="is not a raylib expert"):
        resolve_expert("memory://raylib-test/run")
    storage.write_text(loc, "expert.json", json.dumps({"method": "lora", "base_model": "m", "step": 1}))
    local = resolve_expert("memory://raylib-test/run")
    assert sorted(os.listdir(local)) == ["adapter_config.json", "expert.json"]
    assert resolve_expert("memory://raylib-test/run") == local
    storage.write_text(loc, "adapter_config.json", '{"r": 8}')
    assert open(os.path.join(resolve_expert("memory://raylib-test/run"), "adapter_config.json")).read() == "{}"
    storage.write_text(loc, "expert.json", json.dumps({"method": "lora", "base_model": "m", "step": 2}))
    again = resolve_expert("memory://raylib-test/run")
    assert again == local and open(os.path.join(again, "adapter_config.json")).read() == '{"r": 8}'
    assert resolve_expert(str(tmp_path)) == str(tmp_path)  # local paths pass through
