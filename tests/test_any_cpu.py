"""raylib's contracts hold whichever CPU path a library takes.

bitsandbytes picks its 4-bit CPU kernel per CPU: on AVX512-BF16 it logs a notice on every
import and packs weights in blocks of 32 output features (asserting the shape). These tests
drive raylib's side of both on any CPU. The notice filter is checked with the record as
bitsandbytes emits it, and the shape check by switching raylib's view of the CPU kind. The
real kernels run wherever the suite runs: the QLoRA tests train on this machine's own path.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import job_dict, run_python, write_job

from raylib import models, noise


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
    """A random-weight tiny Llama whose MLP width (176) the packed 4-bit kernel refuses."""
    return models.build_tiny(str(tmp_path_factory.mktemp("odd") / "m"), pretrain_steps=0, intermediate_size=176)


def _qlora_job(tmp_path, model: str, **scaling) -> str:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}) + "\n"
                            for i in range(20)))
    job = job_dict(model, {"train": str(data), "eval": str(data)}, str(tmp_path / "out"), method={"name": "qlora"})
    if scaling:
        job["scaling"] = scaling
    return write_job(tmp_path / "job.yaml", job)


def _validate(job_yaml: str):
    from raylib.cli import main

    return CliRunner().invoke(main, ["validate", job_yaml])


def test_qlora_shapes_are_checked_before_ray_where_bnb_packs(tmp_path, odd_model, monkeypatch):
    monkeypatch.setattr(models, "bnb_packs_cpu_weights", lambda: True)
    result = _validate(_qlora_job(tmp_path, odd_model))
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.quantization:"), result.stderr
    assert "model.layers.0.mlp.gate_proj is 176 x 64" in lines[0] and "(fix: " in lines[0]
    assert "lm_head" not in lines[0]  # transformers keeps the output embeddings in full precision


def test_qlora_shape_check_applies_only_where_it_binds(tmp_path, odd_model, monkeypatch):
    monkeypatch.setattr(models, "bnb_packs_cpu_weights", lambda: False)  # this CPU's path: no packing
    assert _validate(_qlora_job(tmp_path, odd_model)).exit_code == 0
    monkeypatch.setattr(models, "bnb_packs_cpu_weights", lambda: True)  # a job that asks for a GPU
    result = _validate(_qlora_job(tmp_path, odd_model, use_gpu=True))
    assert result.exit_code == 0, result.output
