"""SVF benchmarks: forward strategies per shape, and SVF vs LoRA on the same job.

    python jobs/bench/svf.py [--repeats 5] [--steps 12] [--quick]

Part 1, per Linear shape (out, in) and tokens per call T: median time of forward+backward
(training path) of (a) "rebuild" (form U·diag(σ⊙z)·Vᵀ, one dense matmul) and (b) "factored"
(U·((σ⊙z)⊙(Vᵀx))), interleaved; plus what `forward: auto` picks (the FLOP cost model in
raylib.methods.svf_layers.choose_mode) and whether that matches the faster measured one.

Part 2, the same SFT job (a small random Llama built here, synthetic data) with
`method: svf` (all-linear) and `method: lora` (r=16, all-linear): median steady step time
(raylib's own loop, PlainSession) and peak RSS of the process, each run in a fresh
subprocess, the two methods interleaved. Prints tables and a final one-line JSON.
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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_forward(shapes, token_counts, repeats: int) -> list[dict]:
    import torch

    from raylib.methods.svf_layers import SVFLinear, choose_mode, flops

    torch.manual_seed(0)
    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f) / in_f**0.5
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        layers = {m: SVFLinear(U, S, Vh, None, mode=m) for m in ("rebuild", "factored")}
        for T in token_counts:
            x = torch.randn(T, in_f)
            times = {m: [] for m in layers}
            for _ in range(repeats + 1):  # first round is warm-up
                for mode, layer in layers.items():
                    layer.z.grad = None
                    t = time.perf_counter()
                    layer(x).sum().backward()
                    times[mode].append(time.perf_counter() - t)
            med = {m: statistics.median(v[1:]) for m, v in times.items()}
            faster = min(med, key=med.get)
            auto = choose_mode(out_f, in_f, T)
            f = flops(out_f, in_f, T)
            rows.append({"shape": f"{out_f}x{in_f}", "tokens": T, "rebuild_ms": med["rebuild"] * 1e3,
                         "factored_ms": med["factored"] * 1e3, "ratio_f_over_r": med["factored"] / med["rebuild"],
                         "faster": faster, "auto": auto, "auto_ok": auto == faster,
                         "flops_ratio": f["factored"] / f["rebuild"]})
    return rows


_RUN = r"""
import json, resource, sys
from raylib.config import validate_job
from raylib.metrics import steady_step_time
from raylib.train_loop import PlainSession, run
job = validate_job(json.loads({job!r}))
out = run(job, PlainSession({ckpt!r}))
print(json.dumps({{"step_time": steady_step_time(out["step_times"]),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "trainable": None}}))
"""


def bench_methods(workdir: str, repeats: int, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylib.models import load_tokenizer
    from raylib.tiny_models import build_tiny
    from raylib.synthetic import write_dataset

    tiny = build_tiny(os.path.join(os.path.expanduser("~/.cache/raylib-tests"), "tiny-llama"))
    model_dir = os.path.join(workdir, "bench-llama")
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok = load_tokenizer(type("M", (), {"tokenizer": tiny, "path": tiny, "revision": None, "trust_remote_code": False})())
    tok.save_pretrained(model_dir)
    data = write_dataset(os.path.join(workdir, "data"), 400, 20)
    jobs = {
        "svf": {"name": "svf", "targets": "all-linear", "cache_dir": os.path.join(workdir, "svf-cache")},
        "lora": {"name": "lora", "r": 16, "target_modules": "all-linear", "dropout": 0.0},
    }
    results = {k: [] for k in jobs}
    for rep in range(repeats):
        for name, method in jobs.items():
            job = {"model": {"path": model_dir}, "data": {"train": data["train"], "eval": data["eval"], "max_length": 256},
                   "method": method, "train": {"lr": 1e-3, "max_steps": steps, "batch_size": 8, "checkpoint_every": 0,
                                               "eval_every": 0}, "output": {"dir": os.path.join(workdir, "o")}}
            code = _RUN.format(repo=REPO, job=json.dumps(job), ckpt=os.path.join(workdir, f"ck-{name}-{rep}"))
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    from raylib.config import validate_job
    from raylib.methods import get_method
    from raylib.models import count_parameters, load_model

    summary = {}
    for name, method in jobs.items():
        job = validate_job({"model": {"path": model_dir}, "data": {"train": "x"}, "method": method, "output": {"dir": "o"}})
        trainable, _ = count_parameters(get_method(name).apply(load_model(job.model), job))
        summary[name] = {"step_time_ms": statistics.median(r["step_time"] for r in results[name]) * 1e3,
                         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results[name]),
                         "trainable_params": trainable}
    summary["ratio_step_time_svf_over_lora"] = summary["svf"]["step_time_ms"] / summary["lora"]["step_time_ms"]
    summary["ratio_peak_rss_svf_over_lora"] = summary["svf"]["peak_rss_mb"] / summary["lora"]["peak_rss_mb"]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="fewer shapes, skip nothing")
    args = ap.parse_args()
    import torch

    shapes = [(64, 64), (176, 64), (256, 256), (688, 256), (1024, 1024)] if not args.quick else [(64, 64), (256, 256)]
    tokens = [1, 16, 128, 2048]
    fwd = bench_forward(shapes, tokens, args.repeats)
    print(f"# forward+backward per call, median of {args.repeats} (CPU, {torch.get_num_threads()} threads)")
    print(f"{'shape':>10} {'T':>5} {'rebuild ms':>11} {'factored ms':>12} {'f/r':>6} {'faster':>9} {'auto':>9} ok")
    for r in fwd:
        print(f"{r['shape']:>10} {r['tokens']:>5} {r['rebuild_ms']:>11.3f} {r['factored_ms']:>12.3f} "
              f"{r['ratio_f_over_r']:>6.2f} {r['faster']:>9} {r['auto']:>9} {'y' if r['auto_ok'] else 'n'}")
    with tempfile.TemporaryDirectory(prefix="raylib-bench-svf-") as work:
        methods = bench_methods(work, args.repeats, args.steps)
    print(f"\n# same SFT job (4-layer 256-wide random Llama, batch 8, {args.steps} steps), median of {args.repeats}")
    print(f"{'method':>6} {'trainable':>10} {'step ms':>9} {'peak RSS MB':>12}")
    for name in ("svf", "lora"):
        m = methods[name]
        print(f"{name:>6} {m['trainable_params']:>10,} {m['step_time_ms']:>9.1f} {m['peak_rss_mb']:>12.0f}")
    print(f"svf/lora step time {methods['ratio_step_time_svf_over_lora']:.2f}x, peak RSS {methods['ratio_peak_rss_svf_over_lora']:.2f}x")
    print(json.dumps({"bench": "svf", "forward": fwd, "methods": methods,
                      "auto_agrees": sum(r["auto_ok"] for r in fwd) / len(fwd)}))


if __name__ == "__main__":
    main()
