"""Serving: router overhead and single-device expert switching, on one local Ray Serve.

Builds (or reuses) the tiny model and three small experts (arithmetic: SVF, strings: LoRA,
comparison: SVF), then deploys two apps side by side:

- `multi`: one deployment per expert + base, keywords router;
- `single`: one replica holding every expert (single-device mode).

Measured, interleaved round by round in the same run (each round alternates the variants):

(a) direct expert call: DeploymentHandle -> `expert-arithmetic`.generate
(b) through the router: DeploymentHandle -> router.route_and_generate (keywords routing, then
    the same expert through the router's handle); overhead = p50(b) - p50(a). Goal <= 2 ms.
(c) end-to-end HTTP through the router (OpenAI /v1/completions), for reference.
(d) single-device, `--concurrency` clients: mixed-expert load (round-robin over arithmetic,
    strings, comparison, base) vs single-expert load (arithmetic only): p50/p99, req/s.
Plus the replica's SVF expert switch times (set_z + weight rebuild).

    python jobs/bench/serve.py [--rounds 5] [--requests 40] [--concurrency 4] [--max-tokens 4]

Prints a table and a final one-line JSON summary. CPU figures are for ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = {"arithmetic": "What is 12 + 7?", "strings": "Reverse the word.\n\nlamp",
           "comparison": "Which is larger: 37 or 52?", "base": "Tell me something."}


def train_experts(model: str, work: str) -> dict[str, str]:
    from raylib.config import validate_job
    from raylib.launch import publish_expert
    from raylib.synthetic import write_dataset
    from raylib.train_loop import PlainSession, run

    methods = {"arithmetic": {"name": "svf", "targets": "mlp"}, "strings": {"name": "lora", "r": 8},
               "comparison": {"name": "svf", "targets": "mlp"}}
    out = {}
    for domain, method in methods.items():
        done = os.path.join(work, f"expert-{domain}")
        if not os.path.isfile(os.path.join(done, "expert.json")):
            data = write_dataset(os.path.join(work, f"data-{domain}"), n_train=200, n_eval=10, domains=[domain])
            job = validate_job({
                "model": {"path": model}, "data": {**data, "max_length": 256}, "method": method,
                "train": {"max_steps": 20, "checkpoint_every": 0, "eval_every": 0, "batch_size": 8,
                          "lr": 0.2 if method["name"] == "svf" else 3e-3},
                "output": {"dir": done, "domain": domain},
            })
            session = PlainSession(os.path.join(work, f"ckpt-{domain}"))
            run(job, session)
            publish_expert(os.path.join(session.reports[-1]["checkpoint"], "expert"), done)
        out[domain] = done
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def timed(fn, n: int, concurrency: int = 1) -> tuple[list[float], float]:
    """Latencies (s) of n calls of fn(i) with `concurrency` threads, and the wall time."""
    lat = [0.0] * n

    def one(i):
        t = time.perf_counter()
        fn(i)
        lat[i] = time.perf_counter() - t

    t0 = time.perf_counter()
    if concurrency == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
    return lat, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=40, help="per variant per round")
    ap.add_argument("--concurrency", type=int, default=4, help="clients for the single-device load test")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/raylib-bench/serve"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    import torch
    from ray import serve

    from raylib.tiny_models import build_tiny
    from raylib.serve.app import run
    from raylib.serve.config import validate_serve_config

    torch.set_num_threads(1)
    model = build_tiny(os.path.join(args.work, "tiny-llama"))
    experts = train_experts(model, args.work)
    ray.init(address="local", include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    cpu = {"num_cpus": 0.1}
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = {"base_model": model, "experts": {n: {"path": p, "resources": cpu} for n, p in experts.items()},
              "base": {"path": model, "resources": cpu},
              "router": {"strategy": "keywords", "resources": cpu,
                         "keywords": {"arithmetic": ["+"], "strings": ["reverse"], "comparison": ["larger"]}},
              "http": {"port": port}}
    t0 = time.perf_counter()
    run(validate_serve_config({**common, "app_name": "multi", "route_prefix": "/multi", "single_device": False}), blocking=False)
    run(validate_serve_config({**common, "app_name": "single", "route_prefix": "/single", "single_device": True}), blocking=False)
    print(f"deployed both apps in {time.perf_counter() - t0:.1f}s", flush=True)

    expert = serve.get_deployment_handle("expert-arithmetic", app_name="multi")
    router = serve.get_deployment_handle("router", app_name="multi")
    single = serve.get_deployment_handle("experts", app_name="single")
    payload = {"kind": "completion", "prompt": PROMPTS["arithmetic"], "max_tokens": args.max_tokens,
               "temperature": 0.0, "top_p": 1.0, "stop": []}
    import urllib.request

    body = json.dumps({"model": "auto", "prompt": PROMPTS["arithmetic"], "max_tokens": args.max_tokens,
                       "temperature": 0}).encode()

    def http(_):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/multi/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["expert"] == "arithmetic"

    names = list(PROMPTS)

    def mixed(i):
        n = names[i % len(names)]
        single.generate.remote({**payload, "expert": n, "prompt": PROMPTS[n]}).result()

    variants = {
        "a_direct_expert": lambda i: expert.generate.remote({**payload, "expert": "arithmetic"}).result(),
        "b_via_router": lambda i: router.route_and_generate.remote({**payload, "expert": "auto"}).result(),
        "c_http_router": http,
    }
    loads = {
        "d_single_one_expert": lambda i: single.generate.remote({**payload, "expert": "arithmetic"}).result(),
        "d_single_mixed": mixed,
    }
    for fn in [*variants.values(), *loads.values()]:  # warm-up (weights cached, code paths hot)
        for i in range(8):
            fn(i)
    lat = {k: [] for k in [*variants, *loads]}
    rps = {k: [] for k in [*variants, *loads]}
    overheads = []
    for r in range(args.rounds):
        p50 = {}
        for name, fn in variants.items():
            xs, wall = timed(fn, args.requests)
            lat[name] += xs
            rps[name].append(args.requests / wall)
            p50[name] = statistics.median(xs)
        overheads.append(p50["b_via_router"] - p50["a_direct_expert"])
        for name, fn in loads.items():
            xs, wall = timed(fn, args.requests, args.concurrency)
            lat[name] += xs
            rps[name].append(args.requests / wall)
        print(f"round {r + 1}: router overhead p50 {overheads[-1] * 1e3:.2f} ms", flush=True)
    info = single.info.remote().result()

    print(f"\n{'variant':24s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s}")
    rows = {}
    for name in lat:
        rows[name] = {"p50_ms": statistics.median(lat[name]) * 1e3, "p99_ms": pct(lat[name], 0.99) * 1e3,
                      "req_s": statistics.median(rps[name])}
        print(f"{name:24s} {rows[name]['p50_ms']:8.2f} {rows[name]['p99_ms']:8.2f} {rows[name]['req_s']:8.1f}")
    switch = info["switch_times"]
    summary = {
        "bench": "serve", "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.node()}",
        "device": "cuda" if torch.cuda.is_available() else "cpu", "max_tokens": args.max_tokens,
        "rounds": args.rounds, "requests": args.requests, "concurrency": args.concurrency,
        "router_overhead_p50_ms_median": statistics.median(overheads) * 1e3,
        "router_overhead_p50_ms_rounds": [round(o * 1e3, 3) for o in overheads],
        "goal_overhead_ms": 2.0, **{k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in rows.items()},
        "mixed_vs_one_expert_req_s_ratio": rows["d_single_mixed"]["req_s"] / rows["d_single_one_expert"]["req_s"],
        "svf_switches": len(switch), "svf_switch_ms_p50": statistics.median(switch) * 1e3 if switch else None,
        "svf_switch_ms_p99": pct(switch, 0.99) * 1e3 if switch else None,
    }
    print(f"\nrouter overhead p50 (median of rounds): {summary['router_overhead_p50_ms_median']:.2f} ms (goal <= 2 ms)")
    print(f"single-device mixed / one-expert req/s: {summary['mixed_vs_one_expert_req_s_ratio']:.2f}; "
          f"SVF switch p50 {summary['svf_switch_ms_p50']} ms over {len(switch)} switches")
    print(json.dumps(summary))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
