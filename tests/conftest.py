"""Shared fixtures: the tiny model and synthetic data (built locally, no hub) and one
embedded Ray instance for the whole session (starting Ray costs seconds on 2 cores)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402

CACHE = os.environ.get("RAYLIB_TEST_CACHE", os.path.expanduser("~/.cache/raylib-tests"))


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The pretrained tiny Llama (built once per machine, rebuilt when its recipe changes)."""
    from raylib.tiny_models import build_tiny

    return build_tiny(os.path.join(CACHE, "tiny-llama"))


@pytest.fixture(scope="session")
def instruct_tiny_model() -> str:
    """A tiny base pretrained half in the alpaca template (about 6.5 minutes on 2 cores, once
    per machine): it has every domain's skill, but in the template picks the asked operation
    only half the time, which SVF, only rescaling singular values, can fix
    (`tiny_models.INSTRUCT_TINY`). The default tiny base never saw the template."""
    from raylib.tiny_models import build_instruct_tiny

    return build_instruct_tiny(os.path.join(CACHE, "tiny-llama-instruct"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, str]:
    from raylib.synthetic import write_dataset

    return write_dataset(str(tmp_path_factory.mktemp("data")), n_train=600, n_eval=60)


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory) -> dict[str, str]:
    """Synthetic classification rows (text, task, label) for the heads method."""
    from raylib.synthetic import write_classification_dataset

    return write_classification_dataset(str(tmp_path_factory.mktemp("cls")), n_train=400, n_eval=90)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that trains through Ray Train (stopped at the end); always a
    fresh one (`address="local"`), never a `ray start` cluster another test or user left running."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()


class S3Server:
    """A real S3 API on 127.0.0.1 (moto's server) with IAM auth on: `rw` may do anything,
    `ro` may only read, and unknown or missing credentials are refused."""

    def __init__(self):
        import json
        import subprocess
        import sys
        import time
        import urllib.error
        import urllib.request

        import boto3
        from helpers import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # the first requests (setting up users and the bucket) pass unauthenticated, the rest are checked
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "8"}
        self.proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                                      "-p", str(self.port)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        self.keys = {}
        for user, actions in (("rw", ["s3:*"]), ("ro", ["s3:GetObject", "s3:ListBucket", "s3:HeadObject"])):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            self.keys[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        self.client().create_bucket(Bucket="bucket")

    def env(self, user: str | None = "rw") -> dict[str, str]:
        """Environment for a process using this server as `user` (None: no credentials)."""
        base = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        return {**base, **(self.keys[user] if user else {})}

    def client(self, user: str = "rw"):
        import boto3

        k = self.keys[user]
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=k["AWS_ACCESS_KEY_ID"], aws_secret_access_key=k["AWS_SECRET_ACCESS_KEY"])

    def keys_under(self, prefix: str, bucket: str = "bucket") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()
