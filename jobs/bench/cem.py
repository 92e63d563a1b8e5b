"""CEM scaling: the same `raylib cem` search on 1 scoring actor vs 2, interleaved.

Builds (or reuses) the tiny model, trains two small SVF experts (arithmetic, comparison)
with the plain loop, and a few-shot set mixing both domains; then runs the identical CEM
search (same seed) with `--actors 1` and `--actors 2`, `--repeats` times each, alternating.
Prints per-run search wall time (model loading excluded; it is the same per actor), the
median speed-up, and whether every run found the same alphas. Goal: speed-up >= 1.6 on
2 cores, identical results.

    python jobs/bench/cem.py [--repeats 5] [--population 8] [--iterations 3] [--rows 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics



def train_experts(model: str, work: str) -> list[str]:
    from raylib.config import validate_job
    from raylib.synthetic import write_dataset
    from raylib.train_loop import PlainSession, run

    experts = []
    for domain in ("arithmetic", "comparison"):
        done = os.path.join(work, f"expert-{domain}")
        if not os.path.isfile(os.path.join(done, "expert.json")):
            data = write_dataset(os.path.join(work, f"data-{domain}"), n_train=400, n_eval=20, domains=[domain])
            job = validate_job({
                "model": {"path": model}, "data": {**data, "max_length": 256},
                "method": {"name": "svf", "targets": "all-linear"},
                "train": {"max_steps": 60, "checkpoint_every": 0, "eval_every": 0, "lr": 0.2, "batch_size": 8,
                          "lr_scheduler": "constant"},
                "output": {"dir": done, "domain": domain},
            })
            session = PlainSession(os.path.join(work, f"ckpt-{domain}"))
            run(job, session)
            from raylib.launch import publish_expert

            publish_expert(os.path.join(session.reports[-1]["checkpoint"], "expert"), done)
        experts.append(done)
    return experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/raylib-bench/cem"))
    args = ap.parse_args()

    import ray
    import torch

    from raylib.tiny_models import build_tiny
    from raylib.search.cem import CEMOptions, run_cem
    from raylib.synthetic import make_rows, write_jsonl

    os.makedirs(args.work, exist_ok=True)
    model = build_tiny(os.path.join(args.work, "tiny-llama"))
    experts = train_experts(model, args.work)
    fewshot = write_jsonl(make_rows(args.rows, domains=["arithmetic", "comparison"], seed=777),
                          os.path.join(args.work, "fewshot.jsonl"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    times: dict[int, list[float]] = {1: [], 2: []}
    results = set()
    for rep in range(args.repeats):
        for actors in (1, 2):
            opts = CEMOptions(population=args.population, iterations=args.iterations, seed=0, actors=actors,
                              loglik_weight=1.0)
            res = run_cem(experts, fewshot, os.path.join(args.work, f"out-{actors}"), opts)
            times[actors].append(res.wall_time_s)
            results.add(json.dumps([res.alphas, res.score]))
            print(f"repeat {rep}: {actors} actor(s) {res.wall_time_s:.2f} s, score {res.score:.4f}", flush=True)

    ratios = [a / b for a, b in zip(times[1], times[2])]
    print(f"\n{'repeat':>6} {'1 actor s':>10} {'2 actors s':>11} {'speed-up':>9}")
    for i, (a, b, r) in enumerate(zip(times[1], times[2], ratios)):
        print(f"{i:>6} {a:>10.2f} {b:>11.2f} {r:>9.3f}")
    summary = {
        "benchmark": "cem_actors",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, CPU only",
        "population": args.population, "iterations": args.iterations, "rows": args.rows, "repeats": args.repeats,
        "one_actor_s_median": round(statistics.median(times[1]), 3),
        "two_actors_s_median": round(statistics.median(times[2]), 3),
        "speedup_median": round(statistics.median(ratios), 3),
        "identical_results": len(results) == 1,
        "goals": {"speedup": ">= 1.6", "identical_results": True},
    }
    print(json.dumps(summary))
    ray.shutdown()


if __name__ == "__main__":
    main()
