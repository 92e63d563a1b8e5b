"""Preference objectives: `dpo`, `orpo`, `simpo`, `kto`, run by the same worker loop as SFT.

They reuse everything the loop gives SFT (Ray Train workers, Accelerate/DeepSpeed,
checkpoints, resume, eval and checkpoint cadence, progress, published experts); this module
only says what a batch is, what the loss is and what eval reports.

Data (`data.fields` renames the columns):
- pairs `{prompt, chosen, rejected}` for dpo/orpo/simpo (and kto, which unpairs them into a
  desirable and an undesirable row, as TRL's `unpair_preference_dataset` does);
- kto's own `{prompt, completion, label}` rows (label true = desirable);
- `prompt` may be a string or a list of chat messages, `chosen`/`rejected`/`completion` a
  string or a list of assistant messages (with `template: chat`). Without a `prompt` column
  the prompt is `instruction` (+ `input`), as in the SFT rows.
The prompt is rendered with `data.template` exactly as SFT renders it, so a preference-tuned
expert serves behind the same template as an SFT one.

Log-probabilities are summed over completion tokens (TRL's `selective_log_softmax` over the
logits). The reference model of dpo/kto is the frozen base (`methods.reference.frozen_base`:
adapters disabled, z = 1 for SVF), computed in the step under no_grad, so no second copy is
loaded; full fine-tuning has no built-in base, so its reference log-probs are computed once
in `prepare`, before the first step, when the weights still are the base.

Losses (the formulas of TRL's DPOTrainer, CPO/ORPO and KTO trainers and the SimPO paper):
- dpo sigmoid: −log σ(β·((πc−rc) − (πr−rr))) (with label smoothing ε: the conservative mix);
  dpo ipo: ((πc−rc)/|c| − (πr−rr)/|r| − 1/(2β))² on length-normalised log-probs;
- simpo: −log σ(β·(π̄c − π̄r) − γ), π̄ = mean token log-prob, no reference;
- orpo: NLL(chosen)/token − λ·log σ(log odds(π̄c) − log odds(π̄r)), no reference;
- kto: desirable w_d·(1 − σ(β(r − z0))), undesirable w_u·(1 − σ(β(z0 − r))), r = π − ref
  and z0 = max(0, mean over the batch of π − ref on mismatched completions), detached.
Eval (`data.eval` or the held-out split) reports `eval_loss`, `eval_reward_accuracy` (share of
pairs whose chosen reward beats the rejected one; kto: share of rows whose reward has the
label's sign) and `eval_reward_margin` (mean chosen − rejected reward), with rewards
β·(π − ref) for dpo/kto and β·π̄ for the reference-free simpo/orpo, exact across workers.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from raylib.errors import ConfigError, DataError
from raylib.methods.reference import has_builtin_base

#: objectives whose loss needs the frozen base's log-probs
NEEDS_REFERENCE = ("dpo", "kto")


class _PreferenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="inverse temperature of the implicit reward")


class DPOOptions(_PreferenceOptions):
    """Direct preference optimisation against the frozen base."""

    name: Literal["dpo"]
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: assumed share of flipped labels")


class SimPOOptions(_PreferenceOptions):
    """SimPO: length-normalised, reference-free, with a target reward margin gamma."""

    name: Literal["simpo"]
    beta: float = Field(2.0, gt=0)
    gamma: float = Field(0.5, ge=0, description="target reward margin")


class ORPOOptions(_PreferenceOptions):
    """ORPO: SFT on the chosen answer plus an odds-ratio penalty; no reference model."""

    name: Literal["orpo"]
    beta: float = Field(0.1, gt=0, description="lambda: weight of the odds-ratio term")


class KTOOptions(_PreferenceOptions):
    """KTO: desirable/undesirable rows, no pairs needed."""

    name: Literal["kto"]
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


class RewardOptions(BaseModel):
    """A reward model: a scalar head on the backbone, Bradley-Terry loss on the pairs."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["reward"]
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="TRL's: adds coef·mean((r_c + r_r)²) so rewards stay centred on 0")


OPTIONS = [DPOOptions, SimPOOptions, ORPOOptions, KTOOptions, RewardOptions]

#: methods whose expert cannot hold a trained reward head, with the reason
REWARD_UNSUPPORTED = {
    "svf": "an SVF expert holds only z vectors, and a reward model's scalar head trains from scratch",
    "heads": "heads experts are multi-class classifiers; a reward model is one scalar head (objective reward)",
    "prefix": "PEFT's prompt learning is not wired for the sequence-classification head here",
    "ptuning": "PEFT's prompt learning is not wired for the sequence-classification head here",
    "prompt": "PEFT's prompt learning is not wired for the sequence-classification head here",
}


# --------------------------------------------------------------------------- rows -> items


def _prompt(row: dict, f) -> str | list | None:
    value = row.get(f.prompt)
    if value is not None:
        return value
    instruction = row.get(f.instruction)
    if isinstance(instruction, str) and instruction.strip():
        extra = row.get(f.input)
        return {"instruction": instruction, "input": extra if isinstance(extra, str) else ""}
    return None


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)


def _answer_problem(row: dict, name: str, template: str) -> str | None:
    value = row.get(name)
    if value is None:
        return f"missing '{name}'"
    if _is_text(value):
        return None
    if template == "chat" and _is_messages(value):
        return None
    return f"'{name}' is not text" + (" or a list of messages" if template == "chat" else "")


def row_problem(row: dict, job) -> str | None:
    """Why a row cannot train this objective (None when it can)."""
    f, template = job.data.fields, job.data.template
    prompt = _prompt(row, f)
    if prompt is None:
        return f"missing '{f.prompt}' (or '{f.instruction}')"
    if not (isinstance(prompt, dict) or _is_text(prompt) or (template == "chat" and _is_messages(prompt))):
        return f"'{f.prompt}' is not text" + (" or a list of messages" if template == "chat" else "")
    if job.objective.name == "kto" and f.chosen not in row:
        if not isinstance(row.get(f.label), bool):
            return f"'{f.label}' is not true/false"
        return _answer_problem(row, f.completion, template)
    return _answer_problem(row, f.chosen, template) or _answer_problem(row, f.rejected, template)


def _prompt_ids(prompt, template: str, tokenizer) -> tuple[list[int], list | None]:
    """Prompt ids, and the chat messages they render (None outside chat)."""
    from raylib.data import ALPACA, chat_template_ids

    if template == "chat":
        if isinstance(prompt, dict):
            text = prompt["instruction"] + (f"\n\n{prompt['input']}" if prompt["input"] else "")
            messages = [{"role": "user", "content": text}]
        elif isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = list(prompt)
        return list(chat_template_ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))), messages
    if isinstance(prompt, dict):
        text = ALPACA.prompt(prompt["instruction"], prompt["input"]) if template == "alpaca" else (
            f"{prompt['instruction']}\n{prompt['input']}".strip() + "\n")
    else:
        text = ALPACA.prompt(prompt) if template == "alpaca" else prompt
    return list(tokenizer(text, add_special_tokens=True)["input_ids"]), None


def _answer_ids(answer, prompt_ids: list[int], messages, template: str, tokenizer) -> list[int]:
    from raylib.data import ALPACA, chat_template_ids

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if template == "chat":
        turns = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)
        full = list(chat_template_ids(tokenizer.apply_chat_template(messages + turns, tokenize=True)))
        if full[: len(prompt_ids)] != prompt_ids:
            raise DataError("data.template", "the tokenizer's chat template does not render the prompt as a prefix "
                            "of prompt + answer, so the answer's tokens cannot be told apart",
                            "use template: alpaca or plain, or a prefix-stable chat template")
        return full[len(prompt_ids):]
    suffix = ALPACA.end if template == "alpaca" else ""
    return list(tokenizer(answer + suffix, add_special_tokens=False)["input_ids"]) + eos


def _fit(prompt: list[int], answers: list[list[int]], data_cfg, report) -> list[list[int]] | None:
    """Answers cut to fit `max_length` after the prompt (too_long: truncate), or None (dropped)."""
    room = data_cfg.max_length - len(prompt)
    if all(len(a) <= room for a in answers):
        return answers
    if data_cfg.too_long == "drop" or room < 1:
        if report is not None:
            report.too_long_dropped += 1
        return None
    if report is not None:
        report.truncated += 1
    return [a[:room] for a in answers]


def encode(rows: list[dict], job, tokenizer, report=None) -> list[dict]:
    """Valid rows -> items: {"prompt", "chosen", "rejected"} token ids (pairs), or for kto
    {"prompt", "completion", "label", "kl_completion"} — kl_completion is another row's
    completion, the mismatched pair KTO's reference point z0 is estimated from."""
    f, template, kto = job.data.fields, job.data.template, job.objective.name == "kto"
    items = []
    for row in rows:
        prompt_ids, messages = _prompt_ids(_prompt(row, f), template, tokenizer)
        if kto and f.chosen not in row:
            answers = [(row[f.completion], bool(row[f.label]))]
        elif kto:  # a pair is one desirable and one undesirable row
            answers = [(row[f.chosen], True), (row[f.rejected], False)]
        else:
            answers = [(row[f.chosen], None), (row[f.rejected], None)]
        ids = _fit(prompt_ids, [_answer_ids(a, prompt_ids, messages, template, tokenizer) for a, _ in answers],
                   job.data, report)
        if ids is None:
            continue
        if kto:
            items += [{"prompt": prompt_ids, "completion": c, "label": lab} for c, (_, lab) in zip(ids, answers)]
        else:
            items.append({"prompt": prompt_ids, "chosen": ids[0], "rejected": ids[1]})
    if kto and items:
        for i, item in enumerate(items):  # a fixed mismatch: the next row's completion
            other = items[(i + 1) % len(items)]["completion"]
            item["kl_completion"] = other[: max(1, job.data.max_length - len(item["prompt"]))]
    return items


def load_valid_rows(job, which: str, report=None) -> list[dict]:
    from raylib import data as data_mod

    source, name = (job.data.train, "data.train") if which == "train" else (job.data.eval, "data.eval")
    out = []
    for i, row in enumerate(data_mod.load_rows(source, name)):
        if which == "train" and job.data.max_rows is not None and i >= job.data.max_rows:
            break
        if report is not None:
            report.rows += 1
        problem = row_problem(dict(row), job)
        if problem:
            if report is not None:
                report.bad[problem] += 1
            continue
        out.append(dict(row))
    return out


def preflight(job):
    """Driver side, before Ray: rows readable and usable (counted by reason), not empty."""
    from raylib.data import DataReport

    report = DataReport()
    rows = load_valid_rows(job, "train", report)
    if not rows:
        reasons = ", ".join(f"{n}x {why}" for why, n in report.bad.most_common(3)) or "no rows"
        f = job.data.fields
        columns = (f"'{f.prompt}', '{f.completion}', '{f.label}' (or pairs)" if job.objective.name == "kto"
                   else f"'{f.prompt}', '{f.chosen}', '{f.rejected}'")
        raise DataError("data.train", f"{job.data.train!r} has no usable rows for {job.objective.name} "
                        f"({report.rows} read: {reasons})", f"give rows with {columns}, or rename them in data.fields")
    if job.data.eval and not load_valid_rows(job, "eval"):
        raise DataError("data.eval", f"{job.data.eval!r} has no usable rows for {job.objective.name}",
                        "fix the file or remove data.eval")
    return report


def check(job) -> None:
    """Objective/method/backend pairings that cannot work (driver side)."""
    from raylib.methods import get_method

    name = job.objective.name
    if name == "reward" and job.method.name in REWARD_UNSUPPORTED:
        raise ConfigError("method.name", f"objective reward cannot train method {job.method.name!r}: "
                          f"{REWARD_UNSUPPORTED[job.method.name]}", "use method lora, qlora, adalora, ia3 or full")
    if job.method.name == "heads":
        raise ConfigError("method.name", f"objective {name} trains a generative policy; heads experts classify",
                          "use method lora/svf/full (or any adapter method)")
    full = get_method(job.method.name).trains_base_weights
    if name in NEEDS_REFERENCE and full and job.backend.name == "deepspeed" and job.backend.zero_stage == 3:
        raise ConfigError("backend.zero_stage", f"{name} with full fine-tuning computes the reference log-probs "
                          "from the base weights before the first step, and ZeRO-3 partitions them while the model "
                          "loads (no whole model exists before the engine)",
                          "use zero_stage: 2, an adapter method (lora, svf, ...), or the reference-free simpo/orpo")


# --------------------------------------------------------------------------- batches and loss


def sequence_logps(model, batch):
    """Summed completion-token log-probs and completion lengths, one per sequence."""
    from trl.trainer.utils import selective_log_softmax

    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # prompt/p-tuning prepend virtual-token positions to the logits: keep the real ones
    logits = logits[:, -labels.size(1):][:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    token_lp = selective_log_softmax(logits.float(), target.clamp(min=0))
    return (token_lp * mask).sum(1), mask.sum(1).clamp(min=1)


class Collator:
    """Pads a batch into one forward: pairs -> [all chosen; all rejected]; kto -> [the rows;
    their mismatched (KL) completions]. Right padding, labels -100 off the completion."""

    def __init__(self, pad_id: int, kto: bool):
        self.pad_id, self.kto = pad_id, kto

    def __call__(self, items: list[dict]):
        import torch

        from raylib.data import IGNORE

        if self.kto:
            seqs = [(it["prompt"], it["completion"]) for it in items] + [(it["prompt"], it["kl_completion"]) for it in items]
        else:
            seqs = [(it["prompt"], it["chosen"]) for it in items] + [(it["prompt"], it["rejected"]) for it in items]
        width = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (p, c) in enumerate(seqs):
            n = len(p) + len(c)
            ids[i, :n] = torch.tensor(p + c)
            labels[i, len(p):n] = torch.tensor(c)
            attn[i, :n] = 1
        out = {"input_ids": ids, "attention_mask": attn, "labels": labels, "num_tokens": attn.sum()}
        if self.kto:
            out["desirable"] = torch.tensor([it["label"] for it in items], dtype=torch.bool)
        if "ref_logps" in items[0]:  # precomputed (full fine-tuning)
            out["ref_logps"] = torch.tensor([it["ref_logps"][0] for it in items] + [it["ref_logps"][1] for it in items])
        return out


class PreferenceObjective:
    """What the worker loop needs: prepare, collator, loss, evaluate (see train_loop.run)."""

    #: the model the loop loads: a causal LM (None) or one with a scalar score head ("reward")
    model_head: str | None = None

    def __init__(self, job):
        self.job, self.opts = job, job.objective
        self.kto = self.opts.name == "kto"

    # data
    def prepare(self, job, tokenizer, model=None, device=None):
        from raylib import data as data_mod

        report = data_mod.DataReport()
        rows = load_valid_rows(job, "train", report)
        if job.data.eval:
            eval_rows = load_valid_rows(job, "eval")
        else:
            rows, eval_rows = data_mod.split_rows(rows, job.data.eval_split, job.train.seed)
        train, evals = encode(rows, job, tokenizer, report), encode(eval_rows, job, tokenizer)
        random.Random(job.train.seed).shuffle(train)
        report.train_examples, report.eval_examples, report.train_sequences = len(train), len(evals), len(train)
        report.train_tokens = sum(len(it["prompt"]) + len(it.get("chosen", it.get("completion", []))) for it in train)
        if not train:
            raise DataError("data.max_length", f"no preference row fits in {job.data.max_length} tokens "
                            f"({report.summary()})", "raise data.max_length or set data.too_long: truncate")
        if self.opts.name in NEEDS_REFERENCE and model is not None and not has_builtin_base(model):
            collator = self.collator(job, tokenizer)
            for items in (train, evals):
                _precompute_reference(model, items, collator, job.train.batch_size, device)
        return data_mod.Prepared(train, evals, report)

    def collator(self, job, tokenizer):
        return Collator(tokenizer.pad_token_id, self.kto)

    # loss
    def _reference(self, model, batch):
        import torch

        from raylib.methods.reference import frozen_base

        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad(), frozen_base(model) as base:
            return sequence_logps(base, batch)[0]

    def losses(self, model, batch):
        """Per-example losses and (chosen, rejected) rewards of a batch (kto: per row)."""
        import torch
        import torch.nn.functional as F

        o = self.opts
        ref = self._reference(model, batch) if o.name in NEEDS_REFERENCE else None
        logps, lengths = sequence_logps(model, batch)
        if self.kto:
            n = logps.size(0) // 2
            ratio = logps[:n] - ref[:n]
            z0 = (logps[n:] - ref[n:]).mean().clamp(min=0).detach()
            desirable = batch["desirable"]
            loss = torch.where(desirable, o.desirable_weight * (1 - torch.sigmoid(o.beta * (ratio - z0))),
                               o.undesirable_weight * (1 - torch.sigmoid(o.beta * (z0 - ratio))))
            return loss, o.beta * ratio.detach(), desirable
        pc, pr = logps.chunk(2)
        lc, lr = lengths.chunk(2)
        if o.name == "dpo":
            rc, rr = ref.chunk(2)
            if o.loss_type == "ipo":
                loss = ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * o.beta)) ** 2
            else:
                logits = o.beta * ((pc - rc) - (pr - rr))
                loss = -(1 - o.label_smoothing) * F.logsigmoid(logits) - o.label_smoothing * F.logsigmoid(-logits)
            return loss, o.beta * (pc - rc).detach(), o.beta * (pr - rr).detach()
        mc, mr = pc / lc, pr / lr  # mean token log-probs
        if o.name == "simpo":
            loss = -F.logsigmoid(o.beta * (mc - mr) - o.gamma)
        else:  # orpo: log odds(p) = log p − log(1 − p) on the mean token probability
            log_odds = (mc - mr) - (torch.log1p(-torch.exp(mc).clamp(max=1 - 1e-6))
                                    - torch.log1p(-torch.exp(mr).clamp(max=1 - 1e-6)))
            loss = -mc - o.beta * F.logsigmoid(log_odds)
        return loss, o.beta * mc.detach(), o.beta * mr.detach()

    def loss(self, model, batch):
        return self.losses(model, batch)[0].mean()

    # eval
    def evaluate(self, model, items: list[dict], collator, batch_size: int, rank: int, world: int, device, reduce_sum,
                 lockstep: bool = False) -> dict:
        """Mean loss, reward accuracy and margin over `items`, each worker its shard, summed."""
        import torch

        from raylib.data import eval_batches

        totals = torch.zeros(6, dtype=torch.float64, device=device)  # loss, n, correct, chosen r, rejected r, n_rej
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for part, counted in eval_batches(items, batch_size, rank, world, lockstep):
                batch = collator(part)
                batch.pop("num_tokens")
                batch = {k: v.to(device) for k, v in batch.items()}
                loss, a, b_ = self.losses(model, batch)
                if not counted:
                    continue
                totals[0] += loss.sum()
                totals[1] += loss.numel()
                if self.kto:  # a: rewards, b_: desirable
                    totals[2] += ((a > 0) == b_).logical_and(a != 0).sum()
                    totals[3] += a[b_].sum()
                    totals[4] += a[~b_].sum()
                    totals[5] += (~b_).sum()
                else:
                    totals[2] += (a > b_).sum()
                    totals[3] += a.sum()
                    totals[4] += b_.sum()
                    totals[5] += b_.numel()
        if was_training:
            model.train()
        t = reduce_sum(totals)
        n = max(t[1].item(), 1.0)
        n_chosen = n - t[5].item() if self.kto else n
        chosen, rejected = t[3].item() / max(n_chosen, 1.0), t[4].item() / max(t[5].item(), 1.0)
        return {"eval_loss": t[0].item() / n, "eval_reward_accuracy": t[2].item() / n,
                "eval_reward_margin": chosen - rejected, "eval_chosen_reward": chosen, "eval_rejected_reward": rejected,
                "eval_pairs": int(n)}


def _precompute_reference(model, items: list[dict], collator, batch_size: int, device) -> None:
    """Full fine-tuning: the base's summed log-probs of every item, before the first step."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            part = items[i:i + batch_size]
            batch = collator(part)
            batch.pop("num_tokens")
            lp, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
            first, second = lp.chunk(2)
            for it, x, y in zip(part, first.tolist(), second.tolist()):
                it["ref_logps"] = (x, y)
    if was_training:
        model.train()


# --------------------------------------------------------------------------- reward models


class RewardObjective(PreferenceObjective):
    """`objective: {name: reward}`: the backbone with a scalar head (transformers'
    `AutoModelForSequenceClassification`, num_labels = 1, the score of the last real token,
    TRL's reward-model layout); loss −log σ(r_c − r_r) (Bradley-Terry), as TRL's RewardTrainer.
    The published expert loads with plain transformers (+ PEFT): a full model or an adapter
    whose `modules_to_save` holds the head. Eval: accuracy and margin of r_c over r_r."""

    model_head = "reward"

    def losses(self, model, batch):
        import torch.nn.functional as F

        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).logits[:, 0].float()
        rc, rr = rewards.chunk(2)
        loss = -F.logsigmoid(rc - rr)
        if self.opts.center_rewards_coefficient:
            loss = loss + self.opts.center_rewards_coefficient * (rc + rr) ** 2
        return loss, rc.detach(), rr.detach()


class RewardModelScorer:
    """`reward: model:<expert dir>` for the RL objectives: a trained reward expert scores each
    (prompt, completion) as it scored pairs in training (same template, same tokens)."""

    def __init__(self, expert_dir: str, device="cpu"):
        import torch

        from raylib import models
        from raylib.experts import read_expert
        from raylib.methods import get_method

        info = read_expert(expert_dir)
        if (info.config.get("objective") or {}).get("name") != "reward":
            raise ConfigError("objective.reward", f"{expert_dir!r} is not a reward model (its objective is "
                              f"{(info.config.get('objective') or {}).get('name', 'sft')!r})",
                              "train one with objective: {name: reward}, or use a built-in reward")
        self.template, self.device = info.template, torch.device(device)
        self.tokenizer = models.tokenizer_at(expert_dir)
        base = models.load_reward_model(info.base_model, self.device)
        base.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = get_method(info.method).load(base, expert_dir).to(self.device).eval()
        self.name = f"model:{expert_dir}"

    def __call__(self, completion: str, row: dict) -> float:
        return self.score_batch([completion], [row])[0]

    def score_batch(self, completions: list[str], rows: list[dict]) -> list[float]:
        import torch

        from raylib.evaluation import final_answer

        seqs = []
        for completion, row in zip(completions, rows):
            prompt = row.get("prompt") or {"instruction": row.get("instruction", ""), "input": row.get("input") or ""}
            prompt_ids, messages = _prompt_ids(prompt, self.template, self.tokenizer)
            seqs.append(prompt_ids + _answer_ids(final_answer(completion), prompt_ids, messages, self.template,
                                                 self.tokenizer))
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, :len(x)], attn[i, :len(x)] = torch.tensor(x), 1
        with torch.no_grad():
            out = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits[:, 0]
        return out.float().tolist()
