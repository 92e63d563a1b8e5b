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
ObjectiveOptions = (
    Annotated[Union[tuple(OBJECTIVE_OPTIONS)], Field(discriminator="name")] if len(OBJECTIVE_OPTIONS) > 1 else SFTOptions
)
