"""Preference objectives (dpo, orpo, simpo, kto) in the shared worker loop: they learn held-out
preferences with every kind of method (adapters, SVF z-vectors, full weights, prompt
learning), resume exactly, run as Ray Train jobs, and refuse bad input before Ray starts."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import job_dict, run_cli, run_python, write_job
from safetensors.torch import load_file

from raylib import launch
from raylib.config import validate_job
from raylib.errors import ConfigError, DataError
from raylib.synthetic import make_rows, write_jsonl
from raylib.train_loop import PlainSession, run


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, str]:
    """Chosen: the answer. Rejected: the answer stuttered three times (a degenerate repeat, the
    preference a tiny base can learn in a few steps and carry to prompts it never saw)."""
    d = tmp_path_factory.mktemp("pairs")

    def rows(n, seed):
        return [{**r, "chosen": r["output"], "rejected": " ".join([r["output"]] * 3)} for r in make_rows(n, seed=seed)]

    return {"train": write_jsonl(rows(300, 0), str(d / "train.jsonl")),
            "eval": write_jsonl(rows(48, 10_000), str(d / "eval.jsonl"))}


def _job(tiny_model, data, out, objective="dpo", method=None, template=None, **sections):
    train = {"lr": 3e-3, "max_steps": 16, "batch_size": 8, "checkpoint_every": 0, "eval_every": 16,
             **sections.pop("train", {})}
    job = job_dict(tiny_model, data, out, method=method or {"name": "lora", "r": 8, "dropout": 0.0},
                   objective={"name": objective} if isinstance(objective, str) else objective, train=train, **sections)
    if template:
        job["data"]["template"] = template
    return validate_job(job)


def _learned(report: dict) -> None:
    """Held-out pairs: the chosen answer's reward now beats the rejected one's, by a margin."""
    assert report["eval_reward_accuracy"] >= 0.8, report
    assert report["eval_reward_accuracy"] > report["eval_reward_accuracy_before"] + 0.2, report
    # rewards are β-scaled (dpo/kto: β·(π − ref); simpo/orpo: β·mean token log-prob)
    assert report["eval_reward_margin"] > max(report["eval_reward_margin_before"], 0.0), report
    assert report["eval_loss"] < report["eval_loss_before"], report


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo", "kto", {"name": "dpo", "loss_type": "ipo"}])
def test_each_preference_objective_learns_held_out_preferences(objective, tiny_model, pairs, tmp_path):
    session = PlainSession(str(tmp_path / "ck"))
    run(_job(tiny_model, pairs, str(tmp_path / "o"), objective), session)
    _learned(session.reports[-1])


def test_dpo_reference_is_the_frozen_base(tiny_model, pairs, tmp_path):
    """Before any step the policy is the base, so DPO's rewards (policy − reference) are exactly 0."""
    session = PlainSession(str(tmp_path / "ck"))
    run(_job(tiny_model, pairs, str(tmp_path / "o"), train={"max_steps": 2, "eval_every": 2}), session)
    report = session.reports[-1]
    assert report["eval_reward_margin_before"] == 0.0 and report["eval_reward_accuracy_before"] == 0.0
    assert report["eval_loss_before"] == pytest.approx(0.6931, abs=1e-4)  # −log σ(0)


@pytest.mark.parametrize("method", [
    {"name": "svf"},
    {"name": "full"},
    {"name": "prompt", "num_virtual_tokens": 8},
    {"name": "prefix", "num_virtual_tokens": 8},
    {"name": "ptuning", "num_virtual_tokens": 8, "encoder_hidden_size": 64},
    {"name": "ia3"},
    {"name": "qlora", "r": 8},
    {"name": "adalora", "init_r": 12, "target_r": 4, "tinit": 2, "tfinal": 4},
])
def test_dpo_trains_every_kind_of_method(method, tiny_model, pairs, tmp_path):
    """SVF (only z trains; reference z = 1), full weights (reference log-probs precomputed from
    the base before step 1), prompt learning (virtual tokens in front of the logits; the
    reference is PEFT's adapter-disabled model), IA3, QLoRA (4-bit base), AdaLoRA."""
    lr = {"svf": 2e-2, "full": 1e-3, "prompt": 3e-2, "prefix": 3e-2, "ptuning": 1e-2, "ia3": 3e-2, "qlora": 3e-3,
          "adalora": 1e-2}[method["name"]]
    session = PlainSession(str(tmp_path / "ck"))
    run(_job(tiny_model, pairs, str(tmp_path / "o"), method=method, train={"lr": lr, "max_steps": 24,
                                                                            "eval_every": 24}), session)
    report = session.reports[-1]
    _learned(report)
    if method["name"] == "svf":
        z = load_file(os.path.join(report["checkpoint"], "expert", "svf_z.safetensors"))
        assert sum(t.numel() for t in z.values()) == report["trainable_params"]


def test_dpo_resume_matches_an_uninterrupted_run(tiny_model, pairs, tmp_path):
    job = _job(tiny_model, pairs, str(tmp_path / "o"), train={"max_steps": 6, "checkpoint_every": 3})
    full = PlainSession(str(tmp_path / "full"))
    run(job, full)
    resumed = PlainSession(str(tmp_path / "resumed"), resume_from=full.reports[0]["checkpoint"])
    run(job, resumed)
    assert [e["step"] for e in resumed.events if e["type"] == "step"] == [4, 5, 6]
    a = load_file(os.path.join(full.reports[-1]["checkpoint"], "expert", "adapter_model.safetensors"))
    b = load_file(os.path.join(resumed.reports[-1]["checkpoint"], "expert", "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_chat_pairs_and_kto_rows(tiny_model, tmp_path):
    """`prompt` as chat messages and `chosen`/`rejected` as assistant turns (template chat);
    KTO's own unpaired {prompt, completion, label} rows."""
    from raylib import models
    from raylib.objectives.preference import encode

    rows = make_rows(200, seed=3)
    chat = [{"prompt": [{"role": "user", "content": r["instruction"] + " " + r["input"]}],
             "chosen": [{"role": "assistant", "content": r["output"]}],
             "rejected": " ".join([r["output"]] * 3)} for r in rows]
    data = {"train": write_jsonl(chat[:160], str(tmp_path / "c_train.jsonl")),
            "eval": write_jsonl(chat[160:], str(tmp_path / "c_eval.jsonl"))}
    job = _job(tiny_model, data, str(tmp_path / "o"), template="chat")
    tok = models.load_tokenizer(job.model)
    (item,) = encode(chat[:1], job, tok)
    sft_prompt = tok.apply_chat_template(chat[0]["prompt"], tokenize=True, add_generation_prompt=True)
    sft_prompt = sft_prompt["input_ids"] if hasattr(sft_prompt, "keys") else sft_prompt
    assert item["prompt"] == list(sft_prompt) and tok.decode(item["chosen"]).startswith(rows[0]["output"])
    session = PlainSession(str(tmp_path / "ck"))
    run(job, session)
    _learned(session.reports[-1])

    kto_rows = [{"prompt": r["instruction"] + " " + r["input"], "completion": c, "label": good}
                for r in rows for c, good in ((r["output"], True), (" ".join([r["output"]] * 3), False))]
    data = {"train": write_jsonl(kto_rows[:320], str(tmp_path / "k_train.jsonl")),
            "eval": write_jsonl(kto_rows[320:], str(tmp_path / "k_eval.jsonl"))}
    session = PlainSession(str(tmp_path / "ck2"))
    run(_job(tiny_model, data, str(tmp_path / "o2"), "kto"), session)
    _learned(session.reports[-1])


def test_two_worker_dpo_ray_job_publishes_a_peft_expert(ray_session, tiny_model, pairs, tmp_path):
    out = str(tmp_path / "run")
    job = _job(tiny_model, pairs, out, scaling={"num_workers": 2}, train={"max_steps": 12, "checkpoint_every": 6,
                                                                          "eval_every": 6})
    result = launch.train(job, show_progress=False)
    m = result.metrics
    assert m["world_size"] == 2 and m["step"] == 12
    _learned(m)
    info = json.load(open(os.path.join(out, "expert.json")))
    assert info["config"]["objective"]["name"] == "dpo" and info["metrics"]["eval_reward_accuracy"] >= 0.8
    evals = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"eval"' in line]
    assert [e["step"] for e in evals if e["type"] == "eval"] == [6, 12]
    # plain peft loads it, and it prefers the chosen answer over the stutter
    proc = run_python(f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
from raylib.data import ALPACA
tok = AutoTokenizer.from_pretrained({out!r})
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({tiny_model!r}), {out!r}).eval()
prompt = tok(ALPACA.prompt("What is 12 + 30?")).input_ids
def logp(answer):
    ids = prompt + tok(answer + ALPACA.end, add_special_tokens=False).input_ids
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    return sum(lp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids)))
print(logp("42") - logp("42 42 42"))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) > 1.0


def test_bad_preference_input_is_refused_before_ray(tiny_model, demo_data, pairs, tmp_path):
    # SFT rows (no chosen/rejected) for dpo: a DataError naming the columns, before any worker
    job = _job(tiny_model, demo_data, str(tmp_path / "a"))
    with pytest.raises(DataError) as err:
        launch.preflight(job)
    assert err.value.field == "data.train" and "'chosen'" in str(err.value) and "data.fields" in str(err.value)
    # a classification-heads method cannot be preference-tuned
    with pytest.raises(ConfigError) as err:
        _job(tiny_model, pairs, str(tmp_path / "b"), method={"name": "heads", "tasks": {"t": ["a", "b"]}})
    assert err.value.field in ("method.name", "objective.name") and "dpo" in str(err.value)
    # full fine-tuning under ZeRO-3: no whole base exists before the engine to take references from
    with pytest.raises(ConfigError) as err:
        _job(tiny_model, pairs, str(tmp_path / "c"), method={"name": "full"},
             backend={"name": "deepspeed", "zero_stage": 3})
    assert err.value.field == "backend.zero_stage"
    # unknown option: a schema error naming it
    with pytest.raises(ConfigError) as err:
        _job(tiny_model, pairs, str(tmp_path / "d"), {"name": "dpo", "betta": 0.2})
    assert "betta" in str(err.value)
    # the CLI: exit 2 and one error line
    path = write_job(tmp_path / "job.yaml", job_dict(tiny_model, demo_data, str(tmp_path / "e"),
                                                     objective={"name": "kto"}))
    proc = run_cli("train", path, "--local")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.train")


@pytest.mark.parametrize("objective, method, stage", [
    ("dpo", {"name": "lora", "r": 8, "dropout": 0.0}, 3),
    ("dpo", {"name": "full"}, 2),
    ("reward", {"name": "lora", "r": 8, "dropout": 0.0}, 3),
])
def test_preference_objectives_on_deepspeed_two_workers(objective, method, stage, ray_session, tiny_model, pairs,
                                                        tmp_path):
    """ZeRO-3 with LoRA: the reference forward (adapters off) runs over partitioned weights in
    the step; ZeRO-2 with full weights: reference log-probs precomputed before the engine;
    a reward model's score head trains as PEFT's module to save, partitioned by ZeRO-3."""
    out = str(tmp_path / "run")
    lr = 1e-3 if method["name"] == "full" else 3e-3
    job = _job(tiny_model, pairs, out, objective, method=method, backend={"name": "deepspeed", "zero_stage": stage},
               scaling={"num_workers": 2}, train={"lr": lr, "max_steps": 12, "eval_every": 12})
    result = launch.train(job, show_progress=False)
    assert result.metrics["world_size"] == 2
    _learned(result.metrics)


@pytest.mark.slow
@pytest.mark.parametrize("method, lr", [({"name": "lora"}, 1e-3), ({"name": "svf"}, 5e-2)])
def test_dpo_unlearns_the_instruct_bases_swapped_answers(method, lr, instruct_tiny_model, tmp_path):
    """The instruct base answers half its template prompts with the domain's other operation
    (reverse <-> uppercase, larger <-> smaller, + <-> -). `raylib synth --pairs --held-out`
    pairs the right answer (chosen) with that mistake (rejected); on prompts training never
    asked, DPO's implicit reward then prefers the right answer. The base prefers neither (its
    template ignores the instruction), so this takes 150 steps; SVF at lr 0.1 over-fits them
    (held-out accuracy 0.56 on AVX-512), at 0.05 it reaches 0.66 (LoRA 0.77)."""
    from raylib.synthetic import write_dataset

    data = write_dataset(str(tmp_path / "data"), 1200, 90, pairs=True, held_out=True)
    session = PlainSession(str(tmp_path / "ck"))
    run(_job(instruct_tiny_model, data, str(tmp_path / "o"), method=method,
             train={"lr": lr, "max_steps": 150, "batch_size": 16, "eval_every": 150, "lr_scheduler": "constant"}), session)
    report = session.reports[-1]
    print({k: report[k] for k in ("eval_reward_accuracy", "eval_reward_margin", "eval_loss", "eval_loss_before")})
    assert report["eval_reward_accuracy"] >= 0.6, report
    assert report["eval_reward_margin"] > 0.1, report
    assert report["eval_loss"] < report["eval_loss_before"] - 0.03, report


@pytest.mark.slow
def test_the_dpo_example_as_a_user_runs_it(instruct_tiny_model, tmp_path):
    """jobs/examples/dpo.yaml through the CLI, in a directory laid out as its comments say."""
    root = os.path.join(os.path.dirname(__file__), "..")
    os.makedirs(tmp_path / "models")
    os.symlink(instruct_tiny_model, tmp_path / "models" / "tiny-llama-instruct")
    proc = run_cli("synth", "data/pairs", "--pairs", "--held-out", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", os.path.join(root, "jobs", "examples", "dpo.yaml"), "--local", "--quiet",
                   cwd=str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.load(open(tmp_path / "runs" / "dpo-lora" / "expert.json"))
    m = info["metrics"]
    assert m["eval_reward_accuracy"] >= 0.6 and m["eval_reward_margin"] > 0.1, m


# --------------------------------------------------------------------------- reward models


def _reward_model(tiny_model, pairs, out, method=None, steps=20):
    lr = 1e-3 if (method or {}).get("name") == "full" else 3e-3
    session = PlainSession(out + "-ck")
    job = _job(tiny_model, pairs, out, "reward", method=method, train={"lr": lr, "max_steps": steps, "eval_every": steps})
    run(job, session)
    return session.reports[-1]


@pytest.mark.parametrize("method", [{"name": "lora", "r": 8, "dropout": 0.0}, {"name": "full"}])
def test_reward_model_learns_and_loads_with_plain_transformers(method, tiny_model, pairs, tmp_path):
    """A scalar head on the backbone (AutoModelForSequenceClassification, one label), Bradley-
    Terry on the pairs: held-out accuracy rises; the expert loads without raylib and scores a
    prompt it never saw the way the run's eval did."""
    report = _reward_model(tiny_model, pairs, str(tmp_path / "rm"), method)
    _learned(report)
    expert = os.path.join(report["checkpoint"], "expert")
    load = (f"AutoModelForSequenceClassification.from_pretrained({expert!r}, num_labels=1)" if method["name"] == "full"
            else f"PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained({tiny_model!r}, "
                 f"num_labels=1, pad_token_id=tok.pad_token_id), {expert!r})")
    proc = run_python(f"""
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel
from raylib.data import ALPACA
tok = AutoTokenizer.from_pretrained({expert!r})
model = {load}.eval()
def score(answer):
    ids = tok(ALPACA.prompt("What is 17 + 20?")).input_ids + tok(answer + ALPACA.end, add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(torch.tensor([ids + [tok.eos_token_id]])).logits[0, 0].item()
print(score("37") - score("37 37 37"))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) > 1.0
    # a serve config cannot name it as a generating expert
    from raylib.serve.config import validate_serve_config

    with pytest.raises(ConfigError) as err:
        validate_serve_config({"base_model": tiny_model, "experts": {"rm": expert},
                               "router": {"strategy": "keywords", "keywords": {"rm": ["+"]}}})
    assert err.value.field == "experts.rm.path" and "reward model" in str(err.value)
    if method["name"] == "lora":  # `raylib export --merge`: one plain reward model, the same scores
        from raylib.export import merge_expert
        from raylib.objectives.preference import RewardModelScorer

        merged = merge_expert(expert, str(tmp_path / "merged"))
        rows = [{"instruction": "What is 17 + 20?"}] * 2
        a = RewardModelScorer(expert).score_batch(["37", "37 37 37"], rows)
        b = RewardModelScorer(merged).score_batch(["37", "37 37 37"], rows)
        assert a == pytest.approx(b, abs=1e-4) and a[0] > a[1]


def test_a_reward_model_is_the_reward_of_an_rl_run(tiny_model, pairs, tmp_path):
    """`reward: model:<dir>`: REINFORCE on the base raises the mean score the trained reward
    model gives its greedy answers on held-out prompts."""
    from raylib.objectives import rewards, rl

    report = _reward_model(tiny_model, pairs, str(tmp_path / "rm"))
    expert = os.path.join(report["checkpoint"], "expert")
    scorer = rewards.resolve(f"model:{expert}")
    good, bad = rewards.score(scorer, "rm", ["52", "52 52 52"], [{"instruction": "Which is larger: 37 or 52?"}] * 2)
    assert good > bad
    job = validate_job(job_dict(
        tiny_model, pairs, str(tmp_path / "rl"), method={"name": "lora", "r": 8, "dropout": 0.0},
        objective={"name": "reinforce", "reward": f"model:{expert}", "num_samples": 4, "max_new_tokens": 8,
                   "kl_coef": 0.01, "eval_rows": 32},
        train={"lr": 3e-3, "max_steps": 8, "batch_size": 8, "checkpoint_every": 0, "eval_every": 8,
               "lr_scheduler": "constant"}))
    out = rl.run(job, PlainSession(str(tmp_path / "rl-ck")))
    history = out["state"].history
    assert history[-1]["eval_reward"] > out["state"].eval_before["eval_reward"] + 0.5, history


def test_grpo_takes_a_reward_model_as_its_reward(tiny_model, pairs, tmp_path):
    """`reward: model:<dir>` in TRL's GRPOTrainer: the trained reward expert scores the group's
    completions (real-valued scores, not a 0/1 rule), the adapter trains and checkpoints."""
    from raylib.objectives import rl

    report = _reward_model(tiny_model, pairs, str(tmp_path / "rm"))
    expert = os.path.join(report["checkpoint"], "expert")
    job = validate_job(job_dict(
        tiny_model, pairs, str(tmp_path / "grpo"), method={"name": "lora", "r": 8, "dropout": 0.0},
        objective={"name": "grpo", "reward": f"model:{expert}", "num_samples": 4, "max_new_tokens": 6},
        train={"lr": 3e-3, "max_steps": 2, "batch_size": 4, "checkpoint_every": 1, "lr_scheduler": "constant"}))
    session = PlainSession(str(tmp_path / "grpo-ck"))
    rl.run(job, session)
    assert [r["step"] for r in session.reports] == [1, 2]
    rewards = [r["reward"] for r in session.reports]
    assert all(math.isfinite(x) for x in rewards) and any(x not in (0.0, 1.0) for x in rewards), rewards
    assert os.path.isfile(os.path.join(session.reports[-1]["checkpoint"], "expert", "adapter_model.safetensors"))


def test_reward_model_refusals(tiny_model, pairs, tmp_path):
    for name in ("svf", "prefix"):
        method = {"name": name, **({"num_virtual_tokens": 4} if name == "prefix" else {})}
        with pytest.raises(ConfigError) as err:
            _job(tiny_model, pairs, str(tmp_path / name), "reward", method=method)
        assert err.value.field == "method.name" and "reward" in str(err.value)
    from raylib.objectives import rewards

    with pytest.raises(ConfigError) as err:
        rewards.resolve(f"model:{tmp_path}")
    assert err.value.field == "objective.reward" and "expert.json" in str(err.value)
