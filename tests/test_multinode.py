"""Two Ray nodes on one machine (`ray start --head` + `ray start --address`, both on 127.0.0.1):
a 2-worker SPREAD job whose workers run on different nodes, and a Tune search whose trials do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from helpers import RayHead, free_port, job_dict, run_cli, write_job

pytestmark = pytest.mark.slow


class RayNode:
    """`ray start --address HEAD --block`: a second node joining the head (own ports)."""

    def __init__(self, head: RayHead, num_cpus: int):
        bin_dir = os.path.dirname(sys.executable)
        ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
        cmd = [os.path.join(bin_dir, "ray"), "start", f"--address={head.address}", "--block",
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", *[f"{k}={v}" for k, v in ports.items()]]
        self.log = tempfile.NamedTemporaryFile(prefix="ray-node-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=head.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _alive_nodes(head: RayHead) -> list[str]:
    code = ("import ray; ray.init(address=%r, logging_level='ERROR');"
            "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))" % head.address)
    proc = subprocess.run([sys.executable, "-c", code], env=head.env, capture_output=True, text=True, timeout=120)
    return proc.stdout.split()


@pytest.fixture(scope="module")
def two_nodes():
    head = RayHead(num_cpus=2)
    node = RayNode(head, num_cpus=2)
    try:
        deadline = time.time() + 180
        nodes = []
        while time.time() < deadline and len(nodes) < 2:
            assert node.proc.poll() is None, open(node.log.name).read()[-3000:]
            nodes = _alive_nodes(head)
            time.sleep(1)
        assert len(nodes) == 2, nodes
        yield head, nodes
    finally:
        node.stop()
        head.stop()


def test_spread_job_runs_its_workers_on_different_nodes(two_nodes, tiny_model, demo_data, tmp_path):
    head, nodes = two_nodes
    out = str(tmp_path / "spread")
    job = write_job(tmp_path / "job.yaml", job_dict(
        tiny_model, demo_data, out, train={"max_steps": 4, "checkpoint_every": 2},
        scaling={"num_workers": 2, "placement_strategy": "SPREAD", "resources_per_worker": {"CPU": 1}}))
    proc = run_cli("train", job, "--address", head.address, "--quiet", env=head.env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.load(open(os.path.join(out, "run.json")))["metrics"]
    ids = metrics["worker_node_ids"].split(",")
    assert len(ids) == 2 and set(ids) == set(nodes), (ids, nodes)  # one worker per node
    assert metrics["num_nodes"] == 2 and metrics["world_size"] == 2 and metrics["step"] == 4


def test_tune_trials_spread_over_nodes(two_nodes, tiny_model, demo_data, tmp_path):
    head, nodes = two_nodes
    # each trial's single Train worker takes a whole node (2 CPUs): two concurrent trials
    # can only run side by side if Tune places them on different nodes
    job = write_job(tmp_path / "job.yaml", job_dict(
        tiny_model, demo_data, str(tmp_path / "base"), train={"max_steps": 4, "checkpoint_every": 2},
        scaling={"num_workers": 1, "resources_per_worker": {"CPU": 2}}))
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"space": {"train.lr": "grid [1.0e-3, 3.0e-3]"}, "metric": "eval_loss",
                                      "mode": "min", "algorithm": "grid", "max_concurrent": 2,
                                      "scheduler": {"name": "none"}}))
    proc = run_cli("tune", job, "--search", str(search), "--address", head.address, env=head.env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    trials_dir = str(tmp_path / "base-search" / "trials")
    trial_nodes = {}
    for trial in os.listdir(trials_dir):
        metrics = json.load(open(os.path.join(trials_dir, trial, "run.json")))["metrics"]
        trial_nodes[trial] = metrics["worker_node_ids"]
    assert len(trial_nodes) == 2
    assert set(trial_nodes.values()) == set(nodes), trial_nodes
