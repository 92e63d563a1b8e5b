"""The worker loop in one process (no Ray): resume exactness and the real QLoRA path."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import job_dict, run_python
from safetensors.torch import load_file

from raylib.config import validate_job
from raylib.train_loop import PlainSession, run


def _adapter(ckpt: str) -> dict:
    return load_file(os.path.join(ckpt, "expert", "adapter_model.safetensors"))


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tiny_model, demo_data, tmp_path):
    job = validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "o"), method={"dropout": 0.0},
                                train={"max_steps": 8, "checkpoint_every": 4}))
    full = PlainSession(str(tmp_path / "full"))
    run(job, full)
    assert [r["step"] for r in full.reports] == [4, 8]
    assert full.reports[-1]["eval_loss"] < full.reports[-1]["eval_loss_before"]

    resumed = PlainSession(str(tmp_path / "resumed"), resume_from=full.reports[0]["checkpoint"])
    out = run(job, resumed)
    start = resumed.events[0]
    assert start["type"] == "start" and start["step"] == 4 and start["resumed_from"]
    assert [e["step"] for e in resumed.events if e["type"] == "step"] == [5, 6, 7, 8]
    assert out["step"] == 8
    # same data position, optimizer and schedule -> the same weights as never stopping
    a, b = _adapter(full.reports[-1]["checkpoint"]), _adapter(resumed.reports[-1]["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_qlora_trains_a_4bit_base_with_paged_adamw(tiny_model, demo_data, tmp_path):
    job = validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "o"), method={"name": "qlora", "r": 8},
                                train={"max_steps": 10, "checkpoint_every": 0}))
    assert job.model.quantization == "nf4" and job.train.optimizer == "paged_adamw_8bit"
    session = PlainSession(str(tmp_path / "ckpt"))
    run(job, session)
    final = session.reports[-1]
    assert final["eval_loss"] < final["eval_loss_before"]
    assert final["trainable_params"] < final["total_params"]
    # the adapter loads with plain peft over the full-precision base
    proc = run_python(f"""
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({tiny_model!r})
model = PeftModel.from_pretrained(base, {os.path.join(final["checkpoint"], "expert")!r})
print(type(model).__name__, sum(p.numel() for n, p in model.named_parameters() if "lora_" in n))
""")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "PeftModelForCausalLM" and int(proc.stdout.split()[1]) > 0


def test_4bit_layers_are_really_quantized(tiny_model):
    import bitsandbytes as bnb

    from raylib.methods import get_method
    from raylib.models import load_model

    job = validate_job(job_dict(tiny_model, {"train": "x", "eval": None}, "o", method={"name": "qlora"}))
    model = get_method("qlora").apply(load_model(job.model), job)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_type == "nf4" for m in quantized)


def test_paged_adamw_steps_unpaged_off_cuda(tiny_model):
    """bitsandbytes pages optimizer state through CUDA only (elsewhere it warns every step and
    runs unpaged): off CUDA, qlora's default paged_adamw_8bit is built as the unpaged optimizer."""
    from raylib.backends import build_optimizer

    job = validate_job(job_dict(tiny_model, {"train": "x", "eval": None}, "o", method={"name": "qlora"}))
    assert job.train.optimizer == "paged_adamw_8bit"
    param = torch.nn.Parameter(torch.randn(128, 128))
    optimizer = build_optimizer(torch.nn.ParameterList([param]), job.train)
    assert optimizer.is_paged is False
    param.grad = torch.ones_like(param)
    before = param.detach().clone()
    optimizer.step()
    assert not torch.equal(param, before)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adamw_8bit"])
def test_optimizers_step(tiny_model, demo_data, tmp_path, optimizer):
    job = validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "o"),
                                train={"max_steps": 2, "checkpoint_every": 0, "optimizer": optimizer, "lr": 1e-3}))
    session = PlainSession(str(tmp_path / "ckpt"))
    assert run(job, session)["step"] == 2
