"""`raylib eval job.yaml|EXPERT_DIR --data eval.jsonl`: score an expert with Ray tasks.

The rows are cut into shards; each shard is one Ray task that loads the base model + expert
once (the method's `load`, the same path serving uses) and returns
- teacher-forced sums over the reference response tokens (NLL, tokens, correct argmax), and
- greedy generations (the template's prompt, cut at its end marker).
The driver adds the sums up (perplexity = exp(NLL/tokens), token accuracy) and scores the
generations against the references: exact match, BLEU (sacrebleu), ROUGE-1/2/L (rouge-score).
Output: a table on stdout, `eval.json` (metrics + settings) and `predictions.jsonl`.
"""

from __future__ import annotations

import json
import os
import time

import click

from raylib.errors import ConfigError


def resolve_target(target: str, overrides: list[str]) -> tuple[str, dict]:
    """job.yaml -> its output.dir; an expert dir -> itself. Returns (expert_dir, job dict)."""
    from raylib.experts import is_expert, read_expert

    if os.path.isfile(target):
        from raylib import launch
        from raylib.config import load_job

        job = launch.resolve_paths(load_job(target, overrides))
        expert = job.output.dir
        if not is_expert(expert):
            raise ConfigError("output.dir", f"{expert!r} holds no finished run (no expert.json)",
                              f"run `raylib train {target}` first")
        return expert, job.to_dict()
    if not is_expert(target):
        raise ConfigError("TARGET", f"{target!r} is neither a job YAML nor an expert directory (no expert.json)",
                          "pass a job file or a run's output.dir")
    info = read_expert(target)
    cfg = dict(info.config)
    cfg.setdefault("model", {"path": info.base_model})
    cfg.setdefault("data", {"template": info.template})
    return os.path.abspath(target), cfg


def _score_shard(expert_dir: str, job: dict, rows: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    """One Ray task: load once, teacher-forced sums + greedy generations for `rows`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from raylib import data as data_mod
    from raylib import evaluation, models
    from raylib.config import DataConfig, ModelConfig
    from raylib.experts import read_expert
    from raylib.methods import get_method
    from raylib.objectives import seq2seq as seq2seq_objective
    from raylib.objectives import sft

    torch.set_num_threads(1)
    info = read_expert(expert_dir)
    model_cfg = ModelConfig.model_validate({**job.get("model", {}), "path": info.base_model})
    if info.method == "full":  # the expert is the whole model
        model_cfg.path = expert_dir
    tokenizer = models.load_tokenizer(model_cfg)
    seq2seq = models.family(model_cfg) == "seq2seq"
    if info.method == "full":
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model = auto.from_pretrained(expert_dir, dtype="float32")
    else:
        model = get_method(info.method).load(models.load_model(model_cfg, "cpu", inference=True), expert_dir)
    model.eval()
    data_fields = {k: v for k, v in job.get("data", {}).items() if k in DataConfig.model_fields}
    data_cfg = DataConfig.model_validate({**data_fields, "train": "-", "packing": False, "too_long": "truncate"})
    if seq2seq:  # the encoder reads the prompt, the decoder is scored on the answer
        tf = seq2seq_objective.evaluate(model, seq2seq_objective.sequences(rows, tokenizer, data_cfg),
                                        seq2seq_objective.Collator(tokenizer.pad_token_id), batch_size, 0, 1, "cpu",
                                        lambda t: t)
    else:
        examples = data_mod.tokenize_rows(rows, tokenizer, data_cfg)
        sequences = data_mod.to_sequences(examples, data_cfg, None, 0)
        collator = data_mod.Collator(tokenizer.pad_token_id, packed=False)
        tf = sft.evaluate(model, sequences, collator, batch_size, 0, 1, "cpu", lambda t: t)
    f = data_cfg.fields
    prompt_rows = [{"instruction": r[f.instruction], "input": r.get(f.input) or ""} for r in rows]
    preds = evaluation.generate(model, tokenizer, evaluation.prompts_for(prompt_rows, data_cfg.template, tokenizer),
                                max_new_tokens=max_new_tokens, batch_size=batch_size)
    return {"nll": tf["eval_loss"] * tf["eval_tokens"], "tokens": tf["eval_tokens"],
            "correct": tf["eval_token_accuracy"] * tf["eval_tokens"], "predictions": preds}


def evaluate(target: str, data_path: str, *, overrides: list[str] | None = None, shards: int | None = None,
             max_new_tokens: int = 32, batch_size: int = 8, max_rows: int | None = None,
             address: str | None = None) -> dict:
    import ray

    from raylib import data as data_mod
    from raylib import launch
    from raylib import metrics as M
    from raylib.config import DataConfig

    expert_dir, job = resolve_target(target, overrides or [])
    data_fields = {k: v for k, v in job.get("data", {}).items() if k in DataConfig.model_fields}
    data_cfg = DataConfig.model_validate({**data_fields, "train": data_path})
    report = data_mod.DataReport()
    rows = data_mod.valid_rows(data_mod.load_rows(data_path, "--data"), data_cfg, report, max_rows)
    if not rows:
        raise ConfigError("--data", f"no usable rows in {data_path!r} ({report.summary()})",
                          "give a JSONL with instruction/input/output rows")
    if data_cfg.template == "plain":
        raise ConfigError("data.template", "plain-text data has no reference answers to generate",
                          "evaluate instruction data (alpaca or chat template)")
    started = time.time()
    launch.connect(address)
    n = shards or max(1, min(len(rows), int(ray.available_resources().get("CPU", 1))))
    parts = [rows[i::n] for i in range(n)]
    task = ray.remote(num_cpus=1)(_score_shard)
    results = ray.get([task.remote(expert_dir, job, part, max_new_tokens, batch_size) for part in parts if part])
    # undo the round-robin split: row i is in shard i % n at position i // n
    preds = [results[i % n]["predictions"][i // n] for i in range(len(rows))]
    refs = [str(r[data_cfg.fields.output]) for r in rows]
    nll, tokens = sum(r["nll"] for r in results), sum(r["tokens"] for r in results)
    out = {
        "perplexity": M.perplexity(nll, tokens),
        "loss": nll / max(tokens, 1),
        "token_accuracy": sum(r["correct"] for r in results) / max(tokens, 1),
        **M.text_metrics(preds, refs),
        "rows": len(rows), "tokens": tokens, "shards": len(results),
        "expert": expert_dir, "data": os.path.abspath(data_path), "max_new_tokens": max_new_tokens,
        "wall_time_s": round(time.time() - started, 2),
    }
    return {"metrics": out, "predictions": [{"prediction": p, "reference": r, **row} for p, r, row in zip(preds, refs, rows)]}


def format_table(m: dict) -> str:
    rows = [("perplexity", f"{m['perplexity']:.3f}"), ("token accuracy", f"{m['token_accuracy']:.4f}"),
            ("exact match", f"{m['exact_match']:.4f}"), ("BLEU", f"{m['bleu']:.2f}"),
            ("ROUGE-1", f"{m['rouge1']:.4f}"), ("ROUGE-2", f"{m['rouge2']:.4f}"), ("ROUGE-L", f"{m['rougeL']:.4f}"),
            ("rows / tokens", f"{m['rows']} / {m['tokens']}"), ("shards (Ray tasks)", str(m["shards"]))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


@click.command(name="eval")
@click.argument("target")
@click.option("--data", "data_path", required=True, help="JSONL/CSV/parquet rows with instruction/input/output")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a job field (job YAML target)")
@click.option("--out", "out_path", default=None, help="JSON output (default: <expert>/eval.json)")
@click.option("--shards", type=int, default=None, help="Ray tasks (default: one per free CPU)")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-rows", type=int, default=None)
@click.option("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else embedded local Ray)")
def eval_command(target, data_path, overrides, out_path, shards, max_new_tokens, batch_size, max_rows, address):
    """Score TARGET (a job YAML's output or an expert dir) on --data: perplexity, token accuracy,
    exact match, BLEU, ROUGE."""
    result = evaluate(target, data_path, overrides=list(overrides), shards=shards, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, max_rows=max_rows, address=address)
    m = result["metrics"]
    out_path = out_path or os.path.join(m["expert"], "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(m, f, indent=2)
    with open(os.path.splitext(out_path)[0] + "_predictions.jsonl", "w") as f:
        for row in result["predictions"]:
            f.write(json.dumps(row, default=str) + "\n")
    click.echo(format_table(m))
    click.echo(f"metrics: {out_path}")
