"""RL objectives: reward functions (incl. sandboxed code tests), REINFORCE raising the mean
reward, PPO resume exactness, GRPO through TRL, all on SVF z vectors, in one process."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import job_dict

from raylib.config import validate_job
from raylib.data import ALPACA
from raylib.errors import ConfigError
from raylib.methods import svf
from raylib.objectives import rewards, rl
from raylib.synthetic import write_dataset
from raylib.train_loop import PlainSession


def test_builtin_rewards():
    row = {"output": "52"}
    assert rewards.exact_match("52", row) == 1.0 and rewards.exact_match("52 or 37", row) == 0.0
    assert rewards.exact_match("52\n\n### End", row) == 1.0
    assert rewards.contains("the answer is 52.", row) == 1.0 and rewards.contains("5 2", row) == 0.0
    assert rewards.numeric("=> 52.0 maybe", row) == 1.0 and rewards.numeric("53", row) == 0.0
    assert rewards.numeric("no number", row) == 0.0
    assert rewards.resolve("numeric") is rewards.numeric
    assert rewards.resolve("raylib.objectives.rewards:contains") is rewards.contains
    with pytest.raises(ConfigError, match="unknown reward"):
        rewards.resolve("nope")
    with pytest.raises(ConfigError, match="cannot import"):
        rewards.resolve("no_such_module:fn")


def test_code_reward_runs_tests_in_a_sandboxed_subprocess(tmp_path):
    row = {"output": "", "tests": "assert add(2, 3) == 5"}
    assert rewards.code_tests("def add(a, b):\n    return a + b", row) == 1.0
    assert rewards.code_tests("```python\ndef add(a, b):\n    return a + b\n```", row) == 1.0
    assert rewards.code_tests("def add(a, b):\n    return a - b", row) == 0.0
    assert rewards.code_tests("def add(a, b):\n    while True: pass", {**row, "timeout": 2}) == 0.0
    net = "import socket\nsocket.create_connection(('127.0.0.1', 9))\ndef add(a, b):\n    return a + b"
    assert rewards.code_tests(net, row) == 0.0
    ok, err = rewards.run_code_tests("import socket\nsocket.socket()", "")
    assert not ok and "network access is disabled" in err
    # the candidate runs elsewhere: it cannot touch this process
    marker = tmp_path / "touched"
    rewards.code_tests(f"import os\nos.environ['X_RAYLIB'] = '1'\nopen({str(marker)!r}, 'w')", {**row, "tests": "pass"})
    assert "X_RAYLIB" not in os.environ


def test_a_raising_reward_names_the_function():
    with pytest.raises(rewards.RewardError, match="reward function 'tests.rl_rewards:explode' raised ValueError"):
        rewards.score(rewards.resolve("tests.rl_rewards:explode"), "tests.rl_rewards:explode", ["1"], [{"output": "1"}])


def _rl_job(tiny_model, tmp_path, name, objective=None, **train):
    data = write_dataset(str(tmp_path / "data"), 200, 32, ["comparison"])
    return validate_job(job_dict(
        tiny_model, data, str(tmp_path / "o"), method={"name": "svf", "targets": "all-linear", "cache_dir": str(tmp_path / "c")},
        objective={"name": name, "reward": "tests.rl_rewards:is_number", "num_samples": 4, "max_new_tokens": 8,
                   "kl_coef": 0.01, "eval_rows": 32, **(objective or {})},
        train={"lr": 0.02, "batch_size": 8, "checkpoint_every": 0, "lr_scheduler": "constant", **train},
    ))


def test_reinforce_raises_the_mean_reward(tiny_model, tmp_path):
    job = _rl_job(tiny_model, tmp_path, "reinforce", max_steps=8, eval_every=8)
    session = PlainSession(str(tmp_path / "ck"))
    out = rl.run(job, session)
    history = out["state"].history
    before, after = out["state"].eval_before["eval_reward"], history[-1]["eval_reward"]
    step_rewards = [e["reward"] for e in session.events if e["type"] == "step"]
    print("eval reward", before, "->", after, "train rewards", step_rewards)
    assert after > before + 0.2
    assert sum(step_rewards[-3:]) / 3 > step_rewards[0]
    final = session.reports[-1]
    assert final["eval_reward"] == after and final["trainable_params"] == 768
    # the KL is measured against z = 1 and is positive once z moved
    assert final["kl"] > 0


def test_ppo_resume_matches_an_uninterrupted_run(tiny_model, tmp_path):
    job = _rl_job(tiny_model, tmp_path, "ppo", max_steps=4, checkpoint_every=2, eval_every=0)
    full = PlainSession(str(tmp_path / "full"))
    rl.run(job, full)
    assert [r["step"] for r in full.reports] == [2, 4]
    resumed = PlainSession(str(tmp_path / "resumed"), resume_from=full.reports[0]["checkpoint"])
    rl.run(job, resumed)
    assert [e["step"] for e in resumed.events if e["type"] == "step"] == [3, 4]
    a = svf.load_z(os.path.join(full.reports[-1]["checkpoint"], "expert"))
    b = svf.load_z(os.path.join(resumed.reports[-1]["checkpoint"], "expert"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert any((v - 1).abs().max() > 1e-4 for v in a.values())


def test_gae_has_its_closed_forms():
    """λ = 1: A_t = Σ_{k≥t} γ^(k−t) r_k − V_t (Monte Carlo); λ = 0: A_t = δ_t (one-step TD).
    Only the completion tokens (mask) count; V after the last token is 0."""
    r = torch.tensor([[0.0, 0.5, -0.2, 1.0, 0.0]])
    v = torch.tensor([[0.0, 0.3, 0.1, -0.4, 0.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    g = 0.9
    adv, ret = rl.gae(r, v, mask, g, 1.0)
    mc = [0.5 + g * -0.2 + g * g * 1.0, -0.2 + g * 1.0, 1.0]
    torch.testing.assert_close(adv[0, 1:4], torch.tensor(mc) - v[0, 1:4])
    torch.testing.assert_close(ret[0, 1:4], torch.tensor(mc))
    assert adv[0, 0] == 0 and adv[0, 4] == 0
    adv0, _ = rl.gae(r, v, mask, g, 0.0)
    td = [0.5 + g * 0.1 - 0.3, -0.2 + g * -0.4 - 0.1, 1.0 - -0.4]
    torch.testing.assert_close(adv0[0, 1:4], torch.tensor(td))


def test_ppo_is_actor_critic(tiny_model, tmp_path):
    """A value head learns the returns (value loss falls), the mean reward rises, and the
    head is training state (train_state/value_head.pt), not part of the published expert."""
    job = _rl_job(tiny_model, tmp_path, "ppo", max_steps=10, eval_every=10, checkpoint_every=10,
                  objective={"num_samples": 2})
    session = PlainSession(str(tmp_path / "ck"))
    out = rl.run(job, session)
    history = out["state"].history
    steps = [e for e in session.events if e["type"] == "step"]
    assert steps[-1]["value_loss"] < steps[0]["value_loss"], [e["value_loss"] for e in steps]
    assert history[-1]["eval_reward"] > out["state"].eval_before["eval_reward"] + 0.2, history
    ckpt = session.reports[-1]["checkpoint"]
    head = torch.load(os.path.join(ckpt, "train_state", "value_head.pt"))
    assert head["weight"].shape == (1, 64)
    z = svf.load_z(os.path.join(ckpt, "expert"))
    assert all("value" not in k for k in z) and session.reports[-1]["trainable_params"] == 768


def _fixed_rollouts(policy, job, n_prompts: int) -> list[rl.MicroBatch]:
    """Hand-made rollouts, one micro-batch per prompt pair: the same prompts, completions and
    rewards whatever runs them. Completion lengths differ between micro-batches (so a per
    micro-batch mean length or baseline would show) and rewards vary inside every group."""
    tok, k = policy.tokenizer, job.objective.num_samples
    rows = rl.load_rows(job, "train")[:n_prompts]
    answers = ["12", "seven", "the answer is 42", "-3", "9 9 9 9 9 9", "x", "1000", "no idea at all"]
    micro = []
    for start in range(0, n_prompts, 2):
        pairs, rewards = [], []
        for i, row in enumerate(rows[start : start + 2]):
            prompt = tok(ALPACA.prompt(row["instruction"], row["input"]))["input_ids"]
            for j in range(k):
                text = answers[(start * k + i * k + j) % len(answers)] * (1 + start)  # longer in later micro-batches
                pairs.append((prompt, tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
                rewards.append(float((start + i + j) % 3))
        micro.append(rl.MicroBatch(pairs, rewards))
    return micro


@pytest.mark.parametrize("name, num_samples", [("reinforce", 4), ("reinforce", 1)])
def test_a_grad_accum_step_equals_one_step_over_the_concatenated_micro_batches(tiny_model, tmp_path, name, num_samples):
    """grad_accum 2 over micro-batches A and B moves the weights exactly as grad_accum 1 over
    one batch A+B: one optimizer step, the same loss scale, and the
    step-wide baseline and mean length. SGD without clipping: its update is proportional to
    the gradient, so a gradient scaled by 1/grad_accum (Adam would hide it) shows."""
    results = []
    for grad_accum, batch_size in ((2, 2), (1, 4)):
        job = _rl_job(tiny_model, tmp_path, name, grad_accum=grad_accum, batch_size=batch_size, optimizer="sgd",
                      lr=0.5, max_grad_norm=None, objective={"num_samples": num_samples})
        policy = rl.build_policy(job)
        before = {n: p.detach().clone() for n, p in policy.unwrapped.named_parameters() if p.requires_grad}
        micro = _fixed_rollouts(policy, job, 4)
        if grad_accum == 1:  # the same samples in one batch
            micro = [rl.MicroBatch([p for m in micro for p in m.pairs], [r for m in micro for r in m.rewards])]
        out = rl.update(policy, micro, job)
        after = {n: p.detach().clone() for n, p in policy.unwrapped.named_parameters() if p.requires_grad}
        results.append((before, after, out))
    (before, accumulated, out2), (before1, whole, out1) = results
    assert accumulated.keys() == whole.keys() and len(whole) > 0
    moved = max((whole[k] - before[k]).abs().max().item() for k in whole)
    assert moved > 1e-3, "the step must move the weights well beyond the tolerance"
    for k in whole:
        torch.testing.assert_close(before[k], before1[k], atol=0, rtol=0)
        torch.testing.assert_close(accumulated[k], whole[k], atol=1e-6, rtol=1e-5)
    assert out2["loss"] == pytest.approx(out1["loss"], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(out2["kl"], out1["kl"], atol=1e-6, rtol=1e-5)


def test_grad_accum_counts_steps_like_sft(tiny_model, tmp_path):
    """An epoch of 20 prompts at batch_size 4 and grad_accum 2 is ceil(5 / 2) = 3 steps, each
    sampling 2 micro-batches (2 x 4 prompts x 2 samples), with one scheduler step each."""
    files = write_dataset(str(tmp_path / "data"), 20, 8, ["comparison"])
    svf_method = {"name": "svf", "targets": "all-linear", "cache_dir": str(tmp_path / "c")}
    job = validate_job(job_dict(
        tiny_model, files, str(tmp_path / "o"), method=svf_method,
        objective={"name": "reinforce", "reward": "tests.rl_rewards:is_number", "num_samples": 2, "max_new_tokens": 4,
                   "eval_rows": 4},
        train={"lr": 0.02, "batch_size": 4, "grad_accum": 2, "epochs": 1, "max_steps": None, "checkpoint_every": 0,
               "lr_scheduler": "linear"},
    ))
    assert rl.steps_per_epoch(20, 4, 2) == 3 and rl.steps_per_epoch(3, 4, 2) == 1
    session = PlainSession(str(tmp_path / "ck"))
    assert rl.run(job, session)["step"] == 3
    steps = [e for e in session.events if e["type"] == "step"]
    assert session.events[0]["total_steps"] == 3 and [e["step"] for e in steps] == [1, 2, 3]
    assert [e["lr"] for e in steps] == pytest.approx([0.02 * 2 / 3, 0.02 / 3, 0.0])


def test_grpo_through_trl_trains_svf_z_and_checkpoints(tiny_model, tmp_path):
    job = _rl_job(tiny_model, tmp_path, "grpo", max_steps=2, checkpoint_every=1)
    session = PlainSession(str(tmp_path / "ck"))
    rl.run(job, session)
    assert [r["step"] for r in session.reports] == [1, 2]
    assert all(r["reward"] is not None for r in session.reports)
    z = svf.load_z(os.path.join(session.reports[-1]["checkpoint"], "expert"))
    assert any((v - 1).abs().max() > 1e-5 for v in z.values())
    # resume from step 1 runs only the remaining step
    resumed = PlainSession(str(tmp_path / "resumed"), resume_from=session.reports[0]["checkpoint"])
    rl.run(job, resumed)
    assert [r["step"] for r in resumed.reports] == [2]


def test_objective_config_errors_name_the_field():
    base = {"model": {"path": "x"}, "data": {"train": "x"}, "method": {"name": "svf"}, "output": {"dir": "o"}}
    assert validate_job(base).objective.name == "sft"
    cases = [({"name": "reinforce", "rewrd": "x"}, "objective.rewrd: unknown field (did you mean 'reward'?)"),
             ({"name": "reinfroce"}, "did you mean 'reinforce'?"),
             ({"name": "ppo", "clip": 2}, "objective.clip")]
    for objective, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            validate_job({**base, "objective": objective})


@pytest.mark.parametrize("name", ["reinforce", "grpo"])
def test_rl_objectives_train_lora_adapters(tiny_model, tmp_path, name):
    """LoRA: the KL reference is the adapter-disabled model (ours) / TRL's own for GRPO."""
    data = write_dataset(str(tmp_path / "data"), 100, 16, ["comparison"])
    job = validate_job(job_dict(
        tiny_model, data, str(tmp_path / "o"), method={"name": "lora", "r": 4, "dropout": 0.0},
        objective={"name": name, "reward": "tests.rl_rewards:is_number", "num_samples": 2, "max_new_tokens": 6,
                   "eval_rows": 8},
        train={"lr": 1e-3, "batch_size": 4, "max_steps": 2, "checkpoint_every": 0, "lr_scheduler": "constant"},
    ))
    session = PlainSession(str(tmp_path / "ck"))
    rl.run(job, session)
    final = session.reports[-1]
    assert final["step"] == 2 and 0 < final["trainable_params"] < final["total_params"]
    assert os.path.isfile(os.path.join(final["checkpoint"], "expert", "adapter_model.safetensors"))
