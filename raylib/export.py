"""`raylib export EXPERT_DIR --merge OUT_DIR [--onnx]`: an expert as a standalone model.

`--merge` loads the expert's base model in full precision, folds the expert into its weights
through the method's `merge` hook (PEFT `merge_and_unload` for LoRA/QLoRA, SVF's
U·diag(σ⊙z)·Vᵀ, a full model as is) and saves a plain HF model directory that
`AutoModelForCausalLM.from_pretrained` loads without raylib or peft. The directory is also a
raylib expert (method `full`, expert.json with the source expert's metrics).

A QLoRA adapter is merged into the full-precision base (the usual way to ship QLoRA: the
adapter was trained against the 4-bit rounding of these weights, so outputs differ slightly
from the quantized model).

`--onnx` also writes `model.onnx` (input_ids, attention_mask -> logits, dynamic batch and
sequence; no KV cache) with `torch.onnx.export(dynamo=True)`, which needs `onnx` and
`onnxscript` (`pip install raylib[export]`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import click

from raylib.errors import ConfigError, RaylibError
from raylib.experts import is_expert, read_expert, write_expert_json


class ExportFailed(RaylibError):
    exit_code = 1


def merge_expert(expert_dir: str, out_dir: str, base_model: str | None = None) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylib.methods import get_method

    if not is_expert(expert_dir):
        raise ConfigError("EXPERT_DIR", f"{expert_dir!r} is not a raylib expert (no expert.json)",
                          "pass a run's output.dir or a checkpoint's expert/ directory")
    info = read_expert(expert_dir)
    base_path = base_model or info.base_model
    if not (os.path.isdir(base_path) or "/" in base_path):
        raise ConfigError("--base", f"the expert's base model {base_path!r} is not available", "pass --base PATH")
    if os.path.abspath(out_dir) == os.path.abspath(expert_dir):
        raise ConfigError("--merge", "OUT_DIR is the expert directory itself", "choose a new directory")
    tok_src = expert_dir if os.path.isfile(os.path.join(expert_dir, "tokenizer_config.json")) else base_path
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    if (info.config.get("objective") or {}).get("name") == "reward":  # the backbone with its score head
        from raylib.config import ModelConfig
        from raylib.models import load_model

        base = load_model(ModelConfig(path=base_path, dtype="fp32"), head="reward")
        base.config.pad_token_id = tokenizer.pad_token_id
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype="float32")
    merged = get_method(info.method).merge(base, expert_dir)
    os.makedirs(out_dir, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    out_info = dataclasses.replace(
        info, method="full", config={**info.config, "method": {"name": "full"}},
        metrics={**info.metrics, "merged_from": os.path.abspath(expert_dir), "merged_method": info.method},
    )
    write_expert_json(out_dir, out_info)
    return out_dir


def export_onnx(model_dir: str, path: str | None = None) -> str:
    """model_dir (a plain HF causal LM) -> model.onnx: (input_ids, attention_mask) -> logits."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportFailed(f"ONNX export needs onnx and onnxscript ({exc.name} is not installed): "
                           "pip install onnx onnxscript (or raylib[export])") from exc
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    model.config.use_cache = False

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    path = path or os.path.join(model_dir, "model.onnx")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    try:
        torch.onnx.export(Logits(model), (ids, torch.ones_like(ids)), path, dynamo=True,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    except Exception as exc:  # the exporter's own error, in one line
        raise ExportFailed(f"torch.onnx.export failed for {model_dir}: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0][:300]}") from exc
    return path


@click.command()
@click.argument("expert_dir", type=click.Path(file_okay=False))
@click.option("--merge", "out_dir", required=True, type=click.Path(file_okay=False),
              help="write the merged full model here")
@click.option("--base", default=None, help="base model path (default: the one in expert.json)")
@click.option("--onnx", "with_onnx", is_flag=True, help="also write OUT_DIR/model.onnx (needs onnx, onnxscript)")
def export(expert_dir: str, out_dir: str, base: str | None, with_onnx: bool) -> None:
    """Merge the expert at EXPERT_DIR into its base model and save a plain HF model."""
    merge_expert(expert_dir, out_dir, base)
    click.echo(f"merged model saved to {out_dir} (AutoModelForCausalLM.from_pretrained loads it)")
    if with_onnx:
        click.echo(f"ONNX model saved to {export_onnx(out_dir)}")
    with open(os.path.join(out_dir, "expert.json")) as f:
        json.load(f)  # written last: proves the export completed
