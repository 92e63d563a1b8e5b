"""`raylib params`: trainable/total parameter counts of a method on any HF config, on the
meta device (no weights allocated), so an 8B run can be sized on a laptop.

The counts are those `raylib.models.count_parameters` reports for the model the method
really builds (tests check this on the tiny model):

- lora: base parameters + the LoRA A/B matrices (r·(in+out) per targeted Linear);
- svf:  trainable = Σ min(out, in) over targeted Linears (one z entry per singular value).
  The targeted weights are held as frozen U, σ, Vᵀ factors, which are not parameters, so
  `total` = base − targeted weights + z; `base` is printed too. Factor memory is reported
  separately (`svf_factor_elements`: Σ r·(out+in+1)).
"""

from __future__ import annotations

import json
import os

import click


def _config(path: str):
    from transformers import AutoConfig

    if os.path.isfile(path):  # a config.json
        with open(path) as f:
            raw = json.load(f)
        model_type = raw.pop("model_type")
        return AutoConfig.for_model(model_type, **raw)
    return AutoConfig.from_pretrained(path)


def meta_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _config(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def count(path: str, method: str, targets="all-linear", r: int = 16, layers=None) -> dict:
    """{"trainable", "total", "base", ...} for `method` on the model at `path` (meta device)."""
    from raylib.methods.svf import ATTN_NAMES, MLP_NAMES, svf_param_counts, target_linears
    from raylib.methods.svf_layers import linear_shape
    from raylib.models import count_parameters

    model = meta_model(path)
    _, base = count_parameters(model)
    out = {"model": path, "method": method, "targets": targets, "base": base}
    if method == "svf":
        linears = target_linears(model, targets, layers)
        shapes = {n: linear_shape(m) for n, m in linears.items()}
        trainable = svf_param_counts(shapes)
        out.update(
            trainable=trainable,
            total=base - sum(o * i for o, i in shapes.values()) + trainable,
            matrices=len(shapes),
            svf_factor_elements=sum(min(o, i) * (o + i + 1) for o, i in shapes.values()),
        )
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        if targets in ("mlp", "attn"):
            names = MLP_NAMES if targets == "mlp" else ATTN_NAMES
            present = {n.rsplit(".", 1)[-1] for n in target_linears(model, targets, layers)}
            peft_targets = sorted(present & set(names)) or sorted(present)
        else:
            peft_targets = targets
        peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, target_modules=peft_targets,
                                                layers_to_transform=layers))
        trainable, total = count_parameters(peft)
        out.update(trainable=trainable, total=total, r=r)
    else:
        raise click.BadParameter(f"unknown method {method!r}", param_hint="--method")
    out["trainable_percent_of_base"] = 100.0 * out["trainable"] / out["base"]
    return out


@click.command("params")
@click.argument("model", metavar="MODEL_PATH_OR_CONFIG_JSON")
@click.option("--method", type=click.Choice(["svf", "lora"]), default="svf", show_default=True)
@click.option("--targets", default="all-linear", show_default=True,
              help="mlp | attn | all-linear | comma-separated module names (q_proj,v_proj)")
@click.option("--r", "rank", default=16, show_default=True, help="LoRA rank")
@click.option("--layers", default=None, help="comma-separated decoder layer indices (default: all)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def params(model: str, method: str, targets: str, rank: int, layers: str | None, as_json: bool) -> None:
    """Count trainable and total parameters of METHOD on a model without loading weights."""
    if targets not in ("mlp", "attn", "all-linear"):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    layer_list = [int(x) for x in layers.split(",")] if layers else None
    result = count(model, method, targets, rank, layer_list)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{method} on {model} (targets: {targets})")
    click.echo(f"  trainable: {result['trainable']:,} ({result['trainable_percent_of_base']:.4f}% of base)")
    click.echo(f"  total:     {result['total']:,}")
    click.echo(f"  base:      {result['base']:,}")
    if method == "svf":
        click.echo(f"  matrices:  {result['matrices']}  (SVD factor elements held: {result['svf_factor_elements']:,})")
