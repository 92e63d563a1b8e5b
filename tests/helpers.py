"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAYLIB = os.path.join(os.path.dirname(sys.executable), "raylib")


def job_dict(model: str, data: dict[str, str], out: str, **sections) -> dict:
    """A small, fast job on the tiny model; `sections` override whole sections' keys."""
    job = {
        "model": {"path": model},
        "data": {"train": data["train"], "eval": data["eval"], "max_length": 256},
        "method": {"name": "lora", "r": 8},
        "train": {"lr": 3e-3, "max_steps": 8, "batch_size": 4, "checkpoint_every": 4},
        "output": {"dir": out},
    }
    for name, values in sections.items():
        if name == "method" and "name" in values:  # another method: its own options only
            job["method"] = dict(values)
        else:
            job.setdefault(name, {}).update(values)
    return job


def write_job(path, job: dict) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return str(path)


def run_cli(*args, env: dict | None = None, timeout: int = 600, cwd: str | None = None) -> subprocess.CompletedProcess:
    """The installed `raylib` console script in a fresh process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([RAYLIB, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Python in a fresh process (e.g. to prove plain peft/transformers load an output)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A `ray start --head --block` cluster on 127.0.0.1 with its own free ports.

    Stopping it terminates only this process tree: `ray stop` would also kill every other
    Ray on the machine, including the test session's own.
    """

    def __init__(self, num_cpus: int = 2):
        import time
        import urllib.request

        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = os.path.dirname(sys.executable)
        # token auth on, as Ray 2.60 defaults to; clients read the token from ~/.ray/auth_token
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "token"}
        if not os.path.exists(os.path.expanduser("~/.ray/auth_token")):
            subprocess.run([os.path.join(bin_dir, "ray"), "get-auth-token", "--generate"], env=self.env,
                           check=True, capture_output=True)
        self.env.pop("RAY_ADDRESS", None)
        ports = {
            "--port": self.port, "--dashboard-port": self.dashboard_port,
            "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
            "--node-manager-port": free_port(), "--object-manager-port": free_port(),
            "--ray-client-server-port": free_port(),
        }
        cmd = [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={num_cpus}",
               *[f"{k}={v}" for k, v in ports.items()]]
        import tempfile
        import urllib.error

        self.log = tempfile.NamedTemporaryFile(prefix="ray-head-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {open(self.log.name).read()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # it answers (401 under Ray's token auth): it is up
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError("the Ray head did not come up within 180 s")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        # `ray stop` would remove the pointer Ray leaves to "the" local cluster; do it for ours
        pointer = "/tmp/ray/ray_current_cluster"
        try:
            if open(pointer).read().strip().endswith(f":{self.port}"):
                os.remove(pointer)
        except OSError:
            pass


def stray_stderr(stderr: str) -> list[str]:
    """stderr lines of a raylib command that are neither progress nor a warning (a successful
    run has none). Progress: our bar/lines, the worker's parameter count, Ray's start notice."""
    import re

    progress = ("training:", "step ", "eval loss", "resumed", "expert saved")
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    # Ray's own bug on a machine running several Ray instances (a shared dev/CI box, not a
    # cluster node): Ray Train's PlacementGroupCleaner resolves "auto" to another instance and
    # exits, and the controller reports that. Only tolerated when Ray says so in the same output.
    several_rays = "Found multiple active Ray instances" in stderr
    in_cleaner_report = False
    bad = []
    for raw in stderr.splitlines():
        line = ansi.sub("", raw).strip()
        body = re.sub(r"^\((\w+) pid=\d+\)\s*", "", line)  # Ray's prefix for worker output
        if several_rays:
            if line.startswith("(PlacementGroupCleaner pid="):
                continue
            if "Failed to register placement group with cleaner" in line:
                in_cleaner_report = True
                continue
            if in_cleaner_report and line.startswith("(TrainController pid="):
                continue
            in_cleaner_report = False
        if (not line or body.startswith(progress) or "WARNING" in line or "Warning" in line
                or body.startswith("INFO raylib") or "Started a local Ray instance" in line):
            continue
        bad.append(raw)
    return bad


class RequestLoop:
    """Clients that call `send()` over and over, from `threads` threads, until the block ends;
    `results` holds each call's return value, or ("error", text) when it raised (a connection
    error counts as a failed request). What the replica-kill and run-time-expert tests count."""

    def __init__(self, send, threads: int = 1):
        import threading

        self.send, self.results, self.stop = send, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.results.append(self.send(len(self.results)))
            except Exception as exc:  # noqa: BLE001 - a failed request is a result
                self.results.append(("error", str(exc)))

    def __enter__(self) -> "RequestLoop":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
