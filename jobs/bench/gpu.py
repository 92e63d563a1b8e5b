"""GPU check and benchmark: the paths a CPU box cannot run, on one CUDA GPU.

Part 1, paths (each a real Ray Train run with `use_gpu`, one worker on the GPU; without Ray
installed, the same worker loop in this process): LoRA with bf16 autocast, QLoRA (bitsandbytes
NF4 base + paged 8-bit AdamW), DeepSpeed ZeRO-2 and ZeRO-3 over NCCL (LoRA, full, AdaLoRA,
heads, QLoRA on ZeRO-2). Each must learn (eval loss drops), and its published expert,
reloaded here on the GPU by the method's own loader (plain PEFT for the adapters; QLoRA
over a freshly 4-bit-quantized base), must score the eval loss the run ended with.

Part 2, benchmark (a ~140M-parameter Llama-style model built here with random weights, one
fresh process per variant, same data and batches): median steady step time, its ratio to
LoRA on Accelerate, and the peak GPU memory allocated, for methods and backends.

    python jobs/bench/gpu.py [--out DIR] [--parts paths,bench] [--steps 30] [--tiny DIR] [--smoke]

`--smoke` runs both parts small, on the CPU when there is no GPU (to test this script).
Every finished case is appended to DIR/gpu_results.jsonl at once, so a cut-off run keeps
what it measured. Prints a table per part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HEADS_TASKS = {
    "domain": ["arithmetic", "strings", "comparison"],
    "operation": ["add", "subtract", "larger", "smaller", "reverse", "uppercase"],
}
DS2 = {"name": "deepspeed", "zero_stage": 2}
DS3 = {"name": "deepspeed", "zero_stage": 3}
LORA = {"name": "lora", "r": 8, "dropout": 0.0}
ADALORA = {"name": "adalora", "init_r": 8, "target_r": 2, "tinit": 2, "tfinal": 3}

#: name -> (method, backend, lr, classification?)
PATHS: dict[str, tuple[dict, dict, float, bool]] = {
    "lora bf16 / accelerate": (LORA, {"name": "accelerate"}, 3e-3, False),
    "qlora nf4 + paged adamw 8bit": ({"name": "qlora", "r": 8, "dropout": 0.0}, {"name": "accelerate"}, 3e-3, False),
    "lora / zero2": (LORA, DS2, 3e-3, False),
    "lora / zero3": (LORA, DS3, 3e-3, False),
    "full / zero3": ({"name": "full"}, DS3, 5e-4, False),
    "adalora / zero2": (ADALORA, DS2, 1e-2, False),
    "heads / zero3": ({"name": "heads", "tasks": HEADS_TASKS}, DS3, 5e-2, True),
    "qlora / zero2": ({"name": "qlora", "r": 8, "dropout": 0.0}, DS2, 3e-3, False),
}

#: name -> (method, backend, lr)
BENCH: dict[str, tuple[dict, dict, float]] = {
    "lora": (LORA, {"name": "accelerate"}, 1e-4),
    "qlora": ({"name": "qlora", "r": 8, "dropout": 0.0}, {"name": "accelerate"}, 1e-4),
    "full": ({"name": "full"}, {"name": "accelerate"}, 1e-5),
    "lora / zero2": (LORA, DS2, 1e-4),
    "lora / zero3": (LORA, DS3, 1e-4),
    "full / zero2": ({"name": "full"}, DS2, 1e-5),
    "full / zero3": ({"name": "full"}, DS3, 1e-5),
    "full / zero3 + optimizer offload": ({"name": "full"}, {**DS3, "offload_optimizer": True}, 1e-5),
    "adalora": ({"name": "adalora", "init_r": 8, "target_r": 2, "tinit": 5, "tfinal": 5}, {"name": "accelerate"}, 1e-4),
    "svf": ({"name": "svf", "targets": "mlp"}, {"name": "accelerate"}, 1e-4),
}

BENCH_MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=8)


def _record(out_dir: str, row: dict) -> None:
    with open(os.path.join(out_dir, "gpu_results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def _data(work: str, classification: bool, n_train: int = 600, n_eval: int = 60) -> dict:
    from raylib.synthetic import write_classification_dataset, write_dataset

    if classification:
        return write_classification_dataset(os.path.join(work, "cls"), n_train=400, n_eval=90)
    return write_dataset(os.path.join(work, "sft"), n_train=n_train, n_eval=n_eval)


def _job(model: str, data: dict, out: str, method: dict, backend: dict, lr: float, steps: int, classification: bool,
         use_gpu: bool, batch_size: int = 8, max_length: int = 256) -> dict:
    job = {
        "model": {"path": model},
        "data": {"train": data["train"], "eval": data["eval"], "max_length": max_length},
        "method": dict(method),
        "backend": dict(backend),
        "train": {"lr": lr, "max_steps": steps, "batch_size": batch_size, "checkpoint_every": 0},
        "scaling": {"num_workers": 1, "use_gpu": use_gpu},
        "output": {"dir": out},
    }
    if classification:
        job["objective"] = {"name": "classification"}
        job["data"]["max_length"] = 64
    return job


def _rescore(job, expert_dir: str, device: str) -> tuple[float, dict]:
    """The published expert's eval loss, loaded here by its method's loader on `device`."""
    import torch

    from raylib import models
    from raylib.methods import get_method
    from raylib.objectives import loop_objective

    objective = loop_objective(job)
    tok = models.load_tokenizer(job.model)
    base = models.load_model(job.model, device)
    model = get_method(job.method.name).load(base, expert_dir)
    model = model.to(device) if job.model.quantization is None else model
    model.eval()
    facts = {"param_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}),
             "linear4bit_layers": sum(type(m).__name__ == "Linear4bit" for m in model.modules())}
    prepared = objective.prepare(job, tok, model, device)
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = objective.evaluate(model, prepared.eval, objective.collator(job, tok), job.train.batch_size, 0, 1,
                                  device, lambda t: t)["eval_loss"]
    return loss, facts


def paths(args, work: str, use_gpu: bool, device: str) -> list[dict]:
    from raylib import launch
    from raylib.config import validate_job
    from raylib.tiny_models import build_tiny

    # the tiny model pretrained briefly; --tiny reuses a copy built elsewhere (saves GPU-machine time)
    model = build_tiny(args.tiny or os.path.join(work, "tiny-llama"))
    rows = []
    try:
        import ray

        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        have_ray = True
    except ImportError:
        have_ray = False
    for name, (method, backend, lr, classification) in PATHS.items():
        if args.only and name not in args.only:
            continue
        out = os.path.join(work, "paths", name.replace(" ", "_").replace("/", "-"))
        raw = _job(model, _data(work, classification), out, method, backend, lr, args.path_steps, classification,
                   use_gpu, batch_size=4)
        row: dict = {"part": "paths", "case": name, "ray_train": have_ray}
        t0 = time.perf_counter()
        try:
            job = validate_job(raw)
            if have_ray:
                result = launch.train(job, show_progress=False)
                metrics, expert = result.metrics, result.expert_dir
            else:
                from raylib.train_loop import PlainSession, run

                session = PlainSession(out + "-ckpt")
                run(job, session, use_gpu=use_gpu)
                metrics = session.reports[-1]
                expert = os.path.join(metrics["checkpoint"], "expert")
            again, facts = _rescore(job, expert, device)
            row.update({
                "ok": metrics["eval_loss"] < metrics["eval_loss_before"]
                and abs(again - metrics["eval_loss"]) < 2e-2,
                "eval_before": metrics["eval_loss_before"], "eval_after": metrics["eval_loss"], "rescored": again,
                "device": metrics.get("device"), "mixed_precision": metrics.get("mixed_precision"),
                "optimizer": job.train.optimizer, "step_ms": 1000 * metrics.get("step_time_p50", 0.0),
                "peak_gpu_mem_mb": metrics.get("peak_gpu_mem_mb"), **facts,
            })
        except Exception as exc:  # reported per case: one broken path must not hide the others
            row.update({"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:800]}"})
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        _record(args.out, row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| path | ok | eval before -> after | rescored | precision | optimizer | 4-bit layers | ms/step | peak GPU MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | FAILED: {r['error'][:200]} |")
            continue
        mem = f"{r['peak_gpu_mem_mb']:.0f}" if r.get("peak_gpu_mem_mb") else "-"
        print(f"| {r['case']} | {r['ok']} | {r['eval_before']:.3f} -> {r['eval_after']:.3f} | {r['rescored']:.3f} | "
              f"{r['mixed_precision']} | {r['optimizer']} | {r['linear4bit_layers']} | {r['step_ms']:.1f} | {mem} |")
    return rows


def bench_one(name: str, work: str, steps: int, use_gpu: bool, smoke: bool) -> dict:
    """One benchmark variant in this (fresh) process, without Ray: the worker loop alone."""
    from raylib.config import validate_job
    from raylib.metrics import steady_step_time
    from raylib.tiny_models import build_tiny
    from raylib.train_loop import PlainSession, run

    size = {} if smoke else BENCH_MODEL
    model = build_tiny(os.path.join(os.path.dirname(work), "bench-model"), pretrain_steps=0, **size)
    method, backend, lr = BENCH[name]
    raw = _job(model, _data(os.path.dirname(work), False, 2000, 40), os.path.join(work, "out"), method, backend, lr,
               steps, False, use_gpu, batch_size=8 if not smoke else 2, max_length=1024 if not smoke else 128)
    raw["train"]["max_grad_norm"] = 1.0
    session = PlainSession(os.path.join(work, "ckpt"))
    out = run(validate_job(raw), session, use_gpu=use_gpu)
    final = session.reports[-1]
    return {"variant": name, "trainable": final["trainable_params"], "total": final["total_params"],
            "step_ms": 1000 * steady_step_time(out["step_times"]), "peak_gpu_mem_mb": final.get("peak_gpu_mem_mb"),
            "eval_before": final["eval_loss_before"], "eval_after": final["eval_loss"],
            "packing_efficiency": final.get("packing_efficiency")}


def bench(args, work: str, use_gpu: bool) -> list[dict]:
    names = [n for n in BENCH if not args.only or n in args.only]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names:  # interleaved rounds: each ratio compares runs of the same round
            cmd = [sys.executable, __file__, "--bench-one", n, "--steps", str(args.steps), "--work-dir",
                   os.path.join(work, "bench", f"{r}-{n.replace(' ', '_').replace('/', '-')}")]
            if args.smoke:
                cmd.append("--smoke")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                row = {"part": "bench", "variant": n, "round": r, "error": proc.stderr[-1500:]}
                print(f"{n}: FAILED\n{proc.stderr[-1500:]}", flush=True)
            else:
                row = {"part": "bench", "round": r, **json.loads(line[len("RESULT "):])}
                results[n].append(row)
                print(json.dumps(row), flush=True)
            _record(args.out, row)
    base = {x["round"]: x["step_ms"] for x in results.get("lora", [])}
    print("\n| variant | trainable | ms/step (median) | × lora | peak GPU MiB | eval before -> after |")
    print("|---|---|---|---|---|---|")
    rows = []
    for n in names:
        rs = results[n]
        if not rs:
            print(f"| {n} | FAILED |")
            continue
        ratios = [x["step_ms"] / base[x["round"]] for x in rs if x["round"] in base]
        ms = statistics.median(x["step_ms"] for x in rs)
        mem = rs[-1]["peak_gpu_mem_mb"]
        row = {"variant": n, "ms": ms, "ratio": statistics.median(ratios) if ratios else None, **rs[-1]}
        rows.append(row)
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        print(f"| {n} | {rs[-1]['trainable']:,} | {ms:.1f} | {ratio} | "
              f"{(f'{mem:.0f}' if mem else '-')} | {rs[-1]['eval_before']:.3f} -> {rs[-1]['eval_after']:.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="where gpu_results.jsonl is appended")
    ap.add_argument("--parts", default="paths,bench")
    ap.add_argument("--only", default="", help="comma-separated case/variant names (default: all)")
    ap.add_argument("--steps", type=int, default=30, help="benchmark steps per variant")
    ap.add_argument("--path-steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="small sizes; runs on the CPU when there is no GPU")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--tiny", default=None, help="a tiny model directory built by raylib (reused when its recipe matches)")
    ap.add_argument("--bench-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]

    import torch

    use_gpu = torch.cuda.is_available()
    if not use_gpu and not args.smoke:
        sys.exit("no CUDA GPU here (use --smoke to exercise this script on the CPU)")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    work = args.work_dir or tempfile.mkdtemp(prefix="raylib-bench-gpu-")
    if args.bench_one:
        print("RESULT " + json.dumps(bench_one(args.bench_one, work, args.steps, use_gpu, args.smoke)), flush=True)
        return
    os.makedirs(args.out, exist_ok=True)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if use_gpu else "cpu"}
    for mod in ("transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "ray"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - a report line, not a failure
            env[mod] = f"missing ({type(exc).__name__})"
    print(json.dumps(env), flush=True)
    _record(args.out, {"part": "env", **env})
    parts = args.parts.split(",")
    if "paths" in parts:
        paths(args, work, use_gpu, "cuda" if use_gpu else "cpu")
    if "bench" in parts:
        bench(args, work, use_gpu)


if __name__ == "__main__":
    main()
