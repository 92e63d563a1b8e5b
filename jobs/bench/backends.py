"""Benchmark: Accelerate (DDP) vs DeepSpeed ZeRO-2 vs ZeRO-3 vs FSDP2 on the same tiny LoRA job.

Every configuration runs the raylib worker loop (`raylib.train_loop.run`) in `--workers`
processes started by torchrun (a fresh process group per run, no Ray: this measures the
backend, not Ray), interleaved, `--repeats` times each. Per run: median steady step time
(rank 0) and peak RSS (max over ranks, from getrusage). Prints a table, then one JSON line
with medians and ratios vs Accelerate.

    python jobs/bench/backends.py [--repeats 5] [--steps 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

BACKENDS = {
    "accelerate": {"name": "accelerate"},
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    "zero3": {"name": "deepspeed", "zero_stage": 3},
    "fsdp2": {"name": "fsdp"},
}


def worker(args) -> None:
    """One rank of one run (started by torchrun)."""
    import resource

    import torch

    from raylib.config import validate_job
    from raylib.metrics import steady_step_time
    from raylib.train_loop import PlainSession, run

    torch.set_num_threads(args.threads)
    out = os.path.join(args.work_dir, "runs", f"{args.backend}-{args.tag}")
    job = validate_job({
        "model": {"path": args.model},
        "data": {"train": args.train, "eval": args.eval, "max_length": 256, "max_rows": 400},
        "method": {"name": "lora", "r": 16},
        "backend": BACKENDS[args.backend],
        "scaling": {"num_workers": args.workers, "use_gpu": False},
        "train": {"lr": 2e-3, "max_steps": args.steps, "batch_size": 4, "checkpoint_every": 0},
        "output": {"dir": out},
    })
    result = run(job, PlainSession(os.path.join(out, "ckpt")))
    rank = int(os.environ.get("RANK", 0))
    row = {"rank": rank, "step_ms": 1000 * steady_step_time(result["step_times"]),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(os.path.join(args.work_dir, f"{args.backend}-{args.tag}-rank{rank}.json"), "w") as f:
        json.dump(row, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--train", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--eval", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from raylib.tiny_models import build_tiny
    from raylib.synthetic import write_dataset

    work = args.work_dir or tempfile.mkdtemp(prefix="raylib-bench-backends-")
    model = build_tiny(os.path.join(os.path.expanduser("~/.cache/raylib-tests"), "tiny-llama"))
    data = write_dataset(os.path.join(work, "data"), n_train=400, n_eval=40)
    rows = []
    for i in range(args.repeats):
        for name in BACKENDS:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.workers}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", os.path.abspath(__file__),
                   "--worker", "--backend", name, "--tag", str(i), "--work-dir", work, "--model", model,
                   "--train", data["train"], "--eval", data["eval"], "--steps", str(args.steps),
                   "--workers", str(args.workers), "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": os.getcwd()}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{name} run {i} failed:\n{proc.stderr[-3000:]}")
            ranks = [json.load(open(os.path.join(work, f"{name}-{i}-rank{r}.json"))) for r in range(args.workers)]
            rows.append({"repeat": i, "backend": name, "step_ms": ranks[0]["step_ms"],
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks)})
            print(f"repeat {i} {name:10s} {rows[-1]['step_ms']:8.1f} ms/step  peak RSS {rows[-1]['peak_rss_mb']:7.0f} MiB",
                  flush=True)

    def med(name, key):
        return statistics.median(r[key] for r in rows if r["backend"] == name)

    print(f"\n{'backend':12s} {'step ms':>9s} {'vs accel':>9s} {'peak RSS MiB':>13s} {'vs accel':>9s}")
    summary = {"benchmark": "backends", "machine": f"{platform.machine()} {os.cpu_count()} cpus, CPU only",
               "workers": args.workers, "threads_per_worker": args.threads, "steps": args.steps,
               "repeats": args.repeats}
    base_t, base_m = med("accelerate", "step_ms"), med("accelerate", "peak_rss_mb")
    for name in BACKENDS:
        t, m = med(name, "step_ms"), med(name, "peak_rss_mb")
        print(f"{name:12s} {t:9.1f} {t / base_t:9.2f} {m:13.0f} {m / base_m:9.2f}")
        summary[f"{name}_step_ms_median"] = round(t, 2)
        summary[f"{name}_peak_rss_mb_median"] = round(m, 1)
        summary[f"{name}_step_ratio"] = round(t / base_t, 3)
        summary[f"{name}_rss_ratio"] = round(m / base_m, 3)
    print(json.dumps(summary))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
