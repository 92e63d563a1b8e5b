"""The request an expert replica's engine answers: built once by the router from the OpenAI
body (after routing and limits), it travels as this object through the DeploymentHandle to
the replica and into the engine and its scheduler, unchanged."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expert: str
    #: completion: `prompt` as is; chat: `messages` in the expert's training template
    kind: Literal["completion", "chat"] = "completion"
    prompt: str = ""
    messages: list[dict] = Field(default_factory=list)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    #: expert -> weight: serve a weighted mix of experts
    mix: dict[str, float] | None = None
    #: LoRA mixes: PEFT add_weighted_adapter combination_type
    combination: Literal["linear", "cat"] = "linear"
    #: run-time experts (name -> path/URI) the router knows: a replica loads them on first use
    registry: dict[str, str] | None = None
    #: sampling: the same seed gives the same text, whatever the request is batched with
    seed: int | None = None
    #: None: no logprobs; k: each token's logprob and its k most likely alternatives
    logprobs: int | None = Field(None, ge=0)

    @classmethod
    def of(cls, raw: "dict | GenRequest") -> "GenRequest":
        """A copy (the engine resolves `expert` of mixes in place), from a dict for Python callers."""
        return raw.model_copy() if isinstance(raw, GenRequest) else cls.model_validate(raw)
