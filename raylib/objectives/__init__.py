"""Training objectives, selected by `objective.name`.

An objective decides what a batch looks like and how the loss is computed. The SFT
objective (next-token loss on the response) is the default.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict


class SFTOptions(BaseModel):
    """Supervised fine-tuning: next-token cross-entropy on the response tokens."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["sft"] = "sft"


OBJECTIVE_OPTIONS = [SFTOptions]
ObjectiveOptions = Union[tuple(OBJECTIVE_OPTIONS)] if len(OBJECTIVE_OPTIONS) > 1 else SFTOptions
