"""raylib's contracts hold whichever CPU path a library takes.

bitsandbytes picks its 4-bit CPU kernel per CPU: on AVX512-BF16 it logs a notice on every
import, and an evaluation repacks 4-bit weights for an inference kernel that asserts the
layer's shape and has no backward (see `models.use_4bit_cpu_kernels`). The notice filter is
checked with the record as bitsandbytes emits it. The 4-bit tests assert outcomes that must
hold on every path (same gradients after an evaluation, same logits for inference, any layer
width), on two models: one whose layers fit the packed kernel and one whose MLP does not.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import job_dict, run_python

from raylib import models, noise, tiny_models
from raylib.config import validate_job
from raylib.methods import get_method
from raylib.tiny_models import build_family

CACHE = os.environ.get("RAYLIB_TEST_CACHE", os.path.expanduser("~/.cache/raylib-tests"))


def test_known_noise_is_dropped_and_nothing_else():
    """Every LOG_NOISE record is silent in a process that imported raylib; another record
    on the same logger, and one of ours, still print."""
    emit = "\n".join(
        f"logging.getLogger({e.logger!r}).warning({e.starts_with + ': %s. details'!r}, 'x')" for e in noise.LOG_NOISE
    )
    code = (
        "import logging, raylib\n" + emit + "\n"
        + "".join(f"logging.getLogger({e.logger!r}).warning('a real problem in {e.logger}')\n" for e in noise.LOG_NOISE)
        + "logging.getLogger('raylib').warning('our own warning')\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [f"a real problem in {e.logger}" for e in noise.LOG_NOISE] + ["our own warning"]


def test_noise_is_filtered_before_the_library_loads():
    """The filter sits on the logger before bitsandbytes is imported (in a Ray worker, the
    unpickled train function imports raylib first), and the library keeps that logger."""
    proc = run_python(
        "import sys, logging, raylib\n"
        "assert 'bitsandbytes' not in sys.modules\n"
        "import bitsandbytes.backends.cpu.ops as ops\n"
        "assert ops.logger is logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "assert ops.logger.filters, 'raylib.noise did not attach its filter'\n"
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """A random-weight tiny Llama whose MLP width (176) the packed 4-bit kernel cannot hold."""
    return tiny_models.build_tiny(str(tmp_path_factory.mktemp("odd") / "m"), pretrain_steps=0, intermediate_size=176)


@pytest.fixture(scope="module")
def even_model():
    """A tiny Llama whose every layer fits the packed kernel (multiples of 64): on AVX512-BF16
    CPUs its 4-bit layers would be repacked by an evaluation."""
    return build_family("llama", os.path.join(CACHE, "arch-llama"))


def _nf4(path: str, inference: bool):
    job = validate_job(job_dict(path, {"train": "x", "eval": None}, "o", method={"name": "qlora", "r": 8, "dropout": 0.0}))
    return job, models.load_model(job.model, inference=inference)


def _batch(path: str) -> dict:
    tok = models.load_tokenizer(validate_job(job_dict(path, {"train": "x", "eval": None}, "o")).model)
    enc = tok(["What is 12 + 30? 42", "Reverse the word. lamp pmal"], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]}


def _lora_grads(model, batch) -> dict:
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("which", ["odd", "even"])
def test_qlora_gradients_are_the_same_after_an_evaluation(which, odd_model, even_model):
    """A QLoRA run evaluates between steps. Afterwards every LoRA weight, the first layer's
    too, gets the gradient it got before: no 4-bit layer's kernel stops the backward pass or
    refuses the layer's shape, whichever CPU path bitsandbytes takes."""
    path = odd_model if which == "odd" else even_model
    job, base = _nf4(path, inference=False)
    model = get_method("qlora").apply(base, job)
    batch = _batch(path)
    before = _lora_grads(model, batch)
    assert any(".layers.0." in n for n in before) and len(before) == len(
        [p for p in model.parameters() if p.requires_grad])
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch).loss
    assert torch.isfinite(evaluated)
    after = _lora_grads(model, batch)
    assert after.keys() == before.keys()
    for n in before:
        torch.testing.assert_close(after[n], before[n], msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("which", ["odd", "even"])
def test_a_4bit_model_for_inference_gives_the_training_models_logits(which, odd_model, even_model):
    """Serving and scoring load 4-bit models for inference (bitsandbytes may use its packed
    kernel where a layer fits it, its generic path elsewhere): any layer width runs, and the
    logits match the training load's to bf16 compute precision."""
    path = odd_model if which == "odd" else even_model
    batch = _batch(path)
    logits = {}
    for inference in (False, True):
        model = _nf4(path, inference)[1].eval()
        with torch.no_grad():
            logits[inference] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert torch.isfinite(logits[True]).all()
    torch.testing.assert_close(logits[True], logits[False], atol=5e-2, rtol=5e-2)
