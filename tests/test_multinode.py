"""Two Ray nodes on one machine (ray.cluster_utils.Cluster, both on 127.0.0.1):
a 2-worker SPREAD job whose workers run on different nodes, and a Tune search whose trials do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import yaml
from helpers import job_dict, run_cli, write_job

pytestmark = pytest.mark.slow


# Ray rewrites a 127.0.0.1 cluster address to the machine's interface address when a second
# node or a driver joins (services.resolve_ip_for_localhost), where a loopback-bound GCS does
# not listen. With this variable off, Ray keeps every address on 127.0.0.1 (it also disables
# `ray start --address`, so the nodes come from ray.cluster_utils.Cluster, Ray's own tool for
# multi-node clusters on one machine).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

CLUSTER_SCRIPT = """
import json, sys, ray
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                        "include_dashboard": False})
c.add_node(num_cpus=2, node_ip_address="127.0.0.1")
c.wait_for_nodes()
ray.init(address=c.address, logging_level="ERROR")
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
ray.shutdown()
print(json.dumps({"address": c.address, "nodes": nodes}), flush=True)
sys.stdin.read()  # runs until the test closes stdin
c.shutdown()
"""


@pytest.fixture(scope="module")
def two_nodes():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(LOOPBACK_ENV)
    log = tempfile.NamedTemporaryFile(prefix="ray-2nodes-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, f"the 2-node cluster did not start: {open(log.name).read()[-3000:]}"
        info = json.loads(line)
        assert len(info["nodes"]) == 2, info
        yield info["address"], info["nodes"], env
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=120)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)


def test_spread_job_runs_its_workers_on_different_nodes(two_nodes, tiny_model, demo_data, tmp_path):
    address, nodes, env = two_nodes
    out = str(tmp_path / "spread")
    job = write_job(tmp_path / "job.yaml", job_dict(
        tiny_model, demo_data, out, train={"max_steps": 4, "checkpoint_every": 2},
        scaling={"num_workers": 2, "placement_strategy": "SPREAD", "resources_per_worker": {"CPU": 1}}))
    proc = run_cli("train", job, "--address", address, "--quiet", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.load(open(os.path.join(out, "run.json")))["metrics"]
    ids = metrics["worker_node_ids"].split(",")
    assert len(ids) == 2 and set(ids) == set(nodes), (ids, nodes)  # one worker per node
    assert metrics["num_nodes"] == 2 and metrics["world_size"] == 2 and metrics["step"] == 4


def test_tune_trials_spread_over_nodes(two_nodes, tiny_model, demo_data, tmp_path):
    address, nodes, env = two_nodes
    # each trial's single Train worker takes a whole node (2 CPUs): two concurrent trials
    # can only run side by side if Tune places them on different nodes
    job = write_job(tmp_path / "job.yaml", job_dict(
        tiny_model, demo_data, str(tmp_path / "base"), train={"max_steps": 4, "checkpoint_every": 2},
        scaling={"num_workers": 1, "resources_per_worker": {"CPU": 2}}))
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"space": {"train.lr": "grid [1.0e-3, 3.0e-3]"}, "metric": "eval_loss",
                                      "mode": "min", "algorithm": "grid", "max_concurrent": 2,
                                      "scheduler": {"name": "none"}}))
    proc = run_cli("tune", job, "--search", str(search), "--address", address, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    trials_dir = str(tmp_path / "base-search" / "trials")
    trial_nodes = {}
    for trial in os.listdir(trials_dir):
        metrics = json.load(open(os.path.join(trials_dir, trial, "run.json")))["metrics"]
        trial_nodes[trial] = metrics["worker_node_ids"]
    assert len(trial_nodes) == 2
    assert set(trial_nodes.values()) == set(nodes), trial_nodes
