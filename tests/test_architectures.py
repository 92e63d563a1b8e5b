"""Every method on the architectures users bring: tiny random-weight models built from
transformers' own config classes (`raylib.tiny_models`: Llama, Qwen2, Qwen3, Mistral, Gemma2,
Phi-3, GPT-2, GPT-NeoX), loaded through the real `from_pretrained` path.

Each case runs the driver's preflight (what `raylib train` checks before Ray starts), then the
worker loop in-process (`PlainSession`), asserts the eval loss fell, and reloads the published
expert: with the method's own loader and, where the format is PEFT's or transformers', with
plain `PeftModel.from_pretrained` / `AutoModelForCausalLM.from_pretrained` (SVF: its merged
export); every reload must give the trained model's logits. `pytest -v` prints the table
(`test_method_on_architecture[phi3-ia3]`, ...).

The whole matrix (80 cases) is in the default suite: a case is about a second (2-layer models
of 64 wide, 6 steps, one torch thread), the matrix about a minute and a half on 2 cores.
Llama's matrix on a pretrained model, with stronger learning assertions, is `test_methods.py`.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import job_dict, run_cli, write_job

from raylib import launch, models
from raylib.config import validate_job
from raylib.errors import ConfigError
from raylib.methods import METHODS, get_method
from raylib.synthetic import CLASSIFICATION_TASKS, write_classification_dataset, write_jsonl
from raylib.tiny_models import FAMILIES, build_family
from raylib.train_loop import PlainSession, run

CACHE = os.environ.get("RAYLIB_TEST_CACHE", os.path.expanduser("~/.cache/raylib-tests"))
PEFT_FORMAT = ("lora", "qlora", "adalora", "ia3", "prefix", "ptuning", "prompt")

#: per method: options and learning rate for 6 steps on a random-weight model
SETTINGS: dict[str, dict] = {
    "full": {"method": {"name": "full"}, "lr": 1e-3},
    "lora": {"method": {"name": "lora", "r": 8, "dropout": 0.0}, "lr": 1e-2},
    "qlora": {"method": {"name": "qlora", "r": 8, "dropout": 0.0}, "lr": 1e-2},
    "adalora": {"method": {"name": "adalora", "init_r": 8, "target_r": 4, "tinit": 1, "tfinal": 2}, "lr": 5e-2},
    "ia3": {"method": {"name": "ia3"}, "lr": 5e-2},
    "prefix": {"method": {"name": "prefix", "num_virtual_tokens": 8}, "lr": 3e-2},
    "ptuning": {"method": {"name": "ptuning", "num_virtual_tokens": 8, "encoder_hidden_size": 64}, "lr": 1e-2},
    "prompt": {"method": {"name": "prompt", "num_virtual_tokens": 8}, "lr": 5e-2},
    "heads": {"method": {"name": "heads", "tasks": CLASSIFICATION_TASKS}, "lr": 5e-2},
    "svf": {"method": {"name": "svf", "targets": "all-linear"}, "lr": 2e-2},
}


def _matrix():
    for family in FAMILIES:
        for name in METHODS:
            yield pytest.param(family, name, id=f"{family}-{name}")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are too small for intra-op parallelism to pay, and on a shared 2-core
    machine its threads spin-wait for each other: measured under load 6, phi3-lora took 6.6 s
    with torch's 2 threads and 1.5 s with one (gemma2-lora: 85 s vs 1.6 s). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def family_model():
    """family -> the directory of its tiny model (built once per machine, like tiny_model)."""
    return lambda family: build_family(family, os.path.join(CACHE, f"arch-{family}"))


@pytest.fixture(scope="session")
def small_cls_data(tmp_path_factory) -> dict[str, str]:
    return write_classification_dataset(str(tmp_path_factory.mktemp("arch-cls")), n_train=160, n_eval=48)


def arch_job(family_dir: str, name: str, demo_data, cls_data, out: str, svf_cache: str) -> dict:
    s = SETTINGS[name]
    method = dict(s["method"], **({"cache_dir": svf_cache} if name == "svf" else {}))
    train = {"max_steps": 6, "checkpoint_every": 0, "lr": s["lr"]}
    if name == "heads":
        job = job_dict(family_dir, cls_data, out, method=method, train={"batch_size": 16, **train},
                       objective={"name": "classification"})
        job["data"]["max_length"] = 64
        return job
    return job_dict(family_dir, demo_data, out, method=method, train=train)


def probe(tokenizer, classification: bool) -> dict:
    enc = tokenizer(["What is 12 + 30?", "Reverse the word. lamp", "Which is larger: 7 or 41?"],
                    return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if classification:
        batch["task_ids"] = torch.tensor([0, 1, 0])
    return batch


def logits_of(model, batch) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        lg = model(**batch).logits
    return {k: v.float() for k, v in lg.items()} if isinstance(lg, dict) else {"lm": lg.float()}


def assert_same_logits(model, batch, expected: dict, what: str, tol: float = 1e-4) -> None:
    got = logits_of(model, batch)
    assert got.keys() == expected.keys(), what
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family,name", list(_matrix()))
def test_method_on_architecture(family, name, family_model, demo_data, small_cls_data, tmp_path):
    job = validate_job(arch_job(family_model(family), name, demo_data, small_cls_data, str(tmp_path / "out"),
                                str(tmp_path / "svf-cache")))
    launch.preflight(launch.resolve_paths(job), probe=False)  # the driver's checks pass: no refusal here
    session = PlainSession(str(tmp_path / "ckpt"))
    out = run(job, session)
    final = session.reports[-1]
    assert final["eval_loss"] < final["eval_loss_before"], final
    assert 0 < final["trainable_params"] <= final["total_params"]
    if name != "full":
        assert final["trainable_params"] < final["total_params"]

    expert = os.path.join(final["checkpoint"], "expert")
    assert json.load(open(os.path.join(expert, "expert.json")))["method"] == name
    batch = probe(models.load_tokenizer(job.model), name == "heads")
    trained = logits_of(out["model"], batch)
    method = get_method(name)
    # qlora: the same 4-bit base as in training; heads/svf: logits through their own modules
    assert_same_logits(method.load(models.load_model(job.model), expert), batch, trained, "the method's loader")
    if name in PEFT_FORMAT:
        from peft import PeftModel  # plain PEFT, no raylib code on the load path

        loaded = PeftModel.from_pretrained(models.load_model(job.model), expert)
        assert_same_logits(loaded, batch, trained, "PeftModel.from_pretrained")
    if name in ("full", "svf"):  # a plain transformers directory: the expert itself, or SVF's merge
        from transformers import AutoModelForCausalLM

        plain_dir = expert
        if name == "svf":  # folded into the weights, in the base's own layer types (GPT-2: Conv1D)
            plain_dir = str(tmp_path / "merged")
            method.merge(models.load_model(job.model), expert).save_pretrained(plain_dir)
        assert_same_logits(AutoModelForCausalLM.from_pretrained(plain_dir), batch, trained,
                           "AutoModelForCausalLM.from_pretrained", tol=2e-4)


# --------------------------------------------------------------------------- what the fixes do


def test_ia3_gets_raylibs_default_where_peft_has_none(family_model, demo_data):
    """Phi-3: PEFT 0.21 has no IA3 target default (its k and v sit in the fused qkv_proj) and
    raises inside the worker; raylib targets every decoder Linear, the MLP output scaled on its
    input. If PEFT gains a default, the first assert says this test no longer covers the gap."""
    from peft import IA3Config, get_peft_model

    path = family_model("phi3")
    job = validate_job(job_dict(path, demo_data, "o", method={"name": "ia3"}))
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        get_peft_model(models.load_model(job.model), IA3Config(task_type="CAUSAL_LM"))
    model = get_method("ia3").apply(models.load_model(job.model), job)
    cfg = model.peft_config["default"]
    assert set(cfg.target_modules) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    assert set(cfg.feedforward_modules) == {"mlp.down_proj"}
    scaled = {n.split(".layers.")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert "0.mlp.down_proj.ia3_l.default" in scaled and "1.self_attn.qkv_proj.ia3_l.default" in scaled
    assert not any("lm_head" in n for n in scaled)
    # a feedforward vector scales the input (in_features), the others the output
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.ia3_l.default"] == (1, 128)
    assert shapes["base_model.model.model.layers.0.self_attn.qkv_proj.ia3_l.default"] == (128, 1)


def test_svf_adapts_gpt2_conv1d_layers(family_model, tmp_path):
    """GPT-2's Conv1D stores W transposed (in, out): SVF decomposes W itself, starts as the base
    model exactly (z = 1), and merging gives Conv1D layers back with the adapted weight."""
    from transformers.pytorch_utils import Conv1D

    from raylib.methods import svf
    from raylib.methods.svf_layers import SVFLinear

    path = family_model("gpt2")
    model = models.load_model(validate_job(job_dict(path, {"train": "x", "eval": None}, "o")).model)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    svf.apply_svf(model, "all-linear", forward="rebuild", cache_dir=str(tmp_path))
    layers = svf.svf_modules(model)
    assert len(layers) == 8 and all(m.conv1d for m in layers.values())  # c_attn, c_proj, c_fc, mlp.c_proj x 2
    assert layers["transformer.h.0.attn.c_attn"].out_features == 192
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-4, rtol=1e-4)
        for m in layers.values():
            m.z.mul_(1.1)
        adapted = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3
    svf.merge(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D) and not svf.svf_modules(model)
    assert not any(isinstance(m, SVFLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- refused before Ray

REFUSED = [  # (family, job sections, error), named by their ids below
    ("gpt2", {"method": {"name": "lora", "target_modules": ["q_proj", "v_proj"]}},
     r"method.target_modules: \['q_proj', 'v_proj'\] name no module of this gpt2 model .*c_attn, c_proj, c_fc"),
    ("phi3", {"method": {"name": "heads", "tasks": CLASSIFICATION_TASKS, "lora": {"r": 4}},
              "objective": {"name": "classification"}},
     r"method.lora.target_modules: .* phi3 model .*qkv_proj"),
    ("phi3", {"method": {"name": "adalora", "target_modules": ["k_proj"], "tinit": 1, "tfinal": 1}},
     r"method.target_modules: \['k_proj'\]"),
    ("gpt2", {"method": {"name": "svf", "targets": ["q_proj"]}}, r"method.targets: .* gpt2 model"),
    ("phi3", {"method": {"name": "ia3", "target_modules": ["k_proj", "v_proj"]}}, r"method.target_modules"),
    ("gpt2", {"method": {"name": "prompt", "num_virtual_tokens": 8}, "data": {"max_length": 510}},
     r"data.max_length: 510 \+ 8 virtual tokens \(prompt\) exceeds the 512 learned position embeddings .*at most 504"),
    ("gpt2", {"method": {"name": "lora"}, "data": {"max_length": 1024}}, r"data.max_length: 1024 exceeds the 512"),
]


REFUSED_IDS = ["gpt2-lora-llama-targets", "phi3-heads-default-lora-targets", "phi3-adalora-unfused-targets",
               "gpt2-svf-llama-targets", "phi3-ia3-unfused-targets", "gpt2-prompt-past-positions",
               "gpt2-lora-past-positions"]


@pytest.mark.parametrize("family,override,message", REFUSED, ids=REFUSED_IDS)
def test_what_an_architecture_cannot_do_is_refused_before_ray(family, override, message, family_model, demo_data,
                                                             small_cls_data):
    data = small_cls_data if override.get("objective") else demo_data
    raw = job_dict(family_model(family), data, "o")
    for section, values in override.items():
        raw[section] = dict(values) if section == "method" else {**raw.get(section, {}), **values}
    job = validate_job(raw)  # the schema and the config-only checks accept it ...
    with pytest.raises(ConfigError, match=message):  # ... the model-aware preflight does not
        launch.preflight(launch.resolve_paths(job), probe=False)


# --------------------------------------------------------------------------- data that cannot train

NO_RAY = {"RAY_ADDRESS": "127.0.0.1:1"}  # had the CLI tried to reach Ray, it would fail otherwise


@pytest.mark.parametrize("too_long,command", [("drop", "validate"), ("truncate", "train")])
def test_no_example_fitting_max_length_exits_2_before_ray(too_long, command, tiny_model, tmp_path):
    """Every row longer than data.max_length (dropped), or with a prompt filling it (truncated
    to nothing to learn): the worker would stop in `prepare`; the driver says so first."""
    rows = [{"instruction": f"Repeat this long request number {i}. " * 12, "input": "", "output": "ok"}
            for i in range(20)]
    data = write_jsonl(rows, str(tmp_path / "long.jsonl"))
    job = job_dict(tiny_model, {"train": data, "eval": None}, str(tmp_path / "out"))
    job["data"].update(max_length=48, too_long=too_long)
    args = ["train", "--local"] if command == "train" else ["validate"]
    proc = run_cli(*args, write_job(tmp_path / "job.yaml", job), env=NO_RAY, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: data.max_length: no training example fits"), lines
    assert "raise data.max_length to at least" in lines[0]
    assert not os.path.exists(tmp_path / "out" / "checkpoints")
