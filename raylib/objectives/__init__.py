"""Training objectives, selected by `objective.name`.

An objective decides what a batch looks like and how the loss is computed. The SFT
objective (next-token loss on the response) is the default.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


LOSS_FIELD = Field(None, description="package.module:function — fn(model_output, batch) -> loss, used instead "
                   "of the built-in loss in training (eval keeps the objective's own metrics)")


class SFTOptions(BaseModel):
    """Supervised fine-tuning: next-token cross-entropy on the response tokens."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["sft"] = "sft"
    loss: str | None = LOSS_FIELD


def _rl_options() -> list:
    from raylib.objectives.rl import GRPOOptions, PPOOptions, ReinforceOptions

    return [ReinforceOptions, PPOOptions, GRPOOptions]


OBJECTIVE_OPTIONS = [SFTOptions]
OBJECTIVE_OPTIONS += _rl_options()  # issue 5: reinforce, ppo, grpo (raylib/objectives/rl.py)


def _classification_options() -> list:
    from raylib.objectives.classification import ClassificationOptions

    return [ClassificationOptions]


OBJECTIVE_OPTIONS += _classification_options()  # issue 4: heads (raylib/objectives/classification.py)


def _preference_options() -> list:
    from raylib.objectives.preference import OPTIONS

    return OPTIONS


OBJECTIVE_OPTIONS += _preference_options()  # issue 16: dpo, orpo, simpo, kto, reward (objectives/preference.py)

#: pairwise/binary preference objectives and reward models (raylib/objectives/preference.py)
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo", "kto", "reward")
#: objectives whose optimizer step is over batches of their data (train_loop.BatchSteps); reinforce
#: and ppo step by rollouts (objectives.rl.RolloutSteps), both in `recipe.fit`; grpo runs in TRL
BATCH_OBJECTIVES = ("sft", "classification", *PREFERENCE_OBJECTIVES)
ObjectiveOptions = (
    Annotated[Union[tuple(OBJECTIVE_OPTIONS)], Field(discriminator="name")] if len(OBJECTIVE_OPTIONS) > 1 else SFTOptions
)


class CustomLoss:
    """`objective.loss`: the objective's data, batches and eval, the user's training loss.
    `fn(model_output, batch)` gets the model's output for the batch without its labels (so
    transformers computes no loss of its own) and the whole batch (labels included: -100 off
    the trained tokens; classification: `labels` and `task_ids`, logits per task). Under
    prompt learning the logits carry the virtual tokens' positions in front."""

    def __init__(self, base, spec: str):
        self.base, self.spec, self._fn = base, spec, None

    def __getattr__(self, name):  # prepare, collator, evaluate, model_head: the objective's own
        return getattr(self.base, name)

    def loss(self, model, batch):
        if self._fn is None:
            self._fn = load_loss(self.spec)
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        loss = self._fn(out, batch)
        if isinstance(out.logits, dict):  # heads: every head stays in the graph, so DDP sees all grads
            loss = loss + sum(0.0 * logits.sum() for logits in out.logits.values())
        return loss


def load_loss(spec: str):
    """`package.module:function` -> the function, checked: importable, callable, and callable
    as fn(model_output, batch). Raises ConfigError naming objective.loss."""
    import inspect

    from raylib.errors import ConfigError

    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError("objective.loss", f"{spec!r} is not a 'package.module:function' path",
                          "write it as my_pkg.losses:focal_loss")
    fn = import_function(spec, "objective.loss")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError as exc:
        raise ConfigError("objective.loss", f"{spec!r} cannot be called as fn(model_output, batch): {exc}",
                          "give it two positional parameters: def loss(model_output, batch)") from exc
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    return fn


def import_function(spec: str, field: str):
    """The callable a `package.module:function` path names (custom losses, reward functions),
    or a ConfigError on `field` saying why not."""
    import importlib

    from raylib.errors import ConfigError

    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(field, f"cannot import {spec!r}: {exc}",
                          "make the module importable on the driver and the workers (PYTHONPATH or runtime_env)") from exc
    if not callable(fn):
        raise ConfigError(field, f"{spec!r} is not callable", "point it at a function")
    return fn


def loop_objective(job):
    """What a batch objective's step (train_loop.BatchSteps) uses for data, loss and eval: an
    object with prepare(job, tokenizer, model, device), collator(job, tokenizer), loss(model,
    batch) and evaluate(...). reinforce/ppo step by rollouts instead (objectives.rl)."""
    name = job.objective.name
    if name == "reward":
        from raylib.objectives.preference import RewardObjective

        return RewardObjective(job)
    if name in PREFERENCE_OBJECTIVES:
        from raylib.objectives.preference import PreferenceObjective

        return PreferenceObjective(job)
    if name == "classification":
        from raylib.objectives import classification as base

        if job.objective.labels:  # transformers' ...ForSequenceClassification over the labels
            base = base.SequenceClassification(job)
    else:
        from raylib import models

        if models.family(job.model) == "seq2seq":
            from raylib.objectives import seq2seq as base
        else:
            from raylib.objectives import sft as base
    return CustomLoss(base, job.objective.loss) if job.objective.loss else base


def eval_metrics(job) -> list[str]:
    """The metrics the objective's eval reports during training (what early stopping and
    `publish: best` can watch); grpo (TRL's loop) reports none."""
    name = job.objective.name
    if name == "sft":
        return ["eval_loss", "eval_token_accuracy"]
    if name == "classification":
        per_task = [f"eval_{t}_{m}" for t in getattr(job.method, "tasks", None) or {} for m in ("accuracy", "macro_f1")]
        return ["eval_loss", "eval_accuracy", "eval_macro_f1", *per_task]
    if name in PREFERENCE_OBJECTIVES:
        return ["eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_chosen_reward", "eval_rejected_reward"]
    if name in ("reinforce", "ppo"):
        return ["eval_reward"]
    return []


def preflight(job, tokenizer=None):
    """Driver-side data check for the job's objective, before Ray starts (a DataReport):
    classification rows (text, task, label), preference rows (prompt, chosen, rejected), or
    the instruction/chat/plain rows of sft and RL (`raylib.data.preflight`)."""
    if job.objective.name == "classification":
        from raylib.objectives import classification

        return classification.preflight(job)
    if job.objective.name in PREFERENCE_OBJECTIVES:
        from raylib.objectives import preference

        return preference.preflight(job)
    from raylib import data, ingest

    # streamed data is read whole on the cluster (ingest.build): here a sample
    return data.preflight(job, tokenizer, sample=ingest.PREFLIGHT_ROWS if ingest.resolve(job) == "ray" else None)


def check_objective(job) -> None:
    """Objective/method pairings that cannot work, and a custom loss that cannot be called
    (driver side, before Ray)."""
    from raylib.errors import ConfigError

    if getattr(job.objective, "loss", None):
        load_loss(job.objective.loss)

    if job.objective.name == "classification":
        if job.method.name == "heads" and job.objective.labels:
            raise ConfigError("objective.labels", "method heads lists each task's classes in method.tasks",
                              "remove objective.labels")
        if job.method.name != "heads" and not job.objective.labels:
            raise ConfigError("objective.labels", f"a sequence classifier trained by {job.method.name!r} needs its "
                              "classes", "list them: objective.labels: [negative, positive] (or use method.name: "
                              "heads with method.tasks)")
    if job.objective.name in PREFERENCE_OBJECTIVES:
        from raylib.objectives import preference

        preference.check(job)
    if job.method.name == "adalora" and job.objective.name in ("reinforce", "ppo", "grpo"):
        # the RL loops neither call the rank allocator nor compute PEFT's labelled loss (orth reg)
        raise ConfigError("method.name", f"adalora is not wired into the {job.objective.name} loop (no rank allocation)",
                          "use method.name: lora for RL objectives, or objective.name: sft")
