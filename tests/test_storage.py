"""Storage across nodes: output.dir as a URI on a real S3 API (moto on 127.0.0.1).

Credentials come from the environment only; a wrong bucket, missing or read-only
credentials, or credentials inside the URI stop the job before Ray starts.
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import REPO, job_dict, run_cli, run_python, write_job


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
