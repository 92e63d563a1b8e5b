"""The FSDP2 backend (`backend: {name: fsdp}`): its config errors (fast, pure), real LoRA and
full fine-tuning runs in 2 Ray Train workers (sharded checkpoint of both ranks, a consolidated
expert that plain PEFT / transformers load and whose logits equal the sharded state's), exact
resume from the sharded state and agreement with DDP (2 torchrun processes), and the method
and option matrix (slow). On CPU, FSDP2 runs over gloo (raylib/backends.py says how)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import free_port, job_dict
from test_preference import pairs  # noqa: F401  (the preference pairs fixture)

from raylib import backends, launch
from raylib.config import validate_job
from raylib.errors import ConfigError
from raylib.methods import METHODS

STUB = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "method": {"name": "lora"}, "output": {"dir": "o"}}


def _stub(**sections) -> dict:
    job = json.loads(json.dumps(STUB))
    for k, v in sections.items():
        if k == "method":
            job["method"] = dict(v)
        else:
            job.setdefault(k, {}).update(v)
    return job


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("sections, field, text", [
    ({"backend": {"fsdp_cpu_offload": True}}, "backend.fsdp_cpu_offload", "set backend.name: fsdp"),
    ({"backend": {"name": "deepspeed", "fsdp_reshard_after_forward": False}}, "backend.fsdp_reshard_after_forward",
     "is an FSDP option"),
    ({"backend": {"name": "fsdp", "zero_stage": 3}}, "backend.zero_stage", "fsdp_reshard_after_forward"),
    ({"backend": {"name": "fsdp", "offload_optimizer": True}}, "backend.offload_optimizer", "fsdp_cpu_offload: true"),
    ({"backend": {"name": "fsdp", "offload_params": True}}, "backend.offload_params", "fsdp_cpu_offload: true"),
    ({"backend": {"name": "fsdp", "config": {"bf16": {"enabled": True}}}}, "backend.config", "DeepSpeed option"),
    ({"backend": {"name": "fsdp"}, "objective": {"name": "reinforce"}}, "backend.name", "backend.name: accelerate"),
    ({"backend": {"name": "fsdp"}, "train": {"optimizer": "adamw_8bit"}}, "train.optimizer",
     "set train.optimizer: adamw"),
    ({"backend": {"name": "fsdp"}, "method": {"name": "qlora"}}, "train.optimizer", "qlora's default optimizer"),
    ({"backend": {"name": "fsdp"}, "method": {"name": "adalora", "init_r": 8, "target_r": 2, "tinit": 2, "tfinal": 3},
      "train": {"max_steps": 20}}, "backend.name", "method 'adalora' cannot run under FSDP2"),
    ({"backend": {"name": "fsdpp"}}, "backend.name", "fsdp"),
])
def test_bad_fsdp_options_are_config_errors(sections, field, text):
    with pytest.raises(ConfigError) as err:
        validate_job(_stub(**sections))
    assert field in str(err.value) and text in str(err.value), str(err.value)


def test_fsdp_options_validate_and_a_resolved_job_validates_again(tiny_model, demo_data, tmp_path):
    raw = job_dict(tiny_model, demo_data, str(tmp_path / "o"),
                   backend={"name": "fsdp", "fsdp_cpu_offload": True, "fsdp_reshard_after_forward": False,
                            "mixed_precision": "bf16"},
                   method={"name": "qlora", "r": 8}, train={"optimizer": "adamw", "gradient_checkpointing": True})
    job = validate_job(raw)
    assert job.backend.fsdp_cpu_offload and not job.backend.fsdp_reshard_after_forward
    assert validate_job(job.to_dict()).to_dict() == job.to_dict()
    assert all(backends.fsdp_unsupported(m) is None for m in METHODS if m not in backends.FSDP_UNSUPPORTED)


# --------------------------------------------------------------------------- helpers


def _torchrun(code: str, tmp_path, env: dict, workers: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`code` in `workers` processes started by torchrun (one gloo process group, no Ray)."""
    script = tmp_path / "torchrun_script.py"
    script.write_text(code)
    for _ in range(3):  # the free port can be taken before torchrun binds it: try another
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={workers}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        if "EADDRINUSE" not in proc.stderr:
            break
    return proc


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _rescore(job, expert_dir: str) -> float:
    """Eval loss of a published expert loaded by its method's loader (PEFT methods: plain
    `PeftModel.from_pretrained`; full: `AutoModelForCausalLM`) in this FSDP-free process."""
    from raylib import models
    from raylib.objectives import loop_objective

    objective = loop_objective(job)
    tok = models.load_tokenizer(job.model)
    model = METHODS[job.method.name].load(models.load_model(job.model), expert_dir).eval()
    prepared = objective.prepare(job, tok, model, "cpu")
    return objective.evaluate(model, prepared.eval, objective.collator(job, tok), job.train.batch_size,
                              0, 1, "cpu", lambda t: t)["eval_loss"]


def _sharded_state(ckpt_dir: str, tmp_path) -> dict:
    """The trainable weights of a checkpoint's sharded FSDP state (both ranks' DCP shards),
    consolidated offline by torch's own converter (no process group, no raylib code)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    fsdp_dir = os.path.join(ckpt_dir, "train_state", "fsdp")
    shards = sorted(f for f in os.listdir(fsdp_dir) if f.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and os.path.isfile(os.path.join(fsdp_dir, ".metadata")), shards
    out = str(tmp_path / f"consolidated_{free_port()}.pt")
    dcp_to_torch_save(fsdp_dir, out)
    state = torch.load(out, weights_only=False)
    assert set(state) == {"model", "optimizer"}
    return state["model"]


IDS = [[1, 5, 9, 13, 17, 21, 25, 29, 33]]


# --------------------------------------------------------------------------- real runs (Ray Train)


def test_fsdp_lora_two_workers_consolidated(ray_session, tiny_model, demo_data, tmp_path):
    """LoRA under FSDP2 on 2 Ray Train workers: it learns; the checkpoint holds both ranks' DCP
    shards; the published adapter loads with plain PEFT, rescores to the run's eval loss, and
    its logits equal those of the adapter rebuilt from the sharded state."""
    import torch
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "run")
    job = validate_job(job_dict(tiny_model, demo_data, out, backend={"name": "fsdp"}, scaling={"num_workers": 2},
                                train={"max_steps": 6, "checkpoint_every": 3}))
    result = launch.train(job, show_progress=False)
    m = result.metrics
    assert m["world_size"] == 2 and m["eval_loss"] < m["eval_loss_before"] - 0.5, m
    assert _rescore(job, result.expert_dir) == pytest.approx(m["eval_loss"], abs=1e-4)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert os.path.isfile(os.path.join(out, name))

    sharded = _sharded_state(result.checkpoint_dir, tmp_path)
    assert sharded and all(".lora_" in k for k in sharded)  # frozen base weights are not in the checkpoint
    published = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    rebuilt = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), METHODS["lora"].peft_config(job)).eval()
    loaded = set_peft_model_state_dict(rebuilt, {k.replace(".default", ""): v for k, v in sharded.items()})
    assert not loaded.unexpected_keys
    ids = torch.tensor(IDS)
    with torch.no_grad():
        a, b = published(ids).logits, rebuilt(ids).logits
        assert torch.equal(a, b), (a - b).abs().max()
        with published.disable_adapter():
            assert (published(ids).logits - a).abs().max() > 1e-3  # the adapter is not a no-op


@pytest.mark.slow
def test_fsdp_full_finetune_two_workers_publishes_a_plain_model_then_resumes(ray_session, tiny_model, demo_data,
                                                                             tmp_path):
    """Full fine-tuning under FSDP2 on 2 Ray Train workers: every weight is sharded; the
    published expert is a plain transformers model (its own class in config.json, not FSDP's)
    whose logits equal the model rebuilt from the sharded checkpoint; a resumed run restores
    every rank's shards through Ray Train and continues."""
    import torch
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "run")
    job = validate_job(job_dict(tiny_model, demo_data, out, method={"name": "full"}, backend={"name": "fsdp"},
                                scaling={"num_workers": 2}, train={"max_steps": 6, "checkpoint_every": 6, "lr": 5e-4}))
    result = launch.train(job, show_progress=False)
    m = result.metrics
    assert m["world_size"] == 2 and m["eval_loss"] < m["eval_loss_before"] - 0.5, m
    assert m["trainable_params"] == m["total_params"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"], cfg["architectures"]
    assert _rescore(job, result.expert_dir) == pytest.approx(m["eval_loss"], abs=1e-4)

    sharded = _sharded_state(result.checkpoint_dir, tmp_path)
    published = AutoModelForCausalLM.from_pretrained(out).eval()
    rebuilt = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rebuilt.load_state_dict(sharded, strict=True)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        a, b = published(ids).logits, rebuilt(ids).logits
    assert torch.equal(a, b), (a - b).abs().max()
    with torch.no_grad():
        assert (a - AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits).abs().max() > 1e-3

    longer = job.model_copy(deep=True)
    longer.train.max_steps = 8
    result2 = launch.train(longer, resume=True, show_progress=False)
    events = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    start = [e for e in events if e["type"] == "start"][-1]
    assert start["step"] == 6 and start["resumed_from"], start
    assert result2.metrics["step"] == 8 and result2.metrics["eval_loss"] < m["eval_loss"]
    assert _rescore(longer, result2.expert_dir) == pytest.approx(result2.metrics["eval_loss"], abs=1e-4)


# --------------------------------------------------------------------------- exact resume, DDP agreement (torchrun)

RESUME_CODE = r"""
import json, os
import torch.distributed as dist
from raylib.config import validate_job
from raylib.train_loop import PlainSession, run
raw, root = json.loads(os.environ["RAYLIB_TEST_JOB"]), os.environ["RAYLIB_TEST_ROOT"]
def job(steps, out, backend="fsdp"):
    r = json.loads(json.dumps(raw)); r["train"]["max_steps"] = steps; r["output"]["dir"] = out
    r["backend"]["name"] = backend
    return validate_job(r)
# every rank's PlainSession copies its checkpoint files into the same directory (as Ray merges them)
straight = PlainSession(os.path.join(root, "a"))
out = run(job(4, os.path.join(root, "a")), straight)
first = PlainSession(os.path.join(root, "b"))
run(job(2, os.path.join(root, "b")), first)
resumed = PlainSession(os.path.join(root, "c"), resume_from=os.path.join(root, "b", "step_0000002"))
run(job(4, os.path.join(root, "c")), resumed)
ddp = PlainSession(os.path.join(root, "d"))
run(job(4, os.path.join(root, "d"), "accelerate"), ddp)
if dist.get_rank() == 0:
    print("RESULT " + json.dumps({
        "straight": straight.reports[-1]["eval_loss"], "resumed": resumed.reports[-1]["eval_loss"],
        "ddp": ddp.reports[-1]["eval_loss"], "before": straight.reports[-1]["eval_loss_before"],
        "world": straight.reports[-1]["world_size"], "resumed_steps": [r["step"] for r in resumed.reports],
        "fsdp_files": sorted(os.listdir(os.path.join(root, "b", "step_0000002", "train_state", "fsdp")))}))
"""


@pytest.mark.parametrize("method", [
    {"name": "lora", "r": 8, "dropout": 0.0},  # dropout RNG is not part of a checkpoint
    pytest.param({"name": "full"}, marks=pytest.mark.slow),
])
def test_fsdp_resume_is_exact_and_matches_ddp(method, tiny_model, demo_data, tmp_path):
    """On 2 processes: 2 steps + resume 2 == 4 straight steps (every rank's shards of the
    trainable weights and Adam moments, our scheduler, the data position), and FSDP2's
    sharded step gives the loss DDP (the accelerate backend) gives on the same batches."""
    raw = job_dict(tiny_model, demo_data, "unused", backend={"name": "fsdp"}, method=method,
                   scaling={"num_workers": 2},
                   train={"max_steps": 4, "checkpoint_every": 2, "lr_scheduler": "constant",
                          "lr": 3e-3 if method["name"] == "lora" else 5e-4})
    res = _result(_torchrun(RESUME_CODE, tmp_path, {"RAYLIB_TEST_JOB": json.dumps(raw),
                                                    "RAYLIB_TEST_ROOT": str(tmp_path / "runs")}))
    assert res["world"] == 2 and res["resumed_steps"] == [4], res
    assert res["fsdp_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"], res
    assert res["straight"] < res["before"] - 0.5, res
    assert res["resumed"] == pytest.approx(res["straight"], abs=1e-6), res
    assert res["ddp"] == pytest.approx(res["straight"], abs=1e-4), res


# --------------------------------------------------------------------------- method and option matrix (slow)

ONE_RUN_CODE = r"""
import json, os
import torch.distributed as dist
from raylib.config import validate_job
from raylib.train_loop import PlainSession, run
raw = json.loads(os.environ["RAYLIB_TEST_JOB"])
session = PlainSession(raw["output"]["dir"] + "-ckpt")
run(validate_job(raw), session)
if dist.get_rank() == 0:
    final = session.reports[-1]
    print("RESULT " + json.dumps({"before": final["eval_loss_before"], "after": final["eval_loss"],
                                  "world": final["world_size"], "precision": final["mixed_precision"],
                                  "expert": os.path.join(final["checkpoint"], "expert")}))
"""


def _matrix(jobs: dict[str, dict], tmp_path, tols: dict[str, float]) -> dict[str, str]:
    problems = {}
    for name, raw in jobs.items():
        proc = _torchrun(ONE_RUN_CODE, tmp_path, {"RAYLIB_TEST_JOB": json.dumps(raw)})
        if proc.returncode != 0:
            problems[name] = proc.stderr[-1500:]
            continue
        r = _result(proc)
        if r["world"] != 2 or not r["after"] < r["before"]:
            problems[name] = f"did not learn on 2 workers: {r}"
            continue
        again = _rescore(validate_job(raw), r["expert"])
        if abs(again - r["after"]) > tols.get(name, 2e-4):
            problems[name] = f"the reloaded expert scores {again:.6f}, the run ended at {r['after']:.6f}"
    return problems


@pytest.mark.slow
def test_every_method_on_fsdp(tiny_model, demo_data, cls_data, tmp_path):
    """Every registered method FSDP2 runs (the methods' matrix settings from test_methods.py),
    each on 2 processes: it learns, and its consolidated expert, loaded by the method's own
    loader without FSDP, gives the eval loss the run ended with. The rest fail up front."""
    from test_methods import SETTINGS, method_job

    jobs = {}
    for name in sorted(METHODS):
        raw = method_job(name, tiny_model, demo_data, cls_data, str(tmp_path / name),
                         backend={"name": "fsdp"}, scaling={"num_workers": 2},
                         train={"optimizer": "adamw"} if name == "qlora" else {})
        if backends.fsdp_unsupported(name):
            with pytest.raises(ConfigError, match=f"method '{name}' cannot run under FSDP2"):
                validate_job(raw)
            continue
        jobs[name] = raw
    assert set(SETTINGS) == set(METHODS) and len(jobs) == len(METHODS) - len(backends.FSDP_UNSUPPORTED)
    problems = _matrix(jobs, tmp_path, {"qlora": 1e-3})
    assert not problems, json.dumps(problems, indent=1)


@pytest.mark.slow
def test_fsdp_options_train(tiny_model, demo_data, tmp_path):
    """Mixed precision (bf16 with CPU offload, fp16 with a loss scaler), and keeping gathered
    parameters until backward with activation checkpointing each train LoRA on 2 processes,
    and the consolidated expert rescores to the run's loss. (Three runs, not one per option:
    CI time; full fine-tuning runs in the Ray test above.)"""
    cases = {
        "bf16_cpu_offload": ({"mixed_precision": "bf16", "fsdp_cpu_offload": True}, {}, "lora"),
        "fp16": ({"mixed_precision": "fp16"}, {}, "lora"),
        "no_reshard_checkpointing": ({"fsdp_reshard_after_forward": False}, {"gradient_checkpointing": True}, "lora"),
    }
    jobs = {}
    for name, (backend, train, method) in cases.items():
        m = {"name": "lora", "r": 8, "dropout": 0.0} if method == "lora" else {"name": "full"}
        jobs[name] = job_dict(tiny_model, demo_data, str(tmp_path / name), method=m, scaling={"num_workers": 2},
                              backend={"name": "fsdp", **backend},
                              train={"max_steps": 6, "checkpoint_every": 0, "lr": 3e-3 if method == "lora" else 5e-4,
                                     **train})
    # 16-bit runs compute in bf16/fp16; the expert is rescored in fp32
    problems = _matrix(jobs, tmp_path, {"bf16_cpu_offload": 2e-2, "fp16": 5e-3})
    assert not problems, json.dumps(problems, indent=1)


PREFERENCE_CODE = ONE_RUN_CODE.replace('"expert": os.path.join(final["checkpoint"], "expert")',
                                       '"final": {k: v for k, v in final.items() if isinstance(v, (int, float))}')


@pytest.mark.slow
@pytest.mark.parametrize("objective, method", [
    ("dpo", {"name": "lora", "r": 8, "dropout": 0.0}),
    ("dpo", {"name": "full"}),
    ("reward", {"name": "lora", "r": 8, "dropout": 0.0}),
])
def test_preference_objectives_on_fsdp(objective, method, tiny_model, pairs, tmp_path):
    """dpo with LoRA (the reference forward with adapters off runs through the sharded model in
    the step), dpo with full weights (reference log-probs precomputed before sharding), and a
    reward model (the score head trained as PEFT's module to save, sharded): each learns the
    held-out preferences on 2 processes."""
    from test_preference import _job, _learned

    lr = 1e-3 if method["name"] == "full" else 3e-3
    job = _job(tiny_model, pairs, str(tmp_path / "run"), objective, method=method, backend={"name": "fsdp"},
               scaling={"num_workers": 2}, train={"lr": lr, "max_steps": 12, "eval_every": 12})
    res = _result(_torchrun(PREFERENCE_CODE, tmp_path, {"RAYLIB_TEST_JOB": json.dumps(job.to_dict())}))
    assert res["world"] == 2 and res["final"]["step"] == 12, res
    _learned(res["final"])
