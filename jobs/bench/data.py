"""Benchmark: data ingestion, `data.loader: local` (every worker prepares the whole dataset)
vs `data.loader: ray` (Ray Data prepares it once on the cluster, workers stream their shards).

Writes synthetic instruction JSONL (raylib.synthetic, the demo domains) of each size in
`--rows`, then per (loader, rows) runs `raylib train` on the tiny model with 2 workers for
`--steps` steps, in a fresh Ray each (or on `--two-node`: the 2-node loopback cluster the
multi-node tests use, workers SPREAD over the nodes), and reads the run's own figures:

- time to first step: the CLI's start to the first step event (metrics.jsonl);
- preprocessing CPU-seconds: CPU time spent reading, tokenizing and packing, summed over
  every process that did it (each worker under `local`; the Ray Data tasks under `ray`);
- peak RSS: the largest training worker's resident-memory high-water mark (`peak_rss_mb`).

Prints a table, then one JSON line. Goal: `ray`'s worker RSS flat from 100k to 1M rows
(`local`'s grows with the data), and preprocessing CPU-seconds ~1/N of `local`'s on N workers.

    python jobs/bench/data.py [--rows 100000 1000000] [--local-max-rows 1000000] [--steps 5] [--two-node]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TWO_NODE_SCRIPT = """
import json, sys, ray
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                        "include_dashboard": False})
c.add_node(num_cpus=2, node_ip_address="127.0.0.1")
c.wait_for_nodes()
print(json.dumps({"address": c.address}), flush=True)
sys.stdin.read()
c.shutdown()
"""
#: Ray keeps a loopback cluster's addresses on 127.0.0.1 with this (see tests/test_multinode.py)
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def write_rows(path: str, n: int) -> str:
    from raylib.synthetic import make_rows

    if os.path.exists(path):
        return path
    with open(path + ".tmp", "w") as f:
        for start in range(0, n, 50_000):  # seeded chunks: no 1M-row list in memory
            for row in make_rows(min(50_000, n - start), seed=start):
                f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    return path


def run_one(model: str, train: str, loader: str, steps: int, work: str, address: str | None, env: dict) -> dict:
    import yaml

    out = tempfile.mkdtemp(prefix=f"bench-data-{loader}-", dir=work)
    job = {
        "model": {"path": model},
        "data": {"train": train, "eval_split": 0.001, "max_length": 256, "loader": loader},
        "method": {"name": "lora", "r": 8},
        "train": {"max_steps": steps, "batch_size": 8, "checkpoint_every": 0, "lr": 1e-3},
        "scaling": {"num_workers": 2, "placement_strategy": "SPREAD" if address else "PACK"},
        "output": {"dir": os.path.join(out, "run")},
    }
    path = os.path.join(out, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    cmd = [sys.executable, "-m", "raylib.cli", "train", path, "--quiet"] + (["--address", address] if address else [])
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. `local` at 1M rows on a 24 GB machine: Ray's OOM killer
        error = next((line for line in reversed(proc.stderr.splitlines()) if line.startswith("error:")), "")
        oom = "out of memory" in proc.stderr or "low on memory" in proc.stderr
        return {"failed": "out of memory" if oom else error[:200], "loader": loader}
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f]
    first = min(e["time"] for e in events if e["type"] == "step")
    with open(os.path.join(out, "run", "run.json")) as f:
        m = json.load(f)["metrics"]
    return {"first_step_s": round(first - started, 1), "prepare_cpu_s": round(m["data_prepare_cpu_s"], 1),
            "peak_rss_mb": round(m["peak_rss_mb"]), "sequences": m["data_train_sequences"],
            "loader": m["data_loader"], "nodes": m.get("num_nodes")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--local-max-rows", type=int, default=1_000_000,
                   help="skip loader local above this many rows (each worker holds the whole dataset)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--two-node", action="store_true", help="run on a 2-node loopback cluster (SPREAD)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "raylib-bench-data"))
    args = p.parse_args()

    from raylib.tiny_models import build_tiny

    os.makedirs(args.work, exist_ok=True)
    model = build_tiny(os.path.join(os.path.expanduser("~/.cache/raylib-tests"), "tiny-llama"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cluster, address = None, None
    if args.two_node:
        env.update(LOOPBACK_ENV)
        cluster = subprocess.Popen([sys.executable, "-c", TWO_NODE_SCRIPT], env=env, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, start_new_session=True)
        address = json.loads(cluster.stdout.readline())["address"]
    results = []
    try:
        for rows in args.rows:
            train = write_rows(os.path.join(args.work, f"rows-{rows}.jsonl"), rows)
            for loader in ("local", "ray"):
                if loader == "local" and rows > args.local_max_rows:
                    continue
                r = run_one(model, train, loader, args.steps, args.work, address, env)
                results.append({"rows": rows, **r})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            cluster.stdin.close()
            try:
                cluster.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(cluster.pid, signal.SIGKILL)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; 2 workers; "
          f"{'2-node loopback cluster (SPREAD)' if address else 'one node'}")
    print(f"{'loader':<7}{'rows':>10}{'first step s':>14}{'prep CPU s':>12}{'worker RSS MB':>15}{'sequences':>11}")
    for r in results:
        if "failed" in r:
            print(f"{r['loader']:<7}{r['rows']:>10}  failed: {r['failed']}")
            continue
        print(f"{r['loader']:<7}{r['rows']:>10}{r['first_step_s']:>14}{r['prepare_cpu_s']:>12}{r['peak_rss_mb']:>15}"
              f"{r['sequences']:>11}")
    by = {(r["loader"], r["rows"]): r for r in results if "failed" not in r}
    summary = {"two_node": bool(address), "runs": results}
    ray_rows = sorted(rows for (loader, rows) in by if loader == "ray")
    if len(ray_rows) >= 2:
        summary["ray_rss_ratio_largest_vs_smallest"] = round(
            by[("ray", ray_rows[-1])]["peak_rss_mb"] / by[("ray", ray_rows[0])]["peak_rss_mb"], 2)
    for rows in sorted({r for (_, r) in by}):
        if ("local", rows) in by and ("ray", rows) in by:
            summary[f"cpu_ratio_ray_vs_local_{rows}"] = round(
                by[("ray", rows)]["prepare_cpu_s"] / max(by[("local", rows)]["prepare_cpu_s"], 1e-9), 2)
            summary[f"first_step_ratio_ray_vs_local_{rows}"] = round(
                by[("ray", rows)]["first_step_s"] / by[("local", rows)]["first_step_s"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
