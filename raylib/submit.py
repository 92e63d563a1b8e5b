"""`raylib submit / status / logs / stop`: jobs on a remote Ray cluster via Ray's Job SDK.

`raylib submit job.yaml --address http://HEAD:8265` validates the job here (schema errors
exit 2 before anything is sent), then submits it with `JobSubmissionClient.submit_job`:

- working_dir: the raylib project (the directory holding jobs/finetune.py), so the cluster
  runs this checkout's code; `--working-dir` or a `--runtime-env` file may name another;
- the job YAML travels in the runtime_env as `$RAYLIB_JOB_YAML` (it need not live inside the
  working_dir); jobs/finetune.py writes it to a file in the job's directory and runs
  `raylib train` on it, so paths in the job resolve on the cluster, against the job's cwd;
- logs stream until the job ends; the exit status is the job's (0 SUCCEEDED, 1 otherwise).

Ray 2.60 turns token authentication on: the token ($RAY_AUTH_TOKEN, else the file
$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is sent as an `Authorization: Bearer` header.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import click
import yaml

import raylib
from raylib.errors import ConfigError, RaylibError

JOB_ENV = "RAYLIB_JOB_YAML"
DEFAULT_EXCLUDES = [".venv", ".git", "runs", "models", "data", "mlruns", "**/__pycache__", "*.egg-info"]
FINETUNE = os.path.join("jobs", "finetune.py")


class JobFailed(RaylibError):
    exit_code = 1


def project_root() -> str | None:
    """The source checkout raylib runs from, if it has the job entrypoint."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(raylib.__file__)))
    return root if os.path.isfile(os.path.join(root, FINETUNE)) else None


def auth_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        if os.path.isfile(path):
            token = open(path).read().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if "://" not in address:
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:  # ConnectionError, auth errors: one line, exit 1
        raise JobFailed(f"cannot reach the Ray job server at {address}: {str(exc).splitlines()[0]}") from exc


def build_submission(job_yaml: str, overrides: list[str], working_dir: str | None, runtime_env_file: str | None):
    """(entrypoint, runtime_env) for a job; validates the job schema first."""
    from raylib.config import apply_override, read_yaml, validate_job

    raw = read_yaml(job_yaml)
    for item in overrides:
        apply_override(raw, item)
    validate_job(raw, source=job_yaml)  # schema only: data/model paths are the cluster's

    env: dict = {}
    if runtime_env_file:
        if not os.path.isfile(runtime_env_file):
            raise ConfigError("--runtime-env", f"{runtime_env_file!r} does not exist", "pass a runtime_env YAML file")
        env = yaml.safe_load(open(runtime_env_file)) or {}
        if not isinstance(env, dict):
            raise ConfigError("--runtime-env", f"{runtime_env_file} must be a YAML mapping")
    wd = working_dir or env.get("working_dir") or project_root()
    if wd and "://" not in wd:
        wd = os.path.abspath(wd)
        if not os.path.isdir(wd):
            raise ConfigError("--working-dir", f"{wd!r} is not a directory", "pass the raylib project directory")
    if wd:
        env["working_dir"] = wd
        env.setdefault("excludes", DEFAULT_EXCLUDES)
    env["env_vars"] = {**(env.get("env_vars") or {}), JOB_ENV: yaml.safe_dump(raw, sort_keys=False)}
    # (no TOKENIZERS_PARALLELISM here: the driver's ray.init sets it, and Ray refuses the same key twice)
    has_entry = wd and ("://" in wd or os.path.isfile(os.path.join(wd, FINETUNE)))
    entrypoint = f"python {FINETUNE} --job-env {JOB_ENV}" if has_entry else f"python -m raylib.job_entry --job-env {JOB_ENV}"
    return entrypoint, env


def stream_logs(c, job_id: str, out=sys.stdout) -> None:
    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def wait_status(c, job_id: str, timeout: float = 60.0):
    deadline = time.time() + timeout
    status = c.get_job_status(job_id)
    while not status.is_terminal() and time.time() < deadline:
        time.sleep(0.5)
        status = c.get_job_status(job_id)
    return status


# --------------------------------------------------------------------------- commands

_address = click.option("--address", default=None, help="Ray dashboard / job server, e.g. http://HEAD:8265 "
                        "(default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, http://127.0.0.1:8265)")


@click.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a job field")
@_address
@click.option("--working-dir", default=None, help="uploaded as the job's working_dir (default: the raylib project)")
@click.option("--runtime-env", "runtime_env_file", default=None, help="runtime_env YAML (see cluster/runtime_env.yaml)")
@click.option("--resume", is_flag=True, help="continue the run in output.dir (raylib train --resume on the cluster)")
@click.option("--submission-id", default=None, help="job id to use (default: Ray picks one)")
@click.option("--no-wait", is_flag=True, help="print the job id and return without streaming logs")
def submit(job_yaml, overrides, address, working_dir, runtime_env_file, resume, submission_id, no_wait):
    """Submit JOB_YAML to a Ray cluster as a Ray job; stream its logs; exit with its status."""
    entrypoint, env = build_submission(job_yaml, list(overrides), working_dir, runtime_env_file)
    if resume:
        entrypoint += " --resume"
    c = client(address)
    job_id = c.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id,
                          metadata={"raylib_job": os.path.basename(job_yaml)})
    click.echo(f"submitted {job_id}  (raylib status {job_id} | raylib logs {job_id} | raylib stop {job_id})", err=True)
    if no_wait:
        click.echo(job_id)
        return
    try:
        stream_logs(c, job_id)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job keeps running: raylib stop {job_id}", err=True)
        sys.exit(130)
    status = wait_status(c, job_id)
    click.echo(f"job {job_id}: {status.value}", err=True)
    if status.value != "SUCCEEDED":
        info = c.get_job_info(job_id)
        raise JobFailed(f"job {job_id} ended {status.value}: {(info.message or '').strip()[:300]}")


@click.command()
@click.argument("job_id")
@_address
def status(job_id, address):
    """Status of JOB_ID (exit 0 if it succeeded or is still running, 1 if it failed or was stopped)."""
    info = client(address).get_job_info(job_id)
    took = ""
    if info.start_time:
        end = info.end_time or time.time() * 1000
        took = f"  ({(end - info.start_time) / 1000:.0f} s)"
    click.echo(f"{job_id}: {info.status.value}{took}")
    click.echo(f"entrypoint: {info.entrypoint}")
    if info.message:
        click.echo(f"message: {info.message.strip()}")
    if info.status.value in ("FAILED", "STOPPED"):
        sys.exit(1)


@click.command()
@click.argument("job_id")
@_address
@click.option("--follow", "-f", is_flag=True, help="stream until the job ends")
def logs(job_id, address, follow):
    """Print the logs of JOB_ID."""
    c = client(address)
    if follow:
        stream_logs(c, job_id)
    else:
        click.echo(c.get_job_logs(job_id), nl=False)


@click.command()
@click.argument("job_id")
@_address
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until the job has stopped")
def stop(job_id, address, wait):
    """Stop JOB_ID."""
    c = client(address)
    if not c.stop_job(job_id):
        click.echo(f"{job_id} was not running ({c.get_job_status(job_id).value})")
        return
    if wait:
        click.echo(f"{job_id}: {wait_status(c, job_id, timeout=120).value}")
    else:
        click.echo(f"stop requested for {job_id}")
