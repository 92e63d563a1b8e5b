"""The OpenAI-compatible wire format: request schemas, limits, responses, SSE chunks, errors.

Requests are parsed by hand from the raw body (size checked first), then validated with
pydantic, so every 4xx says what was wrong in OpenAI's error shape:
`{"error": {"message": ..., "type": "invalid_request_error", "param": <field>, "code": ...}}`.
Unknown request fields are ignored (clients send many optional ones).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raylib.serve.config import AUTO, Limits


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = AUTO
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    #: raylib extension: with model "mix", the experts to mix and their weights
    experts: dict[str, float] | None = None
    #: LoRA mixes: PEFT add_weighted_adapter combination_type (SVF mixes are always linear)
    combination: Literal["linear", "cat"] = "linear"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Req):
    prompt: Union[str, list[str]]


def parse(raw: bytes, schema: type[_Req], limits: Limits) -> _Req:
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {limits.max_body_bytes}", code="body_too_large")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        req = schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{field}: {err['msg']}" if field else err["msg"], param=field) from None
    if isinstance(req, CompletionRequest) and isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise ApiError(400, "prompt: send one prompt per request", param="prompt")
        req.prompt = req.prompt[0]
    return req


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


def request_text(req: _Req) -> str:
    """What the router classifies: the last user message (chat) or the prompt."""
    if isinstance(req, ChatRequest):
        users = [m.content for m in req.messages if m.role == "user"]
        return users[-1] if users else req.messages[-1].content
    return req.prompt  # type: ignore[return-value]


def _usage(res: dict) -> dict:
    p, c = int(res["prompt_tokens"]), int(res["completion_tokens"])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(res: dict, routing: dict) -> dict:
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": res["expert"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": res["text"]},
                     "finish_reason": res["finish_reason"], "logprobs": None}],
        "usage": _usage(res), "expert": res["expert"], "routing": routing,
    }


def completion_response(res: dict, routing: dict) -> dict:
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": res["expert"],
        "choices": [{"index": 0, "text": res["text"], "finish_reason": res["finish_reason"], "logprobs": None}],
        "usage": _usage(res), "expert": res["expert"], "routing": routing,
    }


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
            out.append(self._event([], usage=_usage(final)))
        return out + [b"data: [DONE]\n\n"]

    @staticmethod
    def error(err: ApiError) -> bytes:
        return f"data: {json.dumps(err.body())}\n\n".encode()
