"""Every registered method on the Accelerate backend: it learns, and its output loads back.

The matrix is parametrized over the registry (`METHODS`): a new method without an entry in
`SETTINGS` fails `test_every_method_has_matrix_settings`, so it cannot be skipped silently.
The fast matrix runs the worker loop in-process (`PlainSession`, the same `train_loop.run`
Ray Train workers call); 2-worker Ray Train variants run for heads (fast) and adalora/prompt
(slow).
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from helpers import job_dict

from raylib import launch, models
from raylib.config import validate_job
from raylib.errors import ConfigError
from raylib.methods import METHODS, get_method
from raylib.synthetic import CLASSIFICATION_TASKS
from raylib.train_loop import PlainSession, run

HEADS = {"name": "heads", "tasks": CLASSIFICATION_TASKS}

#: per method: options, learning rate, steps (a job the tiny model learns from in a few steps)
SETTINGS: dict[str, dict] = {
    "full": {"method": {"name": "full"}, "lr": 5e-4},
    "lora": {"method": {"name": "lora", "r": 8, "dropout": 0.0}, "lr": 3e-3},
    "qlora": {"method": {"name": "qlora", "r": 8, "dropout": 0.0}, "lr": 3e-3},
    "adalora": {"method": {"name": "adalora", "init_r": 8, "target_r": 2, "tinit": 2, "tfinal": 3}, "lr": 1e-2},
    "ia3": {"method": {"name": "ia3"}, "lr": 3e-2},
    "prefix": {"method": {"name": "prefix", "num_virtual_tokens": 8}, "lr": 1e-2},
    "ptuning": {"method": {"name": "ptuning", "num_virtual_tokens": 8, "encoder_hidden_size": 64}, "lr": 1e-2},
    "prompt": {"method": {"name": "prompt", "num_virtual_tokens": 8, "init": "text",
                          "init_text": "Answer the request."}, "lr": 3e-2},
    "heads": {"method": HEADS, "lr": 5e-2, "classification": True},
    "svf": {"method": {"name": "svf", "targets": "mlp"}, "lr": 5e-3},
}


def method_job(name: str, tiny_model, demo_data, cls_data, out: str, **sections) -> dict:
    s = SETTINGS[name]
    train = {"max_steps": 8, "checkpoint_every": 0, "lr": s["lr"], **sections.pop("train", {})}
    method = dict(sections.pop("method", s["method"]))
    if s.get("classification"):
        job = job_dict(tiny_model, cls_data, out, method=method, train={"batch_size": 16, **train},
                       objective={"name": "classification"}, **sections)
        job["data"]["max_length"] = 64
        return job
    return job_dict(tiny_model, demo_data, out, method=method, train=train, **sections)


def probe_batch(tokenizer, classification: bool) -> dict:
    texts = ["What is 12 + 30?", "Reverse the word. lamp", "Which is larger: 7 or 41?"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if classification:
        batch["task_ids"] = torch.tensor([0, 1, 0])
    return batch


def logits_of(model, batch) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    lg = out.logits
    return {k: v.float() for k, v in lg.items()} if isinstance(lg, dict) else {"lm": lg.float()}


def test_every_method_has_matrix_settings():
    assert sorted(SETTINGS) == sorted(METHODS), "add the new method to SETTINGS in tests/test_methods.py"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_learns_and_its_output_reloads_to_the_same_logits(name, tiny_model, demo_data, cls_data, tmp_path):
    job = validate_job(method_job(name, tiny_model, demo_data, cls_data, str(tmp_path / "o")))
    session = PlainSession(str(tmp_path / "ckpt"))
    out = run(job, session)
    final = session.reports[-1]
    assert final["eval_loss"] < final["eval_loss_before"], final
    assert 0 < final["trainable_params"] <= final["total_params"]
    if name != "full":
        assert final["trainable_params"] < final["total_params"]
    start = session.events[0]
    assert start["trainable_params"] == final["trainable_params"] and start["total_params"] == final["total_params"]

    expert = os.path.join(final["checkpoint"], "expert")
    assert json.load(open(os.path.join(expert, "expert.json")))["method"] == name
    tok = models.load_tokenizer(job.model)
    batch = probe_batch(tok, SETTINGS[name].get("classification", False))
    trained = logits_of(out["model"], batch)

    base = models.load_model(job.model)  # same quantization as in training (qlora: 4-bit)
    if name in ("lora", "qlora", "adalora", "ia3", "prefix", "ptuning", "prompt"):
        from peft import PeftModel  # plain PEFT, no raylib code on the load path

        loaded = PeftModel.from_pretrained(base, expert)
    else:
        loaded = get_method(name).load(base, expert)
    again = logits_of(loaded, batch)
    assert trained.keys() == again.keys()
    for k in trained:
        torch.testing.assert_close(again[k], trained[k], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- adalora


def test_adalora_prunes_ranks_to_the_budget_and_keeps_orth_reg_in_the_loss(tiny_model, demo_data, cls_data, tmp_path):
    from safetensors.torch import load_file

    from raylib.objectives import sft

    job = validate_job(method_job("adalora", tiny_model, demo_data, cls_data, str(tmp_path / "o"),
                                  train={"max_steps": 10}))
    session = PlainSession(str(tmp_path / "ckpt"))
    out = run(job, session)
    model = out["model"]
    cfg = model.peft_config["default"]
    assert cfg.total_step == 10  # the run's step count reached PEFT
    pattern = cfg.rank_pattern
    assert pattern, "update_and_allocate never fixed a rank pattern"
    ranks = {k: sum(bool(x) for x in v) for k, v in pattern.items()}
    init_r, target_r = job.method.init_r, job.method.target_r
    assert len(ranks) == 14  # 7 linears x 2 layers
    assert sum(ranks.values()) == target_r * len(ranks) < init_r * len(ranks)  # pruned to the budget
    # the saved adapter is cut to those ranks, and its config carries the pattern
    expert = os.path.join(session.reports[-1]["checkpoint"], "expert")
    weights = load_file(os.path.join(expert, "adapter_model.safetensors"))
    saved = {k: v.shape[0] for k, v in weights.items() if k.endswith("lora_A")}
    assert len(saved) == len(ranks)
    assert sum(saved.values()) == target_r * len(ranks)
    assert json.load(open(os.path.join(expert, "adapter_config.json")))["rank_pattern"]
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # raylib's loader: no false PEFT alarm
        warnings.simplefilter("always")
        get_method("adalora").load(models.load_model(job.model), expert)
    assert not [w for w in caught if "rank_pattern keys" in str(w.message)]

    # the loss the loop optimises includes AdaLoRA's orthogonal regulariser
    tok = models.load_tokenizer(job.model)
    enc = tok(["What is 1 + 2?"], return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "labels": enc["input_ids"].clone()}
    model.train()
    with torch.no_grad():
        with_reg = sft.loss(model, batch).item()
        cfg.orth_reg_weight = 0.0
        without = sft.loss(model, batch).item()
    assert with_reg > without + 1e-4


def test_adalora_schedule_errors(tiny_model, demo_data, cls_data, tmp_path):
    with pytest.raises(ConfigError, match=r"method.tinit.*budgeting"):
        validate_job(method_job("adalora", tiny_model, demo_data, cls_data, "o",
                                method={**SETTINGS["adalora"]["method"], "tinit": 5, "tfinal": 3}))
    with pytest.raises(ConfigError, match=r"method.target_r"):
        validate_job(method_job("adalora", tiny_model, demo_data, cls_data, "o",
                                method={**SETTINGS["adalora"]["method"], "target_r": 16}))


# --------------------------------------------------------------------------- heads


def _heads_run(tiny_model, demo_data, cls_data, tmp_path, tag, **method):
    job = validate_job(method_job("heads", tiny_model, demo_data, cls_data, str(tmp_path / tag),
                                  method={**HEADS, **method}, train={"checkpoint_every": 4}))
    session = PlainSession(str(tmp_path / f"ckpt-{tag}"))
    return job, session, run(job, session)


def test_heads_freeze_one_task_while_the_other_trains(tiny_model, demo_data, cls_data, tmp_path):
    from safetensors.torch import load_file

    job, session, out = _heads_run(tiny_model, demo_data, cls_data, tmp_path, "frz", freeze_tasks=["operation"])
    first, last = (load_file(os.path.join(r["checkpoint"], "expert", "heads.safetensors")) for r in session.reports)
    frozen = [k for k in first if k.startswith("operation.")]
    trained = [k for k in first if k.startswith("domain.")]
    assert frozen and trained
    assert all(torch.equal(first[k], last[k]) for k in frozen)
    assert any(not torch.equal(first[k], last[k]) for k in trained)
    final = session.reports[-1]
    assert final["trainable_params"] == 64 * 3 + 3  # the domain head only
    assert final["eval_domain_accuracy"] > 0.5 and "eval_operation_macro_f1" in final


def test_heads_cached_features_train_exactly_like_the_full_forward(tiny_model, demo_data, cls_data, tmp_path):
    _, cached, _ = _heads_run(tiny_model, demo_data, cls_data, tmp_path, "c", cache_features=True)
    _, full, _ = _heads_run(tiny_model, demo_data, cls_data, tmp_path, "f", cache_features=False)
    a, b = cached.reports[-1], full.reports[-1]
    assert a["eval_loss"] < a["eval_loss_before"]
    for k in ("eval_loss_before", "eval_loss", "eval_accuracy", "eval_macro_f1"):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


def test_heads_with_lora_on_the_backbone(tiny_model, demo_data, cls_data, tmp_path):
    job, session, out = _heads_run(tiny_model, demo_data, cls_data, tmp_path, "lora",
                                   lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    final = session.reports[-1]
    assert final["eval_loss"] < final["eval_loss_before"]
    heads_only = 64 * 3 + 3 + 64 * 6 + 6
    # r=4 on q_proj (64 -> 64) and v_proj (64 -> 32, grouped KV) in both layers
    assert final["trainable_params"] == heads_only + 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    expert = os.path.join(final["checkpoint"], "expert")
    for f in ("heads.safetensors", "heads_config.json", "adapter_model.safetensors", "adapter_config.json"):
        assert os.path.isfile(os.path.join(expert, f)), f
    # LoRA changed the backbone: the adapter is not a no-op
    from safetensors.torch import load_file

    assert any(v.abs().sum() > 0 for k, v in load_file(os.path.join(expert, "adapter_model.safetensors")).items()
               if "lora_B" in k)


def test_heads_two_workers_on_ray_train(ray_session, tiny_model, demo_data, cls_data, tmp_path):
    out = str(tmp_path / "run")
    job = validate_job(method_job("heads", tiny_model, demo_data, cls_data, out, scaling={"num_workers": 2},
                                  train={"max_steps": 10}))
    result = launch.train(job, show_progress=False)
    m = result.metrics
    assert m["world_size"] == 2 and m["eval_loss"] < m["eval_loss_before"]
    assert m["eval_rows"] == 90  # every eval row counted once across the two workers
    assert 0 <= m["eval_macro_f1"] <= 1 and m["eval_domain_accuracy"] > 0.4
    base = models.load_model(job.model)
    clf = get_method("heads").load(base, out)
    assert clf.task_names == ["domain", "operation"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adalora", "prompt"])
def test_peft_methods_two_workers_on_ray_train(name, ray_session, tiny_model, demo_data, cls_data, tmp_path):
    out = str(tmp_path / "run")
    job = validate_job(method_job(name, tiny_model, demo_data, cls_data, out, scaling={"num_workers": 2},
                                  train={"max_steps": 10}))
    result = launch.train(job, show_progress=False)
    assert result.metrics["world_size"] == 2
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    if name == "adalora":  # both workers allocated the same ranks (DDP-averaged gradients)
        assert cfg["rank_pattern"] and cfg["total_step"] == 10
    assert glob.glob(os.path.join(out, "adapter_model.safetensors"))


# --------------------------------------------------------------------------- common options


@pytest.mark.parametrize("name,opts", [
    ("adalora", {"layers_to_transform": [1], "target_modules": "all-linear"}),
    ("ia3", {"layers_to_transform": [1], "target_modules": ["k_proj", "v_proj", "down_proj"],
             "feedforward_modules": ["down_proj"]}),
    ("lora", {"layers_to_transform": [1], "target_modules": ["q_proj", "v_proj"]}),
])
def test_layers_to_transform_limits_adapters_to_those_layers(name, opts, tiny_model, demo_data, cls_data):
    job = validate_job(method_job(name, tiny_model, demo_data, cls_data, "o", method={**SETTINGS[name]["method"], **opts}))
    model = get_method(name).apply(models.load_model(job.model), job)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable), trainable[:4]
    assert not any("lm_head" in n for n in trainable)


@pytest.mark.parametrize("name", ["adalora", "ia3", "prompt", "heads"])
def test_gradient_checkpointing_and_bf16(name, tiny_model, demo_data, cls_data, tmp_path):
    raw = method_job(name, tiny_model, demo_data, cls_data, str(tmp_path / "o"),
                     train={"max_steps": 3, "gradient_checkpointing": True, "lr": 1e-2})
    if name == "adalora":  # a 3-step schedule: 1 warm-up step, 1 budgeting step, 1 final
        raw["method"].update(tinit=1, tfinal=1)
    raw["model"]["dtype"] = "bf16"
    job = validate_job(raw)
    session = PlainSession(str(tmp_path / "ckpt"))
    out = run(job, session)
    assert out["step"] == 3 and session.reports[-1]["eval_loss"] == session.reports[-1]["eval_loss"]  # not NaN
    assert any(p.dtype == torch.bfloat16 for p in out["model"].parameters())


def test_modules_to_save_trains_a_full_copy(tiny_model, demo_data, cls_data):
    job = validate_job(method_job("ia3", tiny_model, demo_data, cls_data, "o",
                                  method={"name": "ia3", "modules_to_save": ["lm_head"]}))
    model = get_method("ia3").apply(models.load_model(job.model), job)
    assert any("modules_to_save" in n and "lm_head" in n for n, p in model.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------- config errors

ERRORS = [
    ({"method": {"name": "prefix", "target_modules": ["q_proj"]}}, r"method.target_modules: prefix learns virtual tokens"),
    ({"method": {"name": "ptuning", "target_modules": "all-linear"}}, r"method.target_modules"),
    ({"method": {"name": "prompt"}, "data": {"packing": True}}, r"data.packing: prompt cannot train on packed"),
    ({"method": {"name": "prompt", "init": "text"}}, r"method.init_text"),
    ({"method": {"name": "prompt", "init_text": "hi"}}, r"method.init_text: init_text is only used with init: text"),
    ({"method": {"name": "full"}, "model": {"quantization": "nf4"}}, r"model.quantization: full fine-tuning cannot"),
    ({"method": {"name": "qlora"}, "model": {"quantization": "int8"}}, r"model.quantization: qlora trains over a 4-bit"),
    ({"method": {"name": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}},
     r"method.feedforward_modules"),
    ({"method": {"name": "ia3", "layers_to_transform": [0]}}, r"method.layers_to_transform"),
    ({"method": {"name": "ptuning", "encoder_reparameterization_type": "GRU"}}, r"method.encoder_reparameterization_type"),
    ({"method": HEADS}, r"objective.name: method heads trains classification heads"),
    ({"method": {"name": "lora"}, "objective": {"name": "classification"}}, r"objective.labels: a sequence classifier trained by .lora. needs its classes"),
    ({"method": {**HEADS, "freeze_tasks": ["topic"]}, "objective": {"name": "classification"}}, r"method.freeze_tasks"),
    ({"method": {**HEADS, "freeze_tasks": ["domain", "operation"]}, "objective": {"name": "classification"}},
     r"nothing would train"),
    ({"method": {**HEADS, "cache_features": True, "lora": {"r": 4}}, "objective": {"name": "classification"}},
     r"method.cache_features"),
    ({"method": {"name": "heads", "tasks": {"a": ["x"]}}, "objective": {"name": "classification"}},
     r"at least 2 distinct labels"),
    ({"method": SETTINGS["adalora"]["method"], "objective": {"name": "reinforce"}}, r"method.name: adalora is not wired"),
]


@pytest.mark.parametrize("override,message", ERRORS)
def test_invalid_combinations_are_config_errors(override, message, tiny_model, demo_data):
    raw = job_dict(tiny_model, demo_data, "o")
    for section, values in override.items():
        raw[section] = dict(values) if section == "method" else {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        validate_job(raw)


def test_prompt_learning_turns_packing_off_by_default(tiny_model, demo_data):
    job = validate_job(job_dict(tiny_model, demo_data, "o", method={"name": "prefix"}))
    assert job.data.packing is False
    assert validate_job(job_dict(tiny_model, demo_data, "o")).data.packing is True  # lora still packs


def test_heads_data_without_labels_or_tasks_fails_before_ray(tiny_model, demo_data, cls_data, tmp_path):
    from raylib.synthetic import write_jsonl

    no_label = write_jsonl([{"text": "What is 1 + 2?", "task": "domain"}], str(tmp_path / "nl.jsonl"))
    no_task = write_jsonl([{"text": "What is 1 + 2?", "label": "add"}], str(tmp_path / "nt.jsonl"))
    bad = write_jsonl([{"text": "x", "task": "domain", "label": "poetry"}], str(tmp_path / "bad.jsonl"))
    for path, message in [(no_label, r"data.fields.label: .* has no 'label' column"),
                          (no_task, r"data.fields.task: method.tasks has 2 tasks"),
                          (bad, r"data.train: .* no usable classification rows \(1x label not in method.tasks.domain")]:
        job = validate_job(method_job("heads", tiny_model, demo_data, {"train": path, "eval": None},
                                      str(tmp_path / "o")))
        with pytest.raises(ConfigError, match=message):
            launch.preflight(launch.resolve_paths(job))
    one_task = write_jsonl([{"text": "What is 1 + 2?", "label": "add"}] * 4, str(tmp_path / "one.jsonl"))
    job = validate_job(method_job("heads", tiny_model, demo_data, {"train": one_task, "eval": None}, str(tmp_path / "o"),
                                  method={"name": "heads", "tasks": {"operation": CLASSIFICATION_TASKS["operation"]}}))
    assert launch.preflight(launch.resolve_paths(job)).rows == 4  # a single task needs no task column


def test_per_task_prompt_tuning_recipe_is_config_only():
    """Seed 002's per-task prompt tuning: one example job per task, no code."""
    from raylib.config import load_job

    jobs = [load_job(p) for p in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "jobs", "examples",
                                                                "prompt-task-*.yaml")))]
    assert len(jobs) == 2
    assert {j.method.name for j in jobs} == {"prompt"} and all(j.method.init == "text" for j in jobs)
    assert len({j.data.train for j in jobs}) == 2 and len({j.output.dir for j in jobs}) == 2
    assert len({j.model.path for j in jobs}) == 1  # one frozen base shared by the tasks


def test_full_fine_tuning_keeps_fp32_weights_under_auto_dtype():
    """bf16 weights updated by AdamW drop every update below bf16's precision (on an H200,
    30 full fine-tuning steps: eval 3.36 with bf16 weights vs 2.22 with fp32 masters), so a
    method that trains the base weights loads them in fp32 and gets bf16 from autocast; the
    frozen base of an adapter method still loads in bf16 on a bf16 GPU; an explicit dtype wins."""
    from raylib.models import resolve_dtype

    assert get_method("full").trains_base_weights
    assert not any(get_method(n).trains_base_weights for n in METHODS if n != "full")
    assert resolve_dtype("auto", "cuda", trains_weights=True) == torch.float32  # asks no GPU
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cuda", trains_weights=True) == torch.bfloat16


@pytest.mark.parametrize("precision, dtype", [("fp16", "auto"), ("bf16", "auto"), ("fp16", "fp16")])
def test_mixed_precision_runs_one_after_another_in_one_process(precision, dtype, tiny_model, demo_data, cls_data,
                                                               tmp_path):
    """fp16 / bf16 autocast (and fp16 weights) learn, the run reports the precision it used,
    and runs with different precisions follow each other in one process (Accelerate's
    process-wide state is reset per run)."""
    raw = method_job("lora", tiny_model, demo_data, cls_data, str(tmp_path / "o"), train={"max_steps": 6},
                     backend={"mixed_precision": precision})
    raw["model"]["dtype"] = dtype
    session = PlainSession(str(tmp_path / "ckpt"))
    run(validate_job(raw), session)
    final = session.reports[-1]
    assert final["mixed_precision"] == precision and final["device"] == "cpu"
    assert final["eval_loss"] < final["eval_loss_before"] - 0.5, final
