"""Benchmark: `raylib train --local` against a plain HF Trainer + PEFT script, same job, same CPUs.

The job: LoRA SFT of the tiny model on the demo data, alpaca template, r 16 / alpha 32 /
dropout 0.05 on all linear layers, batch 8, max_length 256, `--steps` steps, lr 2e-4 cosine,
fp32, no packing on either side (the HF script pads each batch to its longest row, as
raylib does unpacked), no eval. Four variants, each in its own fresh process, interleaved
over `--repeats` rounds (the order rotates every round), all loading one copy of the tiny model
made in the work dir:

- `hf`: what a user writes instead: `AutoModelForCausalLM.from_pretrained`,
  `get_peft_model(LoraConfig(...))`, rows tokenized with raylib's alpaca prompt (labels
  -100 on the prompt), `Trainer(TrainingArguments(use_cpu=True, ...))`; torch's default
  thread count. Step times come from a TrainerCallback, real tokens from the collator.
- `raylib --local`: the CLI (`raylib train job.yaml --local`) with the job's default
  resources, so the one worker gets every CPU (raylib/launch.py give_local_worker_the_machine).
- `raylib --local, CPU 1`: the same with `scaling.resources_per_worker: {CPU: 1}`, the old
  default (one torch thread).
- `hf_1t` (control): the HF script with `OMP_NUM_THREADS=1`, the same threads as `CPU 1`.
  On a machine other processes load, two OpenMP threads that busy-wait at every parallel
  region can lose a scheduler slice per region: measured here, the HF script and raylib's
  own loop run outside Ray at 2 threads went from ~30 ms/step to 0.1-4 s/step depending on
  the moment, and `OMP_WAIT_POLICY=PASSIVE` (`--omp-wait-policy PASSIVE`, set for every
  variant, Ray workers inherit it) brought them back to ~30 ms. The 1-thread control shows
  whether a 2-thread ratio measures the programs or the load.

Per run: the median steady step time (first 3 steps skipped, as raylib.train_loop.
steady_step_time), and the median over steady steps of real tokens / step time, where real
tokens are the non-padding input tokens of the step's batch, counted the same way for all
(raylib: the `tokens_per_s` of its per-step "step" events in metrics.jsonl; its window
excludes the sub-millisecond progress push, its ms/step does not). Ratios are tokens/s over
HF's in the same round, median over rounds. Prints the machine, a table, then one JSON line.

    python jobs/bench/local_vs_hf.py [--repeats 3] [--steps 30] [--variants hf,hf_1t,local,local_1cpu]
                                     [--omp-wait-policy PASSIVE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

BATCH, MAX_LENGTH, LR, R, ALPHA, DROPOUT = 8, 256, 2e-4, 16, 32, 0.05
SKIP = 3  # warm-up steps left out, as raylib.train_loop.steady_step_time does (when > 6 steps)
VARIANTS = ["hf", "hf_1t", "local", "local_1cpu"]
LABELS = {"hf": "HF Trainer + PEFT", "hf_1t": "HF Trainer + PEFT, 1 thr", "local": "raylib --local",
          "local_1cpu": "raylib --local, CPU 1"}


def steady(values: list[float]) -> list[float]:
    return values[SKIP:] if len(values) > 2 * SKIP else values


# --------------------------------------------------------------------------- (a) the HF script


def hf_run(model_path: str, train_file: str, steps: int, out: str) -> dict:
    """A plain HF Trainer + PEFT LoRA SFT run, as a user would write it; returns its timings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    # the alpaca prompt, written out as a user would (checked against raylib's below)
    def prompt(instruction: str, input: str = "") -> str:
        parts = ["Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.",
                 f"### Instruction:\n{instruction}"]
        if input:
            parts.append(f"### Input:\n{input}")
        parts.append("### Output:\n")
        return "\n\n".join(parts)

    from raylib.data import ALPACA  # only to check the copy above

    assert prompt("a", "b") == ALPACA.prompt("a", "b") and prompt("a") == ALPACA.prompt("a")

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with open(train_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]

    def encode(row: dict) -> dict | None:
        p = tok(prompt(row["instruction"], row.get("input") or ""), add_special_tokens=True)["input_ids"]
        r = tok(row["output"] + "\n\n### End", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = p + r
        if len(ids) > MAX_LENGTH:
            return None  # raylib's default too_long: drop
        return {"input_ids": ids, "labels": [-100] * len(p) + r}

    encoded = [e for e in map(encode, rows) if e is not None]
    train = Dataset.from_list(encoded)

    real_tokens: list[int] = []  # per batch, in order: batch i is optimizer step i (no accumulation)

    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        pad = [width - len(b["input_ids"]) for b in batch]
        real_tokens.append(sum(len(b["input_ids"]) for b in batch))
        return {
            "input_ids": torch.tensor([b["input_ids"] + [tok.pad_token_id] * n for b, n in zip(batch, pad)]),
            "labels": torch.tensor([b["labels"] + [-100] * n for b, n in zip(batch, pad)]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * n for b, n in zip(batch, pad)]),
        }

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.begin = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=out, use_cpu=True, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="cosine", logging_steps=10, report_to=[], save_strategy="no", disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[timer])
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    marks = [timer.begin] + timer.ends
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    tokens = real_tokens[: len(step_s)]  # the loader may have collated one batch ahead
    return {
        "step_s": step_s,
        "tokens": tokens,
        "torch_threads": torch.get_num_threads(),
        "optimizer": f"{type(getattr(trainer.optimizer, 'optimizer', trainer.optimizer)).__name__} ({args.optim})",
        "train_s": train_s,
    }


def summarize_hf(res: dict) -> dict:
    per_step = [n / s for n, s in zip(res["tokens"], res["step_s"])]
    return {
        "step_ms": 1000 * statistics.median(steady(res["step_s"])),
        "tokens_per_s": statistics.median(steady(per_step)),
        "tokens_per_step": statistics.mean(res["tokens"]),
        "torch_threads": res["torch_threads"],
        "note": res["optimizer"],
    }


# --------------------------------------------------------------------------- (b), (c) the raylib CLI


def raylib_job(model_path: str, data: dict, steps: int, out: str, one_cpu: bool) -> dict:
    job = {
        "model": {"path": model_path},
        "data": {"train": data["train"], "eval_split": 0, "template": "alpaca", "max_length": MAX_LENGTH,
                 "packing": False},
        "method": {"name": "lora", "r": R, "alpha": ALPHA, "dropout": DROPOUT, "target_modules": "all-linear"},
        "train": {"lr": LR, "max_steps": steps, "batch_size": BATCH, "lr_scheduler": "cosine", "checkpoint_every": 0,
                  "log_every": 1},
        "output": {"dir": out},
    }
    if one_cpu:
        job["scaling"] = {"resources_per_worker": {"CPU": 1}}
    return job


def raylib_cli() -> list[str]:
    exe = shutil.which("raylib", path=os.path.dirname(sys.executable))
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from raylib.cli import main; sys.argv[0] = 'raylib'; main()"]


def summarize_raylib(out: str) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(out, "run.json")) as f:
        metrics = json.load(f)["metrics"]
    start = next(e for e in events if e.get("type") == "start")
    steps = [e for e in events if e.get("type") == "step"]
    per_step = [e["tokens_per_s"] for e in sorted(steps, key=lambda e: e["step"])]
    return {
        "step_ms": 1000 * metrics["step_time_p50"],
        "tokens_per_s": statistics.median(steady(per_step)),
        "tokens_per_step": metrics["tokens_seen"] / max(metrics["step"], 1),
        "torch_threads": start.get("torch_threads"),
        "note": f"packing efficiency {metrics.get('packing_efficiency', 0):.3f}",
    }


# --------------------------------------------------------------------------- driver


def machine() -> dict:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
    except OSError:
        pass
    import peft
    import ray
    import torch
    import transformers

    return {
        "cpu": model,
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags.split(),
        "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "ray": ray.__version__,
    }


def snapshot_tiny(work: str) -> str:
    """The tiny model, copied into the work dir: the shared cache can be rebuilt by other
    checkouts (other settings) while the benchmark runs, and every variant must load the same."""
    from filelock import FileLock

    from raylib.tiny_models import build_tiny

    cache = build_tiny(os.path.join(os.path.expanduser("~/.cache/raylib-tests"), "tiny-llama"))
    copy = os.path.join(work, "tiny-llama")
    if not os.path.isdir(copy):
        with FileLock(os.path.abspath(cache) + ".lock"):  # the lock build_tiny holds while it builds
            shutil.copytree(cache, copy)
    return build_tiny(copy)  # a no-op unless the cache changed between the two calls (then it rebuilds here)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"], default=None,
                    help="set OMP_WAIT_POLICY for every variant (default: unset, what a user gets)")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--hf-one", nargs=3, metavar=("MODEL", "TRAIN", "OUT"), help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.hf_one:  # one HF run; its timings as JSON in OUT
        model_path, train_file, out_file = args.hf_one
        res = hf_run(model_path, train_file, args.steps, os.path.dirname(out_file))
        with open(out_file, "w") as f:
            json.dump(res, f)
        return

    from raylib.synthetic import write_dataset

    work = args.work_dir or tempfile.mkdtemp(prefix="raylib-bench-local-hf-")
    model_path = snapshot_tiny(work)
    data = write_dataset(os.path.join(work, "data"), max(600, BATCH * args.steps), 10)  # the demo data (eval unused)

    import yaml

    info = machine()
    load_before = os.getloadavg()
    print(f"machine: {info['cpu']}, nproc {info['nproc']}, avx512_bf16 {'yes' if info['avx512_bf16'] else 'no'}; "
          f"python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, "
          f"ray {info['ray']}; load average {load_before[0]:.2f}", flush=True)
    names = [v for v in VARIANTS if v in {x.strip() for x in args.variants.split(",")} | {"hf"}]  # hf: the baseline
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)}
    env.pop("OMP_NUM_THREADS", None)  # each variant's own default
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    print(f"OMP_WAIT_POLICY: {env.get('OMP_WAIT_POLICY', 'unset')}", flush=True)
    results: dict[str, list[dict]] = {v: [] for v in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotated: drift hits all alike
        for v in order:
            out = os.path.join(work, f"{r}-{v}")
            os.makedirs(out, exist_ok=True)
            if v.startswith("hf"):
                cmd = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps),
                       "--hf-one", model_path, data["train"], os.path.join(out, "hf.json")]
            else:
                job_file = os.path.join(out, "job.yaml")
                with open(job_file, "w") as f:
                    job = raylib_job(model_path, data, args.steps, os.path.join(out, "run"), v == "local_1cpu")
                    yaml.safe_dump(job, f)
                cmd = raylib_cli() + ["train", job_file, "--local", "--quiet"]
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out,
                                  env={**env, "OMP_NUM_THREADS": "1"} if v == "hf_1t" else env)
            wall = time.perf_counter() - started
            if proc.returncode != 0:
                print(f"round {r} {LABELS[v]}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                continue
            if v.startswith("hf"):
                with open(os.path.join(out, "hf.json")) as f:
                    res = summarize_hf(json.load(f))
            else:
                res = summarize_raylib(os.path.join(out, "run"))
            res.update(round=r, wall_s=wall)
            results[v].append(res)
            print(f"round {r} {LABELS[v]:<24}: {res['step_ms']:7.1f} ms/step, {res['tokens_per_s']:7.0f} real tok/s, "
                  f"{res['torch_threads']} torch threads, {wall:5.1f} s wall", flush=True)

    hf_by_round = {x["round"]: x["tokens_per_s"] for x in results["hf"]}
    rows = {}
    for v in names:
        rs = results[v]
        if not rs:
            continue
        ratios = [x["tokens_per_s"] / hf_by_round[x["round"]] for x in rs if x["round"] in hf_by_round]
        rows[v] = {
            "step_ms": statistics.median(x["step_ms"] for x in rs),
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
            "tokens_per_step": statistics.median(x["tokens_per_step"] for x in rs),
            "vs_hf": statistics.median(ratios) if ratios else None,
            "torch_threads": rs[0]["torch_threads"],
            "wall_s": statistics.median(x["wall_s"] for x in rs),
            "runs": len(rs),
            "note": rs[0]["note"],
        }

    def ratio_to(v, base):  # tokens/s of v over base's in the same round, median over rounds
        b = {x["round"]: x["tokens_per_s"] for x in results.get(base, [])}
        rs = [x["tokens_per_s"] / b[x["round"]] for x in results.get(v, []) if x["round"] in b]
        return round(statistics.median(rs), 3) if rs else None

    load_after = os.getloadavg()
    print()
    print(f"{'variant':<24} {'threads':>7} {'ms/step':>8} {'real tok/s':>10} {'× HF tok/s':>10} {'real tok/step':>13} "
          f"{'wall s':>7}  note")
    for v, x in rows.items():
        ratio = f"{x['vs_hf']:.2f}" if x["vs_hf"] is not None else "-"
        print(f"{LABELS[v]:<24} {x['torch_threads']!s:>7} {x['step_ms']:>8.1f} {x['tokens_per_s']:>10.0f} {ratio:>10} "
              f"{x['tokens_per_step']:>13.0f} {x['wall_s']:>7.1f}  {x['note']}")
    if "hf_1t" in rows and "local_1cpu" in rows:
        print(f"same threads (1): raylib --local, CPU 1 over HF Trainer, 1 thread: "
              f"{ratio_to('local_1cpu', 'hf_1t')}x real tok/s (median over rounds)")
    print(f"(medians over {args.repeats} rounds of {args.steps} steps; ratios per round, then median; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after on {info['nproc']} CPUs)")

    def get(v, k, nd=1):
        return round(rows[v][k], nd) if v in rows and rows[v][k] is not None else None

    print(json.dumps({
        "benchmark": "local_vs_hf",
        "machine": f"{info['cpu']}, nproc {info['nproc']}, avx512_bf16 {info['avx512_bf16']}",
        "versions": {k: info[k] for k in ("python", "torch", "transformers", "peft", "ray")},
        "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
        "omp_wait_policy": env.get("OMP_WAIT_POLICY"),
        "steps": args.steps, "repeats": args.repeats, "batch_size": BATCH, "max_length": MAX_LENGTH, "packing": False,
        "hf_tokens_per_s": get("hf", "tokens_per_s"),
        "raylib_local_tokens_per_s": get("local", "tokens_per_s"),
        "raylib_local_1cpu_tokens_per_s": get("local_1cpu", "tokens_per_s"),
        "hf_1t_tokens_per_s": get("hf_1t", "tokens_per_s"),
        "hf_step_ms": get("hf", "step_ms"),
        "hf_1t_step_ms": get("hf_1t", "step_ms"),
        "raylib_local_step_ms": get("local", "step_ms"),
        "raylib_local_1cpu_step_ms": get("local_1cpu", "step_ms"),
        "ratio_local_vs_hf": get("local", "vs_hf", 3),
        "ratio_local_1cpu_vs_hf": get("local_1cpu", "vs_hf", 3),
        "ratio_local_1cpu_vs_hf_1t": ratio_to("local_1cpu", "hf_1t"),
        "ratio_hf_1t_vs_hf": get("hf_1t", "vs_hf", 3),
        "threads": {v: rows[v]["torch_threads"] for v in rows},
    }))


if __name__ == "__main__":
    main()
