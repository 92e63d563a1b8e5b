"""The OpenAI-compatible wire format: request schemas, limits, responses, SSE chunks, errors.

Routes take these models as their bodies (FastAPI validates them); every 4xx is in OpenAI's
error shape `{"error": {"message", "type": "invalid_request_error", "param": <field>, "code"}}`
(`ApiError`; `from_validation_error` turns FastAPI's errors into it). Unknown request fields
are ignored (clients send many optional ones), but fields whose effect this server cannot give
(`tools`, `response_format` other than text, penalties, ...) are a 400 naming the field: never
silently dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raylib.serve.config import AUTO, BASE, Limits


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


#: fields clients may send that this server cannot honour: a 400 naming the field, never a
#: silent no-op. Each maps to the values that mean "not used" (those pass).
UNSUPPORTED: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True), "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "suffix": (None, ""), "echo": (None, False), "best_of": (None, 1),
}
WHY = {"tools": "no tool calling", "tool_choice": "no tool calling", "functions": "no tool calling",
       "function_call": "no tool calling", "response_format": "no guided decoding (only {\"type\": \"text\"})"}


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = AUTO
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: dict | None = None
    #: choices per prompt; with a seed, choice i samples with seed + i
    n: int = Field(1, ge=1)
    #: same seed, same settings -> same text (sampling runs alone, seeded, on the replica)
    seed: int | None = None
    #: raylib extension: with model "mix", the experts to mix and their weights
    experts: dict[str, float] | None = None
    #: LoRA mixes: PEFT add_weighted_adapter combination_type (SVF mixes are always linear)
    combination: Literal["linear", "cat"] = "linear"

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data):
        """An ApiError (not a ValueError) passes through pydantic with its own param."""
        if isinstance(data, dict):
            _refuse_unsupported(data)
            _refuse_token_ids(data, "prompt")
        return data

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives per token to return (None: no logprobs). Chat and completions
        spell logprobs differently and override this."""
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    #: a string or a list of text parts ({"type": "text", "text": ...}), joined with newlines
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        if v is None:
            return ""
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i} is {kind!r}: this server takes text parts "
                                     '({"type": "text", "text": ...}) only')
                texts.append(part["text"])
            return "\n".join(texts)
        return v


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def top_logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: set logprobs to true as well", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Req):
    #: one prompt or a list of them (each gets n choices); token-id prompts are refused
    prompt: Union[str, list[str]]
    logprobs: int | None = Field(None, ge=0, le=5)

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: vectors from the base model (see Engine.embed for the pooling)."""

    model_config = ConfigDict(extra="ignore")
    input: Union[str, list[str]]
    model: str = BASE
    encoding_format: Literal["float", "base64"] = "float"

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data):
        if isinstance(data, dict):
            _refuse_token_ids(data, "input")
            if data.get("dimensions") is not None:
                raise ApiError(400, "dimensions: not supported (the vectors have the base model's hidden size); "
                                    "remove the field", param="dimensions", code="unsupported_parameter")
        return data

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def _refuse_unsupported(data: dict) -> None:
    for name, unused in UNSUPPORTED.items():
        if name in data and data[name] not in unused:
            why = WHY.get(name, "this server does not implement it")
            raise ApiError(400, f"{name}: not supported ({why}); remove the field", param=name,
                           code="unsupported_parameter")


def _refuse_token_ids(data: dict, field: str) -> None:
    value = data.get(field)
    if isinstance(value, list) and any(not isinstance(x, str) for x in value):
        raise ApiError(400, f"{field}: token-id input is not supported; send text (a string or a list of strings)",
                       param=field)


def from_validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's RequestValidationError -> a 400 naming the first bad field."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in err.get("loc", ())]
    if loc and loc[0] == "body":
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                        code="invalid_json")
    if not loc and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return ApiError(400, "the body must be a JSON object", code="invalid_json")
    field = ".".join(loc) or None
    return ApiError(400, f"{field}: {err['msg']}" if field else err["msg"], param=field)


def check_body_size(size: int, limits: Limits) -> None:
    if size > limits.max_body_bytes:
        raise ApiError(413, f"request body is {size} bytes; the limit is {limits.max_body_bytes}",
                       code="body_too_large")


def check_choices(req: _Req, limits: Limits) -> None:
    """Limits that need the server's config: prompts x n, and what streams cannot carry."""
    prompts = len(req.prompts) if isinstance(req, CompletionRequest) else 1
    if prompts == 0:
        raise ApiError(400, "prompt: the list is empty", param="prompt")
    if prompts * req.n > limits.max_choices:
        raise ApiError(400, f"n: {prompts} prompt(s) x n={req.n} choices is above this server's cap of "
                            f"{limits.max_choices}", param="n")
    if req.stream:
        if req.n > 1:
            raise ApiError(400, "n: streaming returns one choice; set n to 1 or stream to false", param="n")
        if prompts > 1:
            raise ApiError(400, "prompt: stream one prompt at a time", param="prompt")
        if req.top_logprobs_wanted() is not None:
            raise ApiError(400, "logprobs: not returned on streams; set stream to false for logprobs", param="logprobs")
    else:
        req.top_logprobs_wanted()  # argument errors now, not after generating


def max_tokens(req: _Req, limits: Limits) -> int:
    n = getattr(req, "max_completion_tokens", None) or req.max_tokens
    field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if n is None:
        return min(limits.default_max_tokens, limits.max_tokens)
    if n < 1:
        raise ApiError(400, f"{field}: must be at least 1, got {n}", param=field)
    if n > limits.max_tokens:
        raise ApiError(400, f"{field}: {n} is above this server's cap of {limits.max_tokens}", param=field)
    return n


def stops(req: _Req, limits: Limits) -> list[str]:
    s = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(s) > limits.max_stop:
        raise ApiError(400, f"stop: at most {limits.max_stop} stop sequences", param="stop")
    if any(not x for x in s):
        raise ApiError(400, "stop: empty stop sequence", param="stop")
    return s


def request_text(req: _Req, prompt: str | None = None) -> str:
    """What the router classifies: the last user message (chat) or the prompt."""
    if isinstance(req, ChatRequest):
        users = [m.content for m in req.messages if m.role == "user"]
        return users[-1] if users else req.messages[-1].content
    return req.prompts[0] if prompt is None else prompt  # type: ignore[union-attr]


def _usage(results: list[dict]) -> dict:
    """Prompt tokens count once per prompt (n choices share it), completion tokens per choice."""
    prompts: dict[int, int] = {}
    for r in results:
        prompts[r.get("prompt_index", 0)] = int(r["prompt_tokens"])
    p, c = sum(prompts.values()), sum(int(r["completion_tokens"]) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """The engine's [{token, logprob, top: [[token, logprob], ...]}] in chat's shape."""
    if entries is None:
        return None
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": _bytes(e["token"]),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": _bytes(t)} for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict] | None) -> dict | None:
    """... in the legacy completions shape (tokens, token_logprobs, top_logprobs, text_offset)."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}


def _model(results: list[dict]) -> str:
    experts = {r["expert"] for r in results}
    return results[0]["expert"] if len(experts) == 1 else AUTO


def chat_response(results: list[dict], routing: dict) -> dict:
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": _model(results),
        "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                     "finish_reason": r["finish_reason"], "logprobs": chat_logprobs(r.get("logprobs"))}
                    for i, r in enumerate(results)],
        "usage": _usage(results), "expert": _model(results), "routing": routing,
    }


def completion_response(results: list[dict], routing: dict | list) -> dict:
    """Choices in prompt order, n per prompt (index = prompt_index * n + j, as OpenAI orders them)."""
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": _model(results),
        "choices": [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"],
                     "logprobs": completion_logprobs(r.get("logprobs")), "expert": r["expert"]}
                    for i, r in enumerate(results)],
        "usage": _usage(results), "expert": _model(results), "routing": routing,
    }


def embedding_response(vectors: list[list[float]], tokens: int, model: str, encoding_format: str) -> dict:
    import base64
    import struct

    def encode(v):
        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if encoding_format == "base64" else v

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class ChunkWriter:
    """SSE `data:` lines for one streamed answer (chat.completion.chunk / text_completion)."""

    def __init__(self, chat: bool, expert: str, include_usage: bool):
        self.chat, self.expert, self.include_usage = chat, expert, include_usage
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _event(self, choices: list, **extra) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.expert, "choices": choices, "expert": self.expert, **extra}
        return f"data: {json.dumps(obj)}\n\n".encode()

    def start(self) -> bytes | None:
        if self.chat:
            return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        return None

    def delta(self, text: str) -> bytes:
        if self.chat:
            return self._event([{"index": 0, "delta": {"content": text}, "finish_reason": None}])
        return self._event([{"index": 0, "text": text, "finish_reason": None, "logprobs": None}])

    def end(self, final: dict) -> list[bytes]:
        if self.chat:
            out = [self._event([{"index": 0, "delta": {}, "finish_reason": final["finish_reason"]}])]
        else:
            out = [self._event([{"index": 0, "text": "", "finish_reason": final["finish_reason"], "logprobs": None}])]
        if self.include_usage:
            out.append(self._event([], usage=_usage([final])))
        return out + [b"data: [DONE]\n\n"]

    @staticmethod
    def error(err: ApiError) -> bytes:
        return f"data: {json.dumps(err.body())}\n\n".encode()
