"""RL objectives: `reinforce`, `ppo` (our loops) and `grpo` (TRL's GRPOTrainer).

All three run inside Ray Train workers (`train_loop.train_worker` dispatches here on
`objective.name`) and write the same checkpoints as SFT (`raylib.checkpointing`: expert/ +
train_state/), so `--resume` and Ray's automatic restore work the same way. reinforce and ppo
are `RolloutSteps` in the loop every objective shares (`recipe.fit`: schedule, resume,
progress, eval and checkpoint cadence); grpo is TRL's trainer with a checkpointing callback.

Data: the rows of `data.train` (instruction/input/output, the `alpaca` or `chat` template)
are prompts; `output` is the reference the reward function sees (with the whole row).

reinforce / ppo (one loop, shared rollout and reward code), per training step and worker
(ppo replaces steps 3-5 by actor-critic PPO: `ppo_update`):
  1. take `train.grad_accum` micro-batches of `train.batch_size` prompts (a deterministic
     function of the step, so resume is exact), sample `num_samples` completions each
     (temperature, max_new_tokens) — `sample_step`;
  2. score them with the reward function;
  3. advantages: reward minus the mean reward of the prompt's own group of samples
     (with `num_samples: 1`, minus the step's mean) — a group/mean baseline, no value head;
     `normalize: true` also divides by the group's std (GRPO-style);
     ppo instead: per-token rewards −kl_coef·(log π − log π_base) plus the score on the last
     token, values from the value head, GAE(γ, λ) advantages and returns;
  4. KL to the frozen base model: per-token k3 estimator exp(b−p)−(b−p)−1 on the sampled
     tokens, with log-probs b from the base = the same network with z = 1 for SVF, PEFT
     adapters disabled for LoRA-family methods, a frozen copy for full fine-tuning;
  5. reinforce: loss = −mean_seq(A·Σ_t log π(y_t)) / mean completion length + kl_coef·KL.
     Steps 3–5 are `update`: it accumulates the gradient over the step's micro-batches and
     makes one optimizer step, so `grad_accum` means what it means for SFT: a step's batch
     is batch_size × grad_accum prompts per worker, and an epoch is as many steps as SFT
     counts (`steps_per_epoch`).
     ppo: `ppo_epochs` passes over the step's micro-batches in a seeded shuffled order, one
     optimizer step per micro-batch (PPO's minibatch): −mean_t min(ρ_t·A_t, clip(ρ_t)·A_t)
     + vf_coef·½·mean_t max((V−R)², (clip(V, V_old ± value_clip)−R)²).
Evaluation: mean reward of greedy answers on `data.eval` (`eval_rows` of them).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from raylib.methods.reference import frozen_base

log = logging.getLogger("raylib.rl")

RL_OBJECTIVES = ("reinforce", "ppo", "grpo")


class _RLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reward: str = Field("exact_match", description="exact_match | contains | numeric | code_tests | module:function")
    kl_coef: float = Field(0.05, ge=0, description="weight of the KL penalty to the base model")
    num_samples: PositiveInt = Field(4, description="completions sampled per prompt (the group)")
    max_new_tokens: PositiveInt = 16
    temperature: float = Field(1.0, gt=0)
    eval_rows: PositiveInt = Field(64, description="rows of the eval set scored (greedy) at each eval")


class ReinforceOptions(_RLOptions):
    """REINFORCE with a group-mean baseline and a KL penalty to the base model."""

    name: Literal["reinforce"]
    normalize: bool = False


class PPOOptions(_RLOptions):
    """PPO as InstructGPT and TRL's former PPOTrainer run it (TRL 1.x has none): actor-critic
    with a value head on the policy's last hidden state, the KL to the base as a per-token
    penalty in the reward, GAE advantages, clipped policy and value losses, `ppo_epochs`
    passes over the rollout's micro-batches (minibatches) with one optimizer step each."""

    name: Literal["ppo"]
    num_samples: PositiveInt = Field(1, description="completions sampled per prompt")
    clip: float = Field(0.2, gt=0, lt=1, description="policy ratio clip ε")
    value_clip: float = Field(0.2, gt=0, description="value clip around the rollout's values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, gt=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    ppo_epochs: PositiveInt = Field(4, description="passes over the rollout per training step")
    whiten: bool = Field(True, description="normalise advantages over the rollout's tokens")


class GRPOOptions(_RLOptions):
    """TRL's GRPOTrainer; `extra` goes straight into trl.GRPOConfig."""

    name: Literal["grpo"]
    extra: dict[str, Any] = Field(default_factory=dict, description="passed to trl.GRPOConfig")


# --------------------------------------------------------------------------- shared pieces


def load_rows(job, which: str) -> list[dict]:
    """Valid rows of data.train / data.eval (or the held-out split when data.eval is unset)."""
    from raylib import data as data_mod
    from raylib.errors import ConfigError

    if job.data.template == "plain":
        raise ConfigError("data.template", f"{job.objective.name} needs prompts with a reference answer, "
                          "not plain text", "use template alpaca or chat with instruction/input/output columns")
    rows = data_mod.valid_rows(data_mod.load_rows(job.data.train, "data.train"), job.data, data_mod.DataReport(),
                               job.data.max_rows)
    if job.data.eval:
        eval_rows = data_mod.valid_rows(data_mod.load_rows(job.data.eval, "data.eval"), job.data, data_mod.DataReport())
    else:
        rows, eval_rows = data_mod.split_rows(rows, job.data.eval_split, job.train.seed)
    f = job.data.fields
    norm = [{**r, "instruction": r[f.instruction], "input": r.get(f.input) or "", "output": r[f.output]}
            for r in (rows if which == "train" else eval_rows)]
    return norm


def pad_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, device):
    """(prompt ids, completion ids) -> input_ids, attention_mask, target mask (completion
    tokens, shifted for next-token log-probs)."""
    import torch

    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), width), dtype=torch.long)
    target = torch.zeros((len(pairs), width - 1), dtype=torch.bool)
    for i, (p, c) in enumerate(pairs):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        target[i, len(p) - 1 : len(seq) - 1] = True
    return ids.to(device), attn.to(device), target.to(device)


def token_logps(model, ids, attn):
    """log π(token_t | tokens_<t) for t = 1..T-1, shape [B, T-1]."""
    import torch

    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def advantages(rewards, group: int, normalize: bool):
    import torch

    r = torch.tensor(rewards, dtype=torch.float32)
    if group > 1:
        g = r.view(-1, group)
        adv = g - g.mean(1, keepdim=True)
        if normalize:
            adv = adv / (g.std(1, keepdim=True) + 1e-4)
        return adv.reshape(-1)
    adv = r - r.mean()
    return adv / (r.std() + 1e-4) if normalize and len(r) > 1 else adv


def rollout(model, tokenizer, rows, job, rank_seed: int):
    """Sample completions; returns (texts, pairs, rows repeated per sample)."""
    import torch

    from raylib.evaluation import generate, prompts_for

    obj = job.objective
    torch.manual_seed(rank_seed)
    texts, pairs = generate(model, tokenizer, prompts_for(rows, job.data.template, tokenizer), obj.max_new_tokens,
                            batch_size=len(rows), do_sample=True, temperature=obj.temperature,
                            num_return_sequences=obj.num_samples, return_ids=True)
    return texts, pairs, [r for r in rows for _ in range(obj.num_samples)]


def eval_reward(model, tokenizer, rows, job, reward_fn, rank, world, device, reduce_sum) -> dict:
    import torch

    from raylib.evaluation import generate, prompts_for
    from raylib.objectives.rewards import score

    shard = rows[: job.objective.eval_rows][rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if shard:
        answers = generate(model, tokenizer, prompts_for(shard, job.data.template, tokenizer),
                           job.objective.max_new_tokens, batch_size=32)
        values = score(reward_fn, job.objective.reward, answers, shard)
        total += torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    total = reduce_sum(total)
    return {"eval_reward": total[0].item() / max(total[1].item(), 1.0)}


# --------------------------------------------------------------------------- reinforce / ppo


@dataclass
class Policy:
    """What one worker trains in the reinforce/ppo loop. `model` is the accelerator-prepared
    model (DDP) the loss goes through; `unwrapped` is the same module for sampling, no-grad
    log-probs and checkpoints; `frozen` is the reference copy (full fine-tuning only)."""

    setup: Any  # recipe.Setup: accelerator, tokenizer, method, parameter counts
    accelerator: Any
    model: Any
    unwrapped: Any
    optimizer: Any
    tokenizer: Any
    method: Any
    frozen: Any = None
    critic: Any = None  # ppo: the unwrapped ActorCritic (policy + value head) that `model` wraps


@dataclass
class MicroBatch:
    """The sampled completions of one micro-batch of prompts and their rewards: what the
    update needs, apart from the policy (so a test can feed fixed rollouts)."""

    pairs: list[tuple[list[int], list[int]]]  # (prompt ids, completion ids), one per sample
    rewards: list[float]


def steps_per_epoch(n_prompts: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over `n_prompts`, counted as SFT counts them: batches of
    `batch_size`, one optimizer step per `grad_accum` of them."""
    return max(1, math.ceil(math.ceil(n_prompts / batch_size) / grad_accum))


def build_policy(job, use_gpu: bool = False) -> Policy:
    """The shared setup (`recipe.setup`: seeded accelerator, tokenizer, model with the
    method), then the optimizer, prepared together (ppo: with the value head)."""
    from raylib import backends, recipe

    built = recipe.setup(job, use_gpu)
    accelerator, tokenizer, method, model = built.accelerator, built.tokenizer, built.method, built.model
    frozen = copy.deepcopy(model).requires_grad_(False).eval() if job.method.name == "full" else None
    if job.objective.name == "ppo":  # the value head trains with the policy, in one optimizer and one DDP module
        from raylib.objectives.actor_critic import ActorCritic

        critic = ActorCritic(model, model.config.hidden_size).to(accelerator.device)
        accelerator.gradient_accumulation_steps = 1  # one optimizer step per PPO minibatch
        optimizer = backends.build_optimizer(critic, job.train)
        wrapped, optimizer = accelerator.prepare(critic, optimizer)
        return Policy(built, accelerator, wrapped, model, optimizer, tokenizer, method, frozen, critic)
    optimizer = backends.build_optimizer(model, job.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Policy(built, accelerator, model, accelerator.unwrap_model(model), optimizer, tokenizer, method, frozen)


def sample_step(policy: Policy, shard: list[dict], job, step: int, rank: int, reward_fn) -> list[MicroBatch]:
    """The rollouts of one training step: `train.grad_accum` micro-batches of `train.batch_size`
    prompts each, `num_samples` completions per prompt, scored. The prompts and sampling seeds
    are a function of (seed, step, rank) only, so a resumed run samples what the uninterrupted
    one did. Each micro-batch draws its prompts without replacement on its own (micro-batches
    of one step may share a prompt), so all have the same size."""
    from raylib.objectives.rewards import score

    obj = job.objective
    rng = random.Random(job.train.seed * 1_000_003 + step * 7919 + rank)
    out = []
    for _ in range(job.train.grad_accum):
        prompts = rng.sample(shard, min(job.train.batch_size, len(shard)))
        texts, pairs, sample_rows = rollout(policy.unwrapped, policy.tokenizer, prompts, job, rng.randrange(2**31))
        out.append(MicroBatch(pairs, score(reward_fn, obj.reward, texts, sample_rows)))
    return out


def update(policy: Policy, micro_batches: list[MicroBatch], job) -> dict[str, Any]:
    """The policy update of one training step from its rollouts.

    One optimizer step; it accumulates gradients over all `micro_batches` (exactly
    `train.grad_accum` of them) under `accelerator.accumulate`, so the optimizer steps once,
    as in SFT. Everything that
    spans samples is computed over the whole step, not per micro-batch: the advantages'
    baseline (the batch mean when `num_samples` is 1), reinforce's mean completion length, and
    the mean over sequences. So grad_accum micro-batches give the gradient one batch of all
    their samples would give — they only bound the memory of a forward/backward.
    Returns the mean loss and the per-sample KL (a tensor).
    """
    import torch

    obj, accelerator, model = job.objective, policy.accelerator, policy.model
    if len(micro_batches) != accelerator.gradient_accumulation_steps:
        raise ValueError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps="
                         f"{accelerator.gradient_accumulation_steps}: the optimizer would not step at the end")
    device = accelerator.device
    rewards = [r for mb in micro_batches for r in mb.rewards]
    adv_all = advantages(rewards, obj.num_samples, obj.normalize).to(device)
    n_samples = len(rewards)

    # no-grad pieces, before the optimizer step: reference log-probs
    parts, offset = [], 0
    for mb in micro_batches:
        ids, attn, mask = pad_batch(mb.pairs, policy.tokenizer.pad_token_id, device)
        with torch.no_grad():
            with frozen_base(policy.unwrapped, policy.frozen) as ref_model:
                ref_lp = token_logps(ref_model, ids, attn)
        adv = adv_all[offset : offset + len(mb.rewards)]
        offset += len(mb.rewards)
        parts.append((ids, attn, mask, mask.sum(1).clamp(min=1), adv, ref_lp))
    mean_len = torch.cat([p[3] for p in parts]).float().mean()
    # accelerator.backward divides every micro-batch's loss by grad_accum: scaling a sum over
    # sequences by grad_accum / n_samples makes the accumulated gradient that of the step's mean
    weight = accelerator.gradient_accumulation_steps / n_samples

    model.train()
    loss_sum, kls = 0.0, []
    for ids, attn, mask, n_tok, adv, ref_lp in parts:
        with accelerator.accumulate(model):
            lp = token_logps(model, ids, attn)
            delta = (ref_lp - lp).clamp(-20, 20)
            kl = ((delta.exp() - delta - 1) * mask).sum(1) / n_tok
            pg = -(adv * (lp * mask).sum(1)) / mean_len
            per_seq = pg + obj.kl_coef * kl
            accelerator.backward(per_seq.sum() * weight)
            if accelerator.sync_gradients and job.train.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), job.train.max_grad_norm)
            policy.optimizer.step()  # step and zero_grad are no-ops until the last micro-batch
            policy.optimizer.zero_grad()
        loss_sum += per_seq.detach().sum().item()
        kls.append(kl.detach())
    return {"loss": loss_sum / n_samples, "kl": torch.cat(kls)}


def _logps(logits, ids):
    """log π(token_t | tokens_<t) for t = 1..T-1 from a forward's logits, shape [B, T-1]."""
    import torch

    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def gae(rewards, values, mask, gamma: float, lam: float):
    """GAE advantages and returns over each row's completion tokens (`mask`, contiguous):
    δ_t = r_t + γ·V_{t+1} − V_t (V after the last token = 0), A_t = δ_t + γλ·A_{t+1}."""
    import torch

    adv = torch.zeros_like(rewards)
    for i in range(rewards.size(0)):
        idx = mask[i].nonzero().squeeze(-1)
        if idx.numel() == 0:
            continue
        r, v = rewards[i, idx], values[i, idx]
        nxt = torch.cat([v[1:], v.new_zeros(1)])
        delta = r + gamma * nxt - v
        a, running = torch.zeros_like(delta), 0.0
        for t in range(delta.numel() - 1, -1, -1):
            running = delta[t] + gamma * lam * running
            a[t] = running
        adv[i, idx] = a
    return adv, (adv + values) * mask


def ppo_update(policy: Policy, micro_batches: list[MicroBatch], job, step: int = 0, rank: int = 0) -> dict[str, Any]:
    """Actor-critic PPO on one step's rollouts (see the module docstring). The rollout's
    log-probs, reference log-probs and values are taken once, before any update; each of the
    `ppo_epochs` passes visits the micro-batches in an order seeded by (seed, step, rank), so
    a resumed run updates as the uninterrupted one did. Returns the last pass's mean loss,
    value loss and the per-sample KL to the base (k1, a tensor)."""
    import torch

    obj, accelerator = job.objective, policy.accelerator
    device = accelerator.device
    rollouts = []
    with torch.no_grad():
        for mb in micro_batches:
            ids, attn, mask = pad_batch(mb.pairs, policy.tokenizer.pad_token_id, device)
            with frozen_base(policy.unwrapped, policy.frozen) as ref_model:
                ref_lp = token_logps(ref_model, ids, attn)
            logits, values = policy.critic(ids, attn)
            old_lp, old_v = _logps(logits, ids), values[:, :-1] * mask
            kl = (old_lp - ref_lp) * mask
            rewards = -obj.kl_coef * kl
            last = (mask.long() * torch.arange(mask.size(1), device=device)).argmax(1)
            rewards[torch.arange(len(mb.rewards), device=device), last] += torch.tensor(mb.rewards, device=device)
            adv, ret = gae(rewards, old_v, mask, obj.gamma, obj.lam)
            rollouts.append({"ids": ids, "attn": attn, "mask": mask, "old_lp": old_lp, "old_v": old_v, "adv": adv,
                             "ret": ret, "kl": kl.sum(1) / mask.sum(1).clamp(min=1)})
    if obj.whiten:
        tokens = torch.cat([r["adv"][r["mask"]] for r in rollouts])
        mean, std = tokens.mean(), tokens.std() if tokens.numel() > 1 else tokens.new_tensor(1.0)
        for r in rollouts:
            r["adv"] = (r["adv"] - mean) / (std + 1e-8) * r["mask"]

    order_rng = torch.Generator().manual_seed(job.train.seed * 1_000_003 + step * 7919 + rank)
    model = policy.model
    model.train()
    for _ in range(obj.ppo_epochs):
        losses, value_losses = [], []
        for i in torch.randperm(len(rollouts), generator=order_rng).tolist():
            r = rollouts[i]
            mask, n = r["mask"], r["mask"].sum().clamp(min=1)
            logits, values = model(r["ids"], r["attn"])
            lp, v = _logps(logits, r["ids"]), values[:, :-1]
            ratio = (lp - r["old_lp"]).exp()
            surr = torch.minimum(ratio * r["adv"], ratio.clamp(1 - obj.clip, 1 + obj.clip) * r["adv"])
            pg = -(surr * mask).sum() / n
            v_clipped = r["old_v"] + (v - r["old_v"]).clamp(-obj.value_clip, obj.value_clip)
            vf = 0.5 * (torch.maximum((v - r["ret"]) ** 2, (v_clipped - r["ret"]) ** 2) * mask).sum() / n
            loss = pg + obj.vf_coef * vf
            accelerator.backward(loss)
            if job.train.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), job.train.max_grad_norm)
            policy.optimizer.step()
            policy.optimizer.zero_grad()
            losses.append(loss.item())
            value_losses.append(vf.item())
    return {"loss": sum(losses) / len(losses), "value_loss": sum(value_losses) / len(value_losses),
            "kl": torch.cat([r["kl"] for r in rollouts])}


def run(job, session, use_gpu: bool = False) -> dict[str, Any]:
    """reinforce and ppo: `recipe.fit` over `RolloutSteps`; grpo: TRL's trainer (`run_grpo`)."""
    if job.objective.name == "grpo":
        return run_grpo(job, session, use_gpu)
    from raylib import recipe

    return recipe.fit(job, session, RolloutSteps(job, use_gpu))


class RolloutSteps:
    """reinforce / ppo as `recipe.fit`'s steps: each optimizer step samples and scores the
    step's rollouts (`sample_step`), then updates the policy (`update`; ppo: `ppo_update`).
    Eval: mean reward of greedy answers on data.eval."""

    def __init__(self, job, use_gpu: bool = False):
        import torch

        from raylib.objectives.rewards import resolve

        self.job = job
        self.policy = policy = build_policy(job, use_gpu)
        self.setup, self.optimizer, self.unwrapped = policy.setup, policy.optimizer, policy.unwrapped
        self.engine = None  # refused up front (backends.check)
        self.modules = {"value_head": policy.critic.value_head} if policy.critic is not None else None
        self.reward_fn = resolve(job.objective.reward)
        accelerator = policy.accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        rows = load_rows(job, "train")
        self.eval_rows = load_rows(job, "eval")
        self.shard = rows[self.rank :: self.world] or rows
        self.epoch_steps = steps_per_epoch(len(self.shard), job.train.batch_size, job.train.grad_accum)
        self.total_steps = job.train.max_steps or self.epoch_steps * job.train.epochs
        self.data_summary = f"{len(rows)} prompts"
        # reward sum, samples, kl sum, kl samples, loss sum, value loss sum, steps, sampled tokens
        self._window = torch.zeros(8, dtype=torch.float64, device=accelerator.device)

    def _reduce_sum(self, t):
        return self.policy.accelerator.reduce(t, reduction="sum")

    def train_step(self, state) -> None:
        import torch

        state.epoch = state.step // self.epoch_steps
        micro_batches = sample_step(self.policy, self.shard, self.job, state.step, self.rank, self.reward_fn)
        if self.job.objective.name == "ppo":
            result = ppo_update(self.policy, micro_batches, self.job, state.step, self.rank)
        else:
            result = update(self.policy, micro_batches, self.job)
        rewards = [r for mb in micro_batches for r in mb.rewards]
        kl = result["kl"]
        tokens = sum(len(p) + len(c) for mb in micro_batches for p, c in mb.pairs)
        self._window += torch.tensor([sum(rewards), len(rewards), kl.sum().item(), len(kl), result["loss"],
                                      result.get("value_loss", 0.0), 1, tokens], dtype=torch.float64,
                                     device=self._window.device)

    def window(self, state, elapsed: float) -> dict:
        s = self._reduce_sum(self._window).tolist()
        self._window.zero_()
        state.tokens_seen += int(s[7])
        steps = max(s[6], 1.0)  # the ranks' step counts summed: every rank took the same steps
        out = {"reward": s[0] / max(s[1], 1.0), "kl": s[2] / max(s[3], 1.0), "loss": s[4] / steps,
               "tokens_per_s": s[7] / elapsed}
        if self.job.objective.name == "ppo":
            out["value_loss"] = s[5] / steps
        return out

    def evaluate(self) -> dict:
        if not self.eval_rows:
            return {}
        return eval_reward(self.unwrapped, self.policy.tokenizer, self.eval_rows, self.job, self.reward_fn, self.rank,
                           self.world, self.policy.accelerator.device, self._reduce_sum)

    def run_metrics(self) -> dict:
        return {}


# --------------------------------------------------------------------------- grpo (TRL)


def run_grpo(job, session, use_gpu: bool = False) -> dict[str, Any]:
    """GRPO through TRL's `GRPOTrainer` inside the worker.

    SVF: the model is passed with only z trainable (TRL builds its reference model from the
    base path = z = 1). LoRA-family methods: the raw base model + `peft_config` (TRL then uses
    the adapter-disabled model as reference). Checkpoints: a TrainerCallback writes raylib
    checkpoints (expert/ + train_state/) every `train.checkpoint_every` steps and reports them
    to the session. Resume loads the expert weights and optimizer state and runs the
    remaining steps; the LR schedule restarts over those steps (exact with `constant`).

    Batching maps onto TRL's as in our loop: `per_device_train_batch_size` counts completions
    (batch_size prompts × num_samples) and `gradient_accumulation_steps` = train.grad_accum;
    TRL then generates one batch of batch_size × grad_accum prompts per optimizer step
    (its `steps_per_generation` defaults to the accumulation) and normalizes the loss over
    the accumulated micro-batches itself.
    """
    import tempfile

    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from raylib import checkpointing, models
    from raylib.checkpointing import TrainState, report_checkpoint
    from raylib.evaluation import final_answer, prompts_for
    from raylib.methods import get_method
    from raylib.methods.peft_methods import PeftMethod
    from raylib.noise import quiet_libraries
    from raylib.objectives.rewards import resolve, score

    obj = job.objective
    quiet_libraries("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    torch.manual_seed(job.train.seed)
    reward_fn = resolve(obj.reward)
    tokenizer = models.load_tokenizer(job.model)
    tokenizer.padding_side = "left"
    method = get_method(job.method.name)
    model = models.load_model(job.model, "cuda" if use_gpu and torch.cuda.is_available() else "cpu",
                              trains_weights=method.trains_base_weights)
    peft_config = None
    if isinstance(method, PeftMethod):
        peft_config = method.peft_config(job)
    else:
        model = method.apply(model, job)
    rows = load_rows(job, "train")
    columns = sorted({k for r in rows for k in r})
    dataset = datasets.Dataset.from_list(
        [{**{k: r.get(k) for k in columns}, "prompt": p} for r, p in zip(rows, prompts_for(rows, job.data.template, tokenizer))]
    )

    def reward(prompts, completions, **kwargs):
        n = len(completions)
        batch_rows = [{k: kwargs[k][i] for k in columns if k in kwargs} for i in range(n)]
        return score(reward_fn, obj.reward, [final_answer(c) for c in completions], batch_rows)

    reward.__name__ = obj.reward.replace(":", "_")
    resume_dir = session.latest_checkpoint_dir()
    state = TrainState()
    if resume_dir:
        with open(os.path.join(resume_dir, "train_state", checkpointing.STATE_FILE)) as f:
            import json

            state = TrainState(**json.load(f))
    epoch_steps = steps_per_epoch(len(rows), job.train.batch_size, job.train.grad_accum)
    total_steps = job.train.max_steps or epoch_steps * job.train.epochs
    remaining = total_steps - state.step
    if remaining <= 0:
        session.report({"step": state.step}, None, None)
        return {"step": state.step, "state": state}

    work = tempfile.mkdtemp(prefix="raylib-grpo-")
    config = GRPOConfig(
        output_dir=work, use_cpu=not use_gpu, per_device_train_batch_size=job.train.batch_size * obj.num_samples,
        num_generations=obj.num_samples, max_completion_length=obj.max_new_tokens, temperature=obj.temperature,
        beta=obj.kl_coef, learning_rate=job.train.lr, max_steps=remaining, lr_scheduler_type=job.train.lr_scheduler,
        warmup_steps=int(job.train.warmup_ratio * remaining), max_grad_norm=job.train.max_grad_norm or 0.0,
        gradient_accumulation_steps=job.train.grad_accum, save_strategy="no", logging_steps=1, report_to="none",
        seed=job.train.seed, bf16=False, disable_tqdm=True, **obj.extra,
    )
    base_metrics = {"total_steps": total_steps, "objective": "grpo"}

    class Report(TrainerCallback):
        def on_train_begin(self, args, st, control, model=None, optimizer=None, **kw):
            if resume_dir and optimizer is not None:
                opt = os.path.join(resume_dir, "train_state", "optimizer.pt")
                optimizer.load_state_dict(torch.load(opt, weights_only=False))

        def on_log(self, args, st, control, logs=None, model=None, optimizer=None, lr_scheduler=None, **kw):
            # logging_steps=1: one log with the step's rewards per optimizer step (after on_step_end)
            if not logs or "reward" not in logs:
                return
            step = state.step + st.global_step
            session.progress({"type": "step", "step": step, "total_steps": total_steps, "epoch": 0,
                              "reward": logs["reward"], "kl": logs.get("kl", 0.0), "loss": logs.get("loss", 0.0),
                              "lr": logs.get("learning_rate", 0.0), "tokens_per_s": 0.0})
            state.history.append({"step": step, "reward": logs["reward"]})
            every = job.train.checkpoint_every
            if step >= total_steps or (every and step % every == 0):
                ckpt_state = TrainState(**{**state.__dict__, "step": step})
                metrics = {**base_metrics, "step": step, "reward": logs["reward"], "kl": logs.get("kl")}
                unwrapped = trainer.accelerator.unwrap_model(model)
                rank = trainer.accelerator.process_index
                report_checkpoint(session, job, method, unwrapped, tokenizer, optimizer, lr_scheduler, ckpt_state, metrics, rank)

    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[Report()])
    trainable, total = models.count_parameters(trainer.model)  # after TRL applied a peft_config
    base_metrics.update(trainable_params=trainable, total_params=total)
    session.progress({"type": "start", "total_steps": total_steps, "step": state.step, "trainable_params": trainable,
                      "total_params": total, "eval_loss_before": None, "data": f"{len(rows)} prompts",
                      "resumed_from": resume_dir})
    if resume_dir:
        method.load_into(trainer.model, os.path.join(resume_dir, "expert"))
    trainer.train()
    state.step = total_steps
    return {"step": state.step, "state": state}
