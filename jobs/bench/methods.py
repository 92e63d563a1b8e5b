"""Benchmark: every fine-tuning method on the same tiny job.

Each method trains the tiny model for `--steps` steps (batch 4, max_length 256, unpacked so
every method sees the same batches; prompt learning cannot pack) in its own fresh process
(so peak RSS is that method's), interleaved over `--repeats` rounds. `heads` runs on the
synthetic classification rows (the same rows' text, labelled by task), once with cached
backbone features (the fast path) and once with the full forward per step, which gives the
cached-features speed-up. The preference objectives (dpo, simpo, orpo, kto, and a reward model, with LoRA) run on
the synthetic pairs (`raylib synth --pairs`) next to SFT on the same pairs' chosen answers
("sft (pairs)"), which gives DPO's step time over SFT's on the same data. Prints one table,
then one JSON line.

    python jobs/bench/methods.py [--repeats 3] [--steps 20] [--threads 1] [--batch-size 4] [--methods lora,adalora]

Columns: trainable params, median steady step time (ms) and its ratio to lora in the same
round, peak RSS of the process (MiB), eval loss before -> after.
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

HEADS_TASKS = {
    "domain": ["arithmetic", "strings", "comparison"],
    "operation": ["add", "subtract", "larger", "smaller", "reverse", "uppercase"],
}
#: name -> (method options, lr, data: sft | cls | pairs, objective)
VARIANTS: dict[str, tuple[dict, float, str, str]] = {
    "full": ({"name": "full"}, 5e-4, "sft", "sft"),
    "lora": ({"name": "lora", "r": 8}, 3e-3, "sft", "sft"),
    "qlora": ({"name": "qlora", "r": 8}, 3e-3, "sft", "sft"),
    "adalora": ({"name": "adalora", "init_r": 12, "target_r": 4, "tinit": 2, "tfinal": 4}, 1e-2, "sft", "sft"),
    "ia3": ({"name": "ia3"}, 3e-2, "sft", "sft"),
    "prefix": ({"name": "prefix", "num_virtual_tokens": 8}, 1e-2, "sft", "sft"),
    "ptuning": ({"name": "ptuning", "num_virtual_tokens": 8, "encoder_hidden_size": 64}, 1e-2, "sft", "sft"),
    "prompt": ({"name": "prompt", "num_virtual_tokens": 8, "init": "text", "init_text": "Answer the request."}, 3e-2,
               "sft", "sft"),
    "svf": ({"name": "svf", "targets": "mlp"}, 5e-3, "sft", "sft"),
    "heads (cached)": ({"name": "heads", "tasks": HEADS_TASKS, "cache_features": True}, 2e-2, "cls", "classification"),
    "heads (no cache)": ({"name": "heads", "tasks": HEADS_TASKS, "cache_features": False}, 2e-2, "cls",
                         "classification"),
    "heads+lora": ({"name": "heads", "tasks": HEADS_TASKS, "lora": {"r": 4}}, 2e-2, "cls", "classification"),
    "sft (pairs)": ({"name": "lora", "r": 8}, 3e-3, "pairs", "sft"),
    "dpo (pairs)": ({"name": "lora", "r": 8}, 3e-3, "pairs", "dpo"),
    "simpo (pairs)": ({"name": "lora", "r": 8}, 3e-3, "pairs", "simpo"),
    "orpo (pairs)": ({"name": "lora", "r": 8}, 3e-3, "pairs", "orpo"),
    "kto (pairs)": ({"name": "lora", "r": 8}, 3e-3, "pairs", "kto"),
    "reward (pairs)": ({"name": "lora", "r": 8}, 3e-3, "pairs", "reward"),
}


def one(name: str, work: str, steps: int, threads: int, batch_size: int = 4) -> dict:
    """Run one variant in this process; return its figures."""
    import resource

    import torch

    from raylib.config import validate_job
    from raylib.metrics import steady_step_time
    from raylib.tiny_models import build_tiny
    from raylib.synthetic import write_classification_dataset, write_dataset
    from raylib.train_loop import PlainSession, run

    torch.set_num_threads(threads)
    model = build_tiny(os.path.join(os.path.expanduser("~/.cache/raylib-tests"), "tiny-llama"))
    method, lr, kind, objective = VARIANTS[name]
    if kind == "cls":
        data = write_classification_dataset(os.path.join(work, "cls"), 600, 60)
    else:
        data = write_dataset(os.path.join(work, kind), 600, 30, pairs=kind == "pairs")
    job = {
        "model": {"path": model},
        "data": {"train": data["train"], "eval": data["eval"], "max_length": 64 if kind == "cls" else 256,
                 "packing": False},
        "method": method,
        "objective": {"name": objective},
        "train": {"lr": lr, "max_steps": steps, "batch_size": batch_size, "checkpoint_every": 0},
        "output": {"dir": os.path.join(work, "out")},
    }
    session = PlainSession(os.path.join(work, "ckpt"))
    out = run(validate_job(job), session)
    final = session.reports[-1]
    return {
        "method": name,
        "trainable": final["trainable_params"],
        "total": final["total_params"],
        "step_ms": 1000 * steady_step_time(out["step_times"]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "eval_before": final["eval_loss_before"],
        "eval_after": final["eval_loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--methods", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="raylib-bench-methods-")
    if args.one:
        print("RESULT " + json.dumps(one(args.one, work, args.steps, args.threads, args.batch_size)), flush=True)
        return

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if "lora" not in names:
        names.insert(0, "lora")  # the baseline of the ratios
    results: dict[str, list[dict]] = {n: [] for n in names}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    for r in range(args.repeats):
        for n in names:  # interleaved: every round runs every method once
            proc = subprocess.run(
                [sys.executable, __file__, "--one", n, "--steps", str(args.steps), "--threads", str(args.threads),
                 "--batch-size", str(args.batch_size),
                 "--work-dir", os.path.join(work, f"{r}-{n.replace(' ', '_')}")],
                capture_output=True, text=True, env=env,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{n}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                continue
            res = json.loads(line[len("RESULT "):])
            res["round"] = r
            results[n].append(res)
            print(f"round {r} {n:>16}: {res['trainable']:,} trainable, {res['step_ms']:.1f} ms/step, "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB, eval {res['eval_before']:.3f} -> {res['eval_after']:.3f}",
                  flush=True)

    base = {x["round"]: x["step_ms"] for x in results.get("lora", [])}
    rows = []
    for n in names:
        rs = results[n]
        if not rs:
            rows.append({"method": n, "failed": True})
            continue
        ratios = [x["step_ms"] / base[x["round"]] for x in rs if x["round"] in base]
        rows.append({
            "method": n,
            "trainable": rs[0]["trainable"],
            "total": rs[0]["total"],
            "step_ms": statistics.median(x["step_ms"] for x in rs),
            "vs_lora": statistics.median(ratios) if ratios else None,
            "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in rs),
            "eval_before": rs[0]["eval_before"],
            "eval_after": statistics.median(x["eval_after"] for x in rs),
        })
    print()
    print(f"{'method':<17} {'trainable':>10} {'% of total':>10} {'ms/step':>8} {'vs lora':>8} {'peak RSS MiB':>12} "
          f"{'eval loss before -> after':>26}")
    for x in rows:
        if x.get("failed"):
            print(f"{x['method']:<17} FAILED")
            continue
        ratio = f"{x['vs_lora']:.2f}" if x["vs_lora"] else "-"
        print(f"{x['method']:<17} {x['trainable']:>10,} {100 * x['trainable'] / x['total']:>9.2f}% {x['step_ms']:>8.1f} "
              f"{ratio:>8} {x['peak_rss_mib']:>12.0f} {x['eval_before']:>12.3f} -> {x['eval_after']:.3f}")
    by = {x["method"]: x for x in rows if not x.get("failed")}
    speedup = None
    if "heads (cached)" in by and "heads (no cache)" in by:
        pairs = {x["round"]: x["step_ms"] for x in results["heads (no cache)"]}
        per_round = [pairs[x["round"]] / x["step_ms"] for x in results["heads (cached)"] if x["round"] in pairs]
        speedup = round(statistics.median(per_round), 2) if per_round else None
        print(f"\nheads: cached features are {speedup}x faster per step than the full forward (median over rounds)")
    dpo_vs_sft = None
    if "dpo (pairs)" in by and "sft (pairs)" in by:
        sft = {x["round"]: x["step_ms"] for x in results["sft (pairs)"]}
        per_round = [x["step_ms"] / sft[x["round"]] for x in results["dpo (pairs)"] if x["round"] in sft]
        dpo_vs_sft = round(statistics.median(per_round), 2) if per_round else None
        print(f"dpo: a step over the same pairs takes {dpo_vs_sft}x an SFT step on their chosen answers (median over "
              "rounds; chosen + rejected forwards and the reference forward, against one forward)")
    import torch

    print(json.dumps({
        "benchmark": "methods",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, CPU only",
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads, "batch_size": args.batch_size,
        "heads_cache_speedup": speedup, "dpo_vs_sft_step": dpo_vs_sft,
        "rows": rows,
    }, default=lambda v: round(v, 4) if isinstance(v, float) else v))


if __name__ == "__main__":
    main()
