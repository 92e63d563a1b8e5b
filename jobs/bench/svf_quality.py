"""SVF quality: the Transformer² paper's Tables 1 and 2 at our scale, in one run.

    python jobs/bench/svf_quality.py [--seeds 0 1 2] [--steps 300] [--objectives sft reinforce]
                                     [--jobs 2] [--quick] [--base DIR] [--domains strings ...]
                                     [--methods lora svf-all svf-attn ...] [--lr svf-all=0.02]
                                     [--rl-lr svf-all=0.05]

Base: the instruct tiny Llama (`raylib tiny --instruct`: 4 layers of 128, pretrained by
raylib to be weak but real). Data: the synthetic domains with a held-out test split
(`synthetic.write_dataset(held_out=True)`: no test prompt is ever a training prompt).

Table 1, per domain and seed: exact match on the test split of the base, of LoRA (r 16 on
q/v, the paper's baseline) and of SVF (z on the MLP, and on all linear layers), each trained
with the same budget (`--steps` steps of `--batch-size` rows from the same `--rows` training
rows) by SFT and by REINFORCE (exact-match reward, group baseline, KL to the base); trainable
parameters and median step time (runs go `--jobs` at a time, one torch thread each, so step
times are comparable with each other, not with a whole machine's).

Table 2, an unseen task (the three domains' test prompts mixed; no expert was trained on the
mixture): the base, the best single SVF expert (all-linear, SFT), prompt-based routing (the
base model classifies each request, `raylib.serve.strategies.PromptClassifier`), classifier routing
(`raylib.serve.classifier` trained on the domains' training rows) and CEM few-shot mixing
(`raylib cem` on `--fewshot` rows of the unseen task: another draw of the same test-split
prompts; strings has only 14 test prompts, so its few-shot rows repeat prompts the test asks,
which CEM cannot memorise: it only picks the mixing weights).

Prints both tables, mean ± spread (min..max) over seeds, writes a plot (svf_quality.png in
--work) and ends with one JSON line:
{"domains": {d: {"base", "lora", "svf"}}, "unseen": {"base", "best_single", "prompt", "classifier", "cem"}}
where lora/svf are the SFT means (REINFORCE's when only it ran) of LoRA and of the better SVF
target set (also named).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DOMAINS = ("arithmetic", "strings", "comparison")

#: method label -> (method section, SFT lr, REINFORCE lr)
METHODS = {
    "lora": ({"name": "lora", "r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}, 3e-3, 1e-3),
    "svf-mlp": ({"name": "svf", "targets": "mlp"}, 0.05, 0.02),
    "svf-all": ({"name": "svf", "targets": "all-linear"}, 0.05, 0.02),
    "svf-attn": ({"name": "svf", "targets": "attn"}, 0.05, 0.02),  # not run by default (--methods)
}


def job_for(base: str, data: dict, out: str, method: str, objective: str, seed: int, args) -> dict:
    section, sft_lr, rl_lr = METHODS[method]
    sft_lr, rl_lr = args.lr.get(method, sft_lr), args.rl_lr.get(method, rl_lr)
    job = {
        "model": {"path": base},
        "data": {**data, "max_length": 256},
        "method": dict(section),
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": sft_lr if objective == "sft" else rl_lr,
                  "lr_scheduler": "constant", "checkpoint_every": 0, "eval_every": 0, "seed": seed},
        "output": {"dir": out},
    }
    if objective == "reinforce":
        job["objective"] = {"name": "reinforce", "reward": "exact_match", "num_samples": 4, "max_new_tokens": 8,
                            "kl_coef": 0.05}
    return job


# --------------------------------------------------------------------------- one run, in a child process


def one_run(spec: dict) -> dict:
    """Train one expert (or none: method "base"), score it on the test rows; a JSON dict."""
    import torch

    torch.set_num_threads(1)
    from raylib.config import ModelConfig, validate_job
    from raylib.evaluation import exact_match
    from raylib.methods import get_method
    from raylib.metrics import steady_step_time
    from raylib.models import count_parameters, load_model, load_tokenizer
    from raylib.train_loop import PlainSession, run

    rows = [json.loads(line) for line in open(spec["test"])]
    if spec["method"] == "base":
        mcfg = ModelConfig(path=spec["base"])
        return {"em": exact_match(load_model(mcfg), load_tokenizer(mcfg), rows)}
    job = validate_job(spec["job"])
    session = PlainSession(os.path.join(spec["out"], "ckpt"))
    out = run(job, session)
    expert = os.path.join(session.reports[-1]["checkpoint"], "expert")
    model = get_method(job.method.name).load(load_model(job.model), expert)
    trainable, _ = count_parameters(out["model"])
    return {"em": exact_match(model, load_tokenizer(job.model), rows), "trainable": trainable,
            "step_time_ms": 1e3 * steady_step_time(out["step_times"]), "expert": expert}


def spawn(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run {spec.get('name')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the unseen task


def unseen_task(base: str, experts: dict[str, str], work: str, seed: int, args) -> dict:
    """Table 2 for one seed: base, best single expert, prompt/classifier routing, CEM."""
    from raylib.config import ModelConfig
    from raylib.evaluation import exact_match
    from raylib.methods import get_method, svf
    from raylib.models import load_model, load_tokenizer
    from raylib.search.cem import CEMOptions, run_cem
    from raylib.synthetic import make_rows, write_jsonl
    from raylib.serve.classifier import row_text, train_classifier
    from raylib.serve.config import RouterConfig
    from raylib.serve.strategies import ClassifierStrategy, PromptClassifier

    test = make_rows(args.eval_rows, DOMAINS, seed + 20_000, "test")
    train = make_rows(args.rows, DOMAINS, seed + 30_000, "train")
    # few-shot rows are samples of the unseen task itself (another draw of its prompts), as in
    # the paper; rows of the experts' training side would favour experts that memorised them
    fewshot = write_jsonl(make_rows(args.fewshot, DOMAINS, seed + 40_000, "test"), os.path.join(work, "fewshot.jsonl"))
    mcfg = ModelConfig(path=base)
    tok = load_tokenizer(mcfg)
    models = {d: get_method("svf").load(load_model(mcfg), e) for d, e in experts.items()}
    base_model = load_model(mcfg)

    def routed(routes: list) -> float:
        """Exact match with each test row answered by its routed expert (None: the base)."""
        by: dict = {}
        for r, d in zip(test, routes):
            by.setdefault(d, []).append(r)
        return sum(exact_match(models.get(d, base_model), tok, rs) * len(rs) for d, rs in by.items()) / len(test)

    def mixed_model(alphas: list):
        model = get_method("svf").load(load_model(mcfg), next(iter(experts.values())))
        svf.apply_expert(model, list(experts.values()), alphas)
        return model

    singles = {d: exact_match(m, tok, test) for d, m in models.items()}
    prompt = PromptClassifier(base, list(experts), RouterConfig(strategy="prompt"))
    prompt_routes = [prompt.route(row_text(r))[0] for r in test]
    clf_dir = os.path.join(work, "classifier")
    train_classifier(train, clf_dir, seed=seed)
    clf = ClassifierStrategy(clf_dir, list(experts), 0.0)
    cem = run_cem(list(experts.values()), fewshot, os.path.join(work, "cem"),
                  CEMOptions(population=args.population, iterations=args.iterations, seed=seed, actors=args.jobs))
    return {
        "base": exact_match(base_model, tok, test),
        "best_single": max(singles.values()), "best_single_domain": max(singles, key=singles.get),
        "prompt": routed(prompt_routes),
        "prompt_routing_accuracy": sum(d == r["domain"] for d, r in zip(prompt_routes, test)) / len(test),
        "classifier": routed([clf.route(row_text(r))[0] for r in test]),
        "cem": exact_match(get_method("svf").load(load_model(mcfg), cem.expert_dir), tok, test),
        "cem_alphas": [round(a, 3) for a in cem.alphas],
        "cem_selected": {"mix": "mix", "base": "base"}.get(cem.selected) or next(
            d for d, e in experts.items() if os.path.abspath(e) == os.path.abspath(cem.selected)),
        "cem_best_mix": {"fewshot": round(cem.best_mix["score"], 3), "gain_z": round(cem.best_mix["gain_z"], 2),
                         "test": exact_match(mixed_model(cem.best_mix["alphas"]), tok, test)},
    }


# --------------------------------------------------------------------------- report


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}..{max(values):.3f})"


def plot(table: dict, unseen: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [k for k in next(iter(table.values()))]
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        means = [statistics.mean(table[d][label]) for d in table]
        axes[0].bar([j + i * width for j in range(len(table))], means, width, label=label)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(table))], list(table))
    axes[0].set_ylabel("exact match (test split)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("per domain (mean over seeds)")
    keys = ["base", "best_single", "prompt", "classifier", "cem"]
    axes[1].bar(keys, [statistics.mean(unseen[k]) for k in keys])
    axes[1].set_title("unseen mixed task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows", type=int, default=800, help="training rows per domain")
    ap.add_argument("--eval-rows", type=int, default=200, help="test rows per domain (and of the unseen task)")
    ap.add_argument("--objectives", nargs="+", default=["sft", "reinforce"], choices=["sft", "reinforce"])
    ap.add_argument("--methods", nargs="+", default=["lora", "svf-mlp", "svf-all"], choices=list(METHODS))
    ap.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                    help="override a method's SFT learning rate, e.g. svf-all=0.02")
    ap.add_argument("--rl-lr", nargs="+", default=[], metavar="METHOD=LR",
                    help="override a method's REINFORCE learning rate, e.g. svf-all=0.05")
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    ap.add_argument("--fewshot", type=int, default=96, help="CEM few-shot rows of the unseen task")
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--no-unseen", action="store_true", help="skip Table 2")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 60 steps, 60 test rows: a smoke run")
    ap.add_argument("--base", help="base model dir (default: `raylib tiny --instruct`, built and cached)")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/raylib-bench/svf_quality"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(json.loads(args.one))))
        return
    args.lr, args.rl_lr = ({k: float(v) for k, v in (item.split("=", 1) for item in items)} for items in (args.lr, args.rl_lr))
    domains = tuple(args.domains)
    if args.quick:
        args.seeds, args.steps, args.eval_rows, args.population, args.iterations = [0], 60, 60, 6, 2

    from raylib.tiny_models import build_instruct_tiny
    from raylib.noise import quiet_libraries
    from raylib.synthetic import write_dataset

    quiet_libraries()
    started = time.time()
    base = args.base or build_instruct_tiny(os.path.join(os.path.expanduser("~/.cache/raylib-tests"), "tiny-llama-instruct"))
    run_dir = os.path.join(args.work, time.strftime("%Y%m%d-%H%M%S"))
    specs = []
    for seed in args.seeds:
        for d in domains:
            data = write_dataset(os.path.join(run_dir, f"data-{d}-{seed}"), args.rows, args.eval_rows, [d], seed, held_out=True)
            specs.append({"name": f"base/{d}/{seed}", "method": "base", "base": base, "test": data["eval"],
                          "out": os.path.join(run_dir, f"base-{d}-{seed}"), "key": (d, seed, "base", "-")})
            for obj in args.objectives:
                for m in args.methods:
                    out = os.path.join(run_dir, f"{m}-{obj}-{d}-{seed}")
                    specs.append({"name": f"{m}/{obj}/{d}/{seed}", "method": m, "base": base, "test": data["eval"],
                                  "out": out, "job": job_for(base, data, out, m, obj, seed, args),
                                  "key": (d, seed, m, obj)})
    print(f"{len(specs)} runs, {args.jobs} at a time, base {base}", file=sys.stderr)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip([tuple(s["key"]) for s in specs], pool.map(spawn, specs)))

    # ---- Table 1
    cols = ["base"] + [f"{m}/{o}" for o in args.objectives for m in args.methods]
    table = {d: {c: [] for c in cols} for d in domains}
    info = {}
    for (d, seed, m, o), r in results.items():
        col = "base" if m == "base" else f"{m}/{o}"
        table[d][col].append(r["em"])
        if m != "base":
            info.setdefault(col, {"trainable": r["trainable"], "step_ms": []})["step_ms"].append(r["step_time_ms"])
    print(f"\nTable 1: exact match on each domain's test split, mean (min..max) over seeds {args.seeds}; "
          f"{args.steps} steps x {args.batch_size} rows; {platform.processor() or platform.machine()}")
    print(f"{'method':<20}" + "".join(f"{d:>26}" for d in domains) + f"{'trainable':>11}{'step ms':>9}")
    for c in cols:
        extra = f"{info[c]['trainable']:>11,}{statistics.median(info[c]['step_ms']):>9.1f}" if c in info else ""
        print(f"{c:<20}" + "".join(f"{spread(table[d][c]):>26}" for d in domains) + extra)
    margins = {c: {d: min(e - b for e, b in zip(table[d][c], table[d]["base"])) for d in domains}
               for c in cols if c != "base"}
    print("\nworst-seed margin over the base (goal for SVF: >= 0.10 on every domain):")
    for c, m in margins.items():
        print(f"  {c:<18} " + "  ".join(f"{d} {v:+.3f}" for d, v in m.items()))

    # ---- Table 2
    unseen = {}
    if not args.no_unseen and "sft" in args.objectives and "svf-all" in args.methods and domains == DOMAINS:
        for seed in args.seeds:
            experts = {d: results[(d, seed, "svf-all", "sft")]["expert"] for d in domains}
            row = unseen_task(base, experts, os.path.join(run_dir, f"unseen-{seed}"), seed, args)
            print(f"unseen seed {seed}: {json.dumps(row)}", file=sys.stderr)
            for k, v in row.items():
                unseen.setdefault(k, []).append(v)
        print(f"\nTable 2: unseen task (the domains' test prompts mixed, {args.eval_rows} rows), mean (min..max)")
        for k in ("base", "best_single", "prompt", "classifier", "cem"):
            print(f"  {k:<12} {spread(unseen[k])}")
        print(f"  prompt routing accuracy {spread(unseen['prompt_routing_accuracy'])}; best single expert: "
              f"{unseen['best_single_domain']}; CEM alphas {unseen['cem_alphas']}, result {unseen['cem_selected']}; "
              f"CEM's best mix (few-shot / test / z over the best anchor) {unseen['cem_best_mix']}")
        plot(table, unseen, os.path.join(run_dir, "svf_quality.png"))
        print(f"plot: {os.path.join(run_dir, 'svf_quality.png')}")
    print(f"total {time.time() - started:.0f} s")

    obj = "sft" if "sft" in args.objectives else args.objectives[0]  # the summary's objective
    svf_cols = [c for c in (f"svf-mlp/{obj}", f"svf-all/{obj}") if c in table[domains[0]]]
    best_svf = max(svf_cols, key=lambda c: sum(statistics.mean(table[d][c]) for d in domains)) if svf_cols else None
    summary = {"domains": {d: {"base": round(statistics.mean(table[d]["base"]), 4),
                               **({"lora": round(statistics.mean(table[d][f"lora/{obj}"]), 4)} if f"lora/{obj}" in table[d] else {}),
                               **({"svf": round(statistics.mean(table[d][best_svf]), 4)} if best_svf else {})}
                           for d in domains},
               "svf_targets": best_svf, "seeds": args.seeds, "steps": args.steps,
               "worst_seed_margin": {c: {d: round(v, 4) for d, v in m.items()} for c, m in margins.items()}}
    if unseen:
        summary["unseen"] = {k: round(statistics.mean(unseen[k]), 4) for k in ("base", "best_single", "prompt", "classifier", "cem")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
