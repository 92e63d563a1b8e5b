"""Benchmark: what does running the training loop inside Ray Train cost per step?

The same LoRA job runs plain (the worker loop in this process, no Ray) and inside Ray Train
with one worker, interleaved, `--repeats` times each. Both get the same CPU threads. Prints
a table, then one JSON line: the per-step time ratio (Ray / plain; goal <= 1.05) and the
packing efficiency (share of non-padding tokens in the batches; goal >= 0.95 on demo data).

    python jobs/bench/train_overhead.py [--repeats 5] [--steps 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both (CPU resources of the worker)")
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()

    import ray
    import torch

    from raylib import launch
    from raylib.config import validate_job
    from raylib.metrics import steady_step_time
    from raylib.tiny_models import build_tiny
    from raylib.synthetic import write_dataset
    from raylib.train_loop import PlainSession, run

    work = args.work_dir or tempfile.mkdtemp(prefix="raylib-bench-")
    model = build_tiny(os.path.join(os.path.expanduser("~/.cache/raylib-tests"), "tiny-llama"))
    data = write_dataset(os.path.join(work, "data"))  # the demo data set

    def job(out: str):
        return validate_job({
            "model": {"path": model},
            "data": {"train": data["train"], "eval": data["eval"], "max_length": 512},
            "method": {"name": "lora", "r": 16},
            "scaling": {"num_workers": 1, "use_gpu": False, "resources_per_worker": {"CPU": args.threads}},
            "train": {"lr": 2e-3, "max_steps": args.steps, "batch_size": 4, "checkpoint_every": 0},
            "output": {"dir": out},
        })

    torch.set_num_threads(args.threads)
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    rows = []
    for i in range(args.repeats):
        plain = run(job(os.path.join(work, f"plain{i}")), PlainSession(os.path.join(work, f"plain{i}", "ckpt")))
        result = launch.train(job(os.path.join(work, f"ray{i}")), show_progress=False)
        rows.append({
            "repeat": i,
            "plain_step_ms": 1000 * steady_step_time(plain["step_times"]),
            "ray_step_ms": 1000 * result.metrics["step_time_p50"],
            "packing_efficiency": result.metrics["packing_efficiency"],
        })
        r = rows[-1]
        print(f"repeat {i}: plain {r['plain_step_ms']:.1f} ms/step, ray {r['ray_step_ms']:.1f} ms/step", flush=True)
    ray.shutdown()

    ratios = [r["ray_step_ms"] / r["plain_step_ms"] for r in rows]
    summary = {
        "benchmark": "train_overhead",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {torch.__version__}, CPU only",
        "threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "plain_step_ms_median": round(statistics.median(r["plain_step_ms"] for r in rows), 2),
        "ray_step_ms_median": round(statistics.median(r["ray_step_ms"] for r in rows), 2),
        "step_time_ratio_median": round(statistics.median(ratios), 4),
        "packing_efficiency": round(statistics.median(r["packing_efficiency"] for r in rows), 4),
        "goals": {"step_time_ratio": "<= 1.05", "packing_efficiency": ">= 0.95"},
    }
    print()
    print(f"{'repeat':>6} {'plain ms/step':>14} {'ray ms/step':>12} {'ratio':>7}")
    for r, ratio in zip(rows, ratios):
        print(f"{r['repeat']:>6} {r['plain_step_ms']:>14.1f} {r['ray_step_ms']:>12.1f} {ratio:>7.3f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
