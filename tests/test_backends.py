"""The DeepSpeed backend: generated config and its errors (fast, pure), real ZeRO-2 / ZeRO-3
LoRA runs in 2 Ray Train workers (loss drops, consolidated adapter loads with plain PEFT and
scores what the run scored), resume from DeepSpeed checkpoints, and the method matrix."""

from __future__ import annotations

import json
import os

import pytest
from helpers import job_dict, run_cli, run_python, write_job

from raylib import backends, launch
from raylib.config import validate_job
from raylib.errors import ConfigError
from raylib.methods import METHODS

STUB = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "method": {"name": "lora"}, "output": {"dir": "o"}}


def _stub(**sections) -> dict:
    job = json.loads(json.dumps(STUB))
    for k, v in sections.items():
        job.setdefault(k, {}).update(v)
    return job


# --------------------------------------------------------------------------- config generation


def test_generated_config_follows_the_job():
    job = validate_job(_stub(backend={"name": "deepspeed", "zero_stage": 3, "mixed_precision": "bf16"},
                             train={"batch_size": 4, "grad_accum": 3, "max_grad_norm": 0.5},
                             scaling={"num_workers": 2}))
    cfg = backends.deepspeed_config(job)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours are used (client optimizer)
    assert backends.deepspeed_config(job, world_size=8)["train_batch_size"] == 4 * 3 * 8


def test_precision_auto_and_offload():
    job = validate_job(_stub(backend={"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True,
                                      "offload_params": True}, train={"max_grad_norm": None}))
    cpu, gpu = backends.deepspeed_config(job, 1, "cpu"), backends.deepspeed_config(job, 1, "cuda")
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]  # auto on CPU: fp32
    assert gpu["bf16"]["enabled"] or gpu["fp16"]["enabled"]
    assert cpu["gradient_clipping"] == 0.0
    zero = cpu["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert gpu["zero_optimization"]["offload_param"]["pin_memory"] is True


def test_user_config_is_deep_merged_inline_and_from_a_file(tmp_path):
    user = {"zero_optimization": {"reduce_bucket_size": 1000, "offload_optimizer": {"device": "cpu"}},
            "gradient_clipping": 2.0, "communication_data_type": "fp32"}
    inline = validate_job(_stub(backend={"name": "deepspeed", "config": user}))
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    from_file = validate_job(_stub(backend={"name": "deepspeed", "config": str(path)}))
    for job in (inline, from_file):
        cfg = backends.deepspeed_config(job)
        assert cfg["zero_optimization"]["stage"] == 2  # generated keys next to merged ones stay
        assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000
        assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
        assert cfg["gradient_clipping"] == 2.0 and cfg["communication_data_type"] == "fp32"
        assert cfg["train_micro_batch_size_per_gpu"] == 8


@pytest.mark.parametrize("backend, extra, field, text", [
    ({"name": "deepspeed", "offload_params": True}, {}, "backend.offload_params", "ZeRO stage 3"),
    ({"name": "deepspeed", "zero_stage": 1}, {}, "backend.zero_stage", "got 1"),
    ({"zero_stage": 3}, {}, "backend.zero_stage", "set backend.name: deepspeed"),
    ({"offload_optimizer": True}, {}, "backend.offload_optimizer", "DeepSpeed option"),
    ({"name": "deepspeed", "config": "/nonexistent/ds.json"}, {}, "backend.config", "does not exist"),
    ({"name": "deepspeed", "config": {"train_batch_size": 64}}, {}, "backend.config.train_batch_size", "train.batch_size"),
    ({"name": "deepspeed", "config": {"zero_optimization": {"stage": 1}}}, {}, "backend.config", "stage 2 or 3"),
    ({"name": "deepspeed", "config": {"scheduler": {"type": "WarmupLR"}}}, {}, "backend.config.scheduler", "optimizer"),
    ({"name": "deepspeeed"}, {}, "backend.name", "deepspeed"),
    ({"name": "deepspeed"}, {"objective": {"name": "reinforce"}}, "backend.name", "backend.name: accelerate"),
])
def test_bad_backend_options_are_config_errors(backend, extra, field, text):
    with pytest.raises(ConfigError) as err:
        validate_job(_stub(backend=backend, **extra))
    assert field in str(err.value) and text in str(err.value), str(err.value)


@pytest.mark.parametrize("name, stage", sorted(backends.DEEPSPEED_UNSUPPORTED))
def test_methods_that_cannot_run_under_deepspeed_fail_up_front(name, stage, tiny_model, demo_data, tmp_path):
    from test_methods import SETTINGS, method_job

    from raylib.synthetic import write_classification_dataset

    cls_data = write_classification_dataset(str(tmp_path / "cls"), n_train=40, n_eval=12)
    raw = method_job(name, tiny_model, demo_data, cls_data, str(tmp_path / "o"),
                     backend={"name": "deepspeed", "zero_stage": stage})
    assert name in SETTINGS
    with pytest.raises(ConfigError, match=f"method '{name}' cannot run under DeepSpeed ZeRO-{stage}") as err:
        validate_job(raw)
    assert "backend.zero_stage" in str(err.value) and "fix:" in str(err.value)


def test_print_deepspeed_config_cli(tiny_model, demo_data, tmp_path):
    path = write_job(tmp_path / "job.yaml", job_dict(tiny_model, demo_data, str(tmp_path / "o"),
                                                     backend={"name": "deepspeed", "zero_stage": 3},
                                                     scaling={"num_workers": 2, "use_gpu": False}))
    proc = run_cli("train", path, "--print-deepspeed-config", "--set", "train.grad_accum=2", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads(proc.stdout)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["train_batch_size"] == 4 * 2 * 2
    assert not os.path.exists(tmp_path / "o")  # nothing ran
    plain = write_job(tmp_path / "plain.yaml", job_dict(tiny_model, demo_data, str(tmp_path / "o")))
    proc = run_cli("train", plain, "--print-deepspeed-config", timeout=120)
    assert proc.returncode == 2 and "backend.name" in proc.stderr and "set backend.name: deepspeed" in proc.stderr


# --------------------------------------------------------------------------- real runs


def _ds_job(tiny_model, demo_data, out, stage, method=None, **sections):
    sections.setdefault("scaling", {"num_workers": 2})
    raw = job_dict(tiny_model, demo_data, out, backend={"name": "deepspeed", "zero_stage": stage}, **sections)
    if method is not None:
        raw["method"] = method
    return validate_job(raw)


def _rescore(job, expert_dir: str) -> float:
    """Eval loss of the published expert, loaded in this process by the method's own loader
    (PEFT methods: plain `PeftModel.from_pretrained`; full: `AutoModelForCausalLM`)."""
    import torch

    from raylib import data as data_mod
    from raylib import models
    from raylib.objectives import sft

    tok = models.load_tokenizer(job.model)
    base = models.load_model(job.model)
    model = METHODS[job.method.name].load(base, expert_dir).eval()
    prepared = data_mod.prepare(job, tok)
    collator = data_mod.Collator(tok.pad_token_id, packed=job.data.packing)
    with torch.no_grad():
        return sft.evaluate(model, prepared.eval, collator, job.train.batch_size, 0, 1, "cpu", lambda t: t)["eval_loss"]


def _check_run(job, result, tol=1e-4):
    m = result.metrics
    assert m["world_size"] == job.scaling.num_workers
    assert m["eval_loss"] < m["eval_loss_before"], m
    assert 0 < m["trainable_params"] <= m["total_params"]
    info = json.load(open(os.path.join(result.expert_dir, "expert.json")))
    assert info["method"] == job.method.name
    again = _rescore(job, result.expert_dir)
    assert again == pytest.approx(m["eval_loss"], rel=tol, abs=tol), (again, m["eval_loss"])


def test_zero2_lora_two_workers(ray_session, tiny_model, demo_data, tmp_path):
    out = str(tmp_path / "run")
    job = _ds_job(tiny_model, demo_data, out, 2, train={"max_steps": 8, "checkpoint_every": 4})
    result = launch.train(job, show_progress=False)
    _check_run(job, result)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"] - 0.5
    engine = os.path.join(result.checkpoint_dir, "train_state", "deepspeed", backends.DS_TAG)
    shards = sorted(f for f in os.listdir(engine) if f.startswith("zero_pp_rank_"))
    assert len(shards) == 2, os.listdir(engine)  # both ranks' ZeRO shards merged into one checkpoint
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert os.path.isfile(os.path.join(out, name))


def test_zero3_lora_two_workers_consolidated_then_resumed(ray_session, tiny_model, demo_data, tmp_path):
    """ZeRO-3 partitions the LoRA weights over both workers; the published adapter must be the
    whole trained adapter: plain PEFT scores it exactly as the run did, and its logits equal
    those of the fp32 weights DeepSpeed's own zero_to_fp32 rebuilds from the ZeRO shards."""
    import torch

    out = str(tmp_path / "run")
    job = _ds_job(tiny_model, demo_data, out, 3, train={"max_steps": 6, "checkpoint_every": 3})
    result = launch.train(job, show_progress=False)
    _check_run(job, result)
    assert result.metrics["total_params"] > result.metrics["trainable_params"]  # ZeRO-3 partitions counted whole

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    ds_dir = os.path.join(result.checkpoint_dir, "train_state", "deepspeed")
    fp32 = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=backends.DS_TAG, exclude_frozen_parameters=True)
    assert fp32 and all(".lora_" in k for k in fp32)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    published = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    rebuilt = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), METHODS["lora"].peft_config(job)).eval()
    loaded = set_peft_model_state_dict(rebuilt, {k.replace(".default", ""): v for k, v in fp32.items()})
    assert not loaded.unexpected_keys
    with torch.no_grad():
        a, b = published(ids).logits, rebuilt(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    with published.disable_adapter(), torch.no_grad():
        assert (published(ids).logits - a).abs().max() > 1e-3  # the adapter is not a no-op

    # resume: same run directory, more steps -> every rank restores its shard and continues
    longer = job.model_copy(deep=True)
    longer.train.max_steps = 9
    result2 = launch.train(longer, resume=True, show_progress=False)
    events = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    start = [e for e in events if e["type"] == "start"][-1]
    assert start["step"] == 6 and start["resumed_from"], start
    assert result2.metrics["step"] == 9
    assert result2.metrics["eval_loss"] < result.metrics["eval_loss"]
    _check_run(longer, result2)


RESUME_CODE = r"""
import json, os, tempfile
os.environ["DS_ACCELERATOR"] = "cpu"
from raylib.config import validate_job
from raylib.train_loop import PlainSession, run
raw = json.loads(os.environ["RAYLIB_TEST_JOB"])
def job(steps, out):
    r = json.loads(json.dumps(raw)); r["train"]["max_steps"] = steps; r["output"]["dir"] = out
    return validate_job(r)
tmp = tempfile.mkdtemp()
straight = PlainSession(os.path.join(tmp, "a"))
run(job(4, os.path.join(tmp, "a")), straight)
first = PlainSession(os.path.join(tmp, "b"))
run(job(2, os.path.join(tmp, "b")), first)
resumed = PlainSession(os.path.join(tmp, "c"), resume_from=first.reports[-1]["checkpoint"])
run(job(4, os.path.join(tmp, "c")), resumed)
print(json.dumps({"straight": straight.reports[-1]["eval_loss"], "resumed": resumed.reports[-1]["eval_loss"],
                  "resumed_steps": [r["step"] for r in resumed.reports]}))
"""


def test_resume_from_a_deepspeed_checkpoint_is_exact(tiny_model, demo_data, tmp_path, monkeypatch):
    """2 steps + resume 2 == 4 straight steps (ZeRO-3 engine state: weights, Adam moments,
    our scheduler, data position). One process without Ray, in a fresh interpreter (DeepSpeed
    sets up a process group, which must not leak into the test process)."""
    raw = job_dict(tiny_model, demo_data, "unused", backend={"name": "deepspeed", "zero_stage": 3},
                   method={"name": "lora", "r": 8, "dropout": 0.0},  # dropout RNG is not part of a checkpoint
                   train={"max_steps": 4, "checkpoint_every": 2, "lr_scheduler": "constant"})
    monkeypatch.setenv("RAYLIB_TEST_JOB", json.dumps(raw))
    proc = run_python(RESUME_CODE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["resumed_steps"] == [4]
    assert res["resumed"] == pytest.approx(res["straight"], abs=1e-5), res


# --------------------------------------------------------------------------- method matrix

MATRIX_CODE = r"""
import json, os
os.environ["DS_ACCELERATOR"] = "cpu"
from raylib.config import validate_job
from raylib.train_loop import PlainSession, run

results = {}
for name, raw in json.loads(os.environ["RAYLIB_TEST_JOBS"]).items():
    try:
        session = PlainSession(raw["output"]["dir"] + "-ckpt")
        run(validate_job(raw), session)
        final = session.reports[-1]
        results[name] = {"before": final["eval_loss_before"], "after": final["eval_loss"],
                         "expert": os.path.join(final["checkpoint"], "expert")}
    except Exception as exc:  # reported per method; the test names it
        results[name] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}"}
print("RESULTS " + json.dumps(results))
"""


def _rescore_any(job, expert_dir: str) -> float:
    """Eval loss of a published expert loaded by its method's loader, in this (DeepSpeed-free)
    process, with the objective's own eval (classification heads included)."""
    from raylib import models
    from raylib.objectives import loop_objective

    objective = loop_objective(job)
    tok = models.load_tokenizer(job.model)
    model = METHODS[job.method.name].load(models.load_model(job.model), expert_dir).eval()
    prepared = objective.prepare(job, tok, model, "cpu")
    return objective.evaluate(model, prepared.eval, objective.collator(job, tok), job.train.batch_size,
                              0, 1, "cpu", lambda t: t)["eval_loss"]


@pytest.mark.parametrize("stage", [2, 3])
def test_every_method_on_deepspeed(stage, tiny_model, demo_data, tmp_path, monkeypatch):
    """Every registered method under ZeRO-`stage` (the methods' own matrix settings from
    test_methods.py): it learns, and its published expert, loaded by the method's loader, gives
    the eval loss the run ended with. One process per stage, world size 1 (DeepSpeed engine,
    ZeRO partitioning and gathered saves; the two-worker runs above cover the distribution);
    methods DeepSpeed cannot run fail up front with a ConfigError (tested above)."""
    from test_methods import SETTINGS, method_job

    from raylib.synthetic import write_classification_dataset

    cls_data = write_classification_dataset(str(tmp_path / "cls"), n_train=400, n_eval=90)
    jobs = {}
    for name in sorted(METHODS):
        if backends.deepspeed_unsupported(name, stage):
            continue
        raw = method_job(name, tiny_model, demo_data, cls_data, str(tmp_path / name),
                         backend={"name": "deepspeed", "zero_stage": stage})
        raw["scaling"] = {"num_workers": 1}
        jobs[name] = raw
    assert set(SETTINGS) == set(METHODS)
    monkeypatch.setenv("RAYLIB_TEST_JOBS", json.dumps(jobs))
    proc = run_python(MATRIX_CODE, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")][-1]
    results = json.loads(line[len("RESULTS "):])
    problems = {}
    for name, r in results.items():
        tol = 1e-3 if name == "qlora" else 2e-4
        if "error" in r:
            problems[name] = r["error"]
        elif not r["after"] < r["before"]:
            problems[name] = f"eval loss did not drop: {r}"
        else:
            again = _rescore_any(validate_job(jobs[name]), r["expert"])
            if abs(again - r["after"]) > tol:
                problems[name] = f"the reloaded expert scores {again:.6f}, the run ended at {r['after']:.6f}"
            if name == "adalora":  # the rank allocator ran under ZeRO: ranks pruned to the budget
                ranks = _adalora_ranks(r["expert"])
                target = jobs[name]["method"]["target_r"] * 14
                if sum(ranks.values()) != target:
                    problems[name] = f"AdaLoRA kept {sum(ranks.values())} ranks, the budget is {target}"
    assert not problems, json.dumps(problems, indent=1)


def _adalora_ranks(expert_dir: str) -> dict[str, int]:
    """Rank of every adapted matrix in a published AdaLoRA adapter (the saved lora_A rows)."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(expert_dir, "adapter_model.safetensors"))
    return {k: v.shape[0] for k, v in weights.items() if k.endswith("lora_A")}


ADALORA_RESUME_CODE = r"""
import json, os, tempfile
os.environ["DS_ACCELERATOR"] = "cpu"
from raylib.config import validate_job
from raylib.train_loop import PlainSession, run
raw = json.loads(os.environ["RAYLIB_TEST_JOB"])
job = validate_job(raw)
tmp = tempfile.mkdtemp()
straight = PlainSession(os.path.join(tmp, "a"))
out = run(job, straight)
mid = [r["checkpoint"] for r in straight.reports if r["step"] == 4][0]
resumed = PlainSession(os.path.join(tmp, "b"), resume_from=mid)
out2 = run(job, resumed)
pattern = lambda o: o["model"].peft_config["default"].rank_pattern
print(json.dumps({"straight": straight.reports[-1]["eval_loss"], "resumed": resumed.reports[-1]["eval_loss"],
                  "same_pattern": pattern(out) == pattern(out2),
                  "ranks": sum(sum(map(bool, v)) for v in pattern(out2).values())}))
"""


@pytest.mark.parametrize("backend", [
    {"name": "accelerate"},
    pytest.param({"name": "deepspeed", "zero_stage": 2}, marks=pytest.mark.slow),
])
def test_adalora_resume_mid_budget_is_exact(backend, tiny_model, demo_data, tmp_path, monkeypatch):
    """An 8-step AdaLoRA run resumed from its step-4 checkpoint, in the middle of the budget
    schedule, ends exactly where the straight run does: the checkpoint carries the rank
    allocator's importance averages and the rank pattern, not only the weights."""
    raw = job_dict(tiny_model, demo_data, "unused", backend=backend,
                   method={"name": "adalora", "init_r": 8, "target_r": 2, "tinit": 2, "tfinal": 2, "deltaT": 1,
                           "dropout": 0.0},
                   train={"max_steps": 8, "checkpoint_every": 4, "lr": 1e-2, "lr_scheduler": "constant"},
                   scaling={"num_workers": 1})
    monkeypatch.setenv("RAYLIB_TEST_JOB", json.dumps(raw))
    proc = run_python(ADALORA_RESUME_CODE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["same_pattern"] and res["ranks"] == 2 * 14, res
    assert res["resumed"] == pytest.approx(res["straight"], abs=1e-6), res


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adalora", "heads"])
def test_zero3_adalora_and_heads_two_workers(name, ray_session, tiny_model, demo_data, tmp_path):
    """The two methods that need more than the engine's own loop under ZeRO-3, on 2 Ray Train
    workers: AdaLoRA's allocator reads whole gradients and masks partitioned weights through
    collectives (both ranks must agree on the pattern), and heads cache the backbone's
    features before the engine exists (gathered from the partitions)."""
    from test_methods import method_job

    from raylib.synthetic import write_classification_dataset

    cls_data = write_classification_dataset(str(tmp_path / "cls"), n_train=400, n_eval=90)
    out = str(tmp_path / "run")
    job = validate_job(method_job(name, tiny_model, demo_data, cls_data, out, scaling={"num_workers": 2},
                                  backend={"name": "deepspeed", "zero_stage": 3}, train={"max_steps": 10}))
    result = launch.train(job, show_progress=False)
    m = result.metrics
    assert m["world_size"] == 2 and m["eval_loss"] < m["eval_loss_before"], m
    again = _rescore_any(job, result.expert_dir)
    assert again == pytest.approx(m["eval_loss"], abs=2e-4), (again, m["eval_loss"])
    if name == "adalora":
        assert sum(_adalora_ranks(result.expert_dir).values()) == job.method.target_r * 14
    else:
        assert m["eval_domain_accuracy"] > 0.4, m


@pytest.mark.parametrize("backend", [{"name": "accelerate"}, {"name": "deepspeed", "zero_stage": 3}])
def test_a_resolved_job_validates_again(backend, tiny_model, demo_data, tmp_path):
    """job.yaml and Tune trials carry the resolved job (every default spelled out): it must
    validate again as the same job."""
    job = validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "o"), backend=backend))
    assert validate_job(job.to_dict()).to_dict() == job.to_dict()


@pytest.mark.slow
def test_zero3_with_parameter_and_optimizer_offload_trains(tiny_model, demo_data, tmp_path, monkeypatch):
    """ZeRO-3 with parameters and optimizer state offloaded (here onto DeepSpeed's CPU
    accelerator, which only moves ownership; the same job runs unchanged on GPUs): the run
    learns, and its consolidated adapter rescores to the run's eval loss without DeepSpeed."""
    raw = job_dict(tiny_model, demo_data, str(tmp_path / "o"),
                   backend={"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": True},
                   method={"name": "lora", "r": 8, "dropout": 0.0}, train={"max_steps": 6, "checkpoint_every": 3},
                   scaling={"num_workers": 1})
    cfg = backends.deepspeed_config(validate_job(raw))["zero_optimization"]
    assert cfg["offload_param"]["device"] == "cpu" and cfg["offload_optimizer"]["device"] == "cpu"
    monkeypatch.setenv("RAYLIB_TEST_JOBS", json.dumps({"offload": raw}))
    proc = run_python(MATRIX_CODE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")][-1]
    res = json.loads(line[len("RESULTS "):])["offload"]
    assert res["after"] < res["before"] - 0.5, res
    assert _rescore(validate_job(raw), res["expert"]) == pytest.approx(res["after"], abs=2e-4)
