"""Training objectives, selected by `objective.name`.

An objective decides what a batch looks like and how the loss is computed. The SFT
objective (next-token loss on the response) is the default.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class SFTOptions(BaseModel):
    """Supervised fine-tuning: next-token cross-entropy on the response tokens."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["sft"] = "sft"


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
#: objectives trained by the shared worker loop (train_loop.run); the RL ones run their own
WORKER_LOOP_OBJECTIVES = ("sft", "classification", *PREFERENCE_OBJECTIVES)
ObjectiveOptions = (
    Annotated[Union[tuple(OBJECTIVE_OPTIONS)], Field(discriminator="name")] if len(OBJECTIVE_OPTIONS) > 1 else SFTOptions
)


def loop_objective(job):
    """What the SFT-style worker loop (train_loop.run) uses for data, loss and eval: an
    object with prepare(job, tokenizer, model, device), collator(job, tokenizer), loss(model,
    batch) and evaluate(...). RL objectives run their own loops instead."""
    name = job.objective.name
    if name == "reward":
        from raylib.objectives.preference import RewardObjective

        return RewardObjective(job)
    if name in PREFERENCE_OBJECTIVES:
        from raylib.objectives.preference import PreferenceObjective

        return PreferenceObjective(job)
    if name == "classification":
        from raylib.objectives import classification

        return classification
    from raylib.objectives import sft

    return sft


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
    from raylib import data

    return data.preflight(job, tokenizer)


def check_objective(job) -> None:
    """Objective/method pairings that cannot work (driver side, before Ray)."""
    from raylib.errors import ConfigError

    if job.objective.name == "classification" and job.method.name != "heads":
        raise ConfigError("method.name", f"objective classification trains classification heads; {job.method.name!r} has none",
                          "set method.name: heads (with method.tasks), or objective.name: sft")
    if job.objective.name in PREFERENCE_OBJECTIVES:
        from raylib.objectives import preference

        preference.check(job)
    if job.method.name == "adalora" and job.objective.name in ("reinforce", "ppo", "grpo"):
        # the RL loops neither call the rank allocator nor compute PEFT's labelled loss (orth reg)
        raise ConfigError("method.name", f"adalora is not wired into the {job.objective.name} loop (no rank allocation)",
                          "use method.name: lora for RL objectives, or objective.name: sft")
