"""The router deployment: the HTTP ingress (OpenAI-compatible API) that decides which expert
answers and calls it through a DeploymentHandle.

Per request: auth (bearer key) -> body size / JSON / schema / limits (4xx with a message) ->
model choice (`model` names an expert or `base` -> that one; `auto` -> the routing strategy;
unknown domain -> `router.fallback`) -> expert call. A failed call (replica died, none
available) is retried with backoff while Serve restarts the replica, then falls back to the
fallback model, so clients see an answer rather than an error. The response names the expert
in `model`, `expert`, `routing` and the `x-raylib-expert` header.
"""


import asyncio
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from serve import openai_api as api
from serve.config import AUTO, BASE, ServeConfig

log = logging.getLogger("raylib.serve")
app = FastAPI(title="raylib serve", docs_url=None, redoc_url=None)
EXPERT_HEADER = "x-raylib-expert"


def _retryable() -> tuple[type[BaseException], ...]:
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    return (rex.RayActorError, rex.ActorUnavailableError, sex.BackPressureError, sex.DeploymentUnavailableError,
            sex.ReplicaUnavailableError)


@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, config: dict, deployments: dict, model_to_deployment: dict[str, str]):
        from transformers import AutoTokenizer

        from serve.strategies import build_strategy

        self.cfg = ServeConfig.model_validate(config)
        self.handles = deployments
        self.where = model_to_deployment  # model name (experts + base) -> key in self.handles
        self.experts = [n for n in model_to_deployment if n != BASE]
        self.strategy = build_strategy(self.cfg, self.experts)
        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.base_model)
        self.key = self.cfg.resolved_api_key()
        self.stats = {"requests": 0, "retries": 0, "fallbacks": 0, "errors_4xx": 0}
        self.created = int(time.time())

    # ------------------------------------------------------------------ plumbing

    def _auth(self, request: Request) -> None:
        if not self.key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            raise api.ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)",
                               code="invalid_api_key", type="authentication_error")

    def _error(self, err: api.ApiError) -> JSONResponse:
        self.stats["errors_4xx"] += 1
        return JSONResponse(err.body(), status_code=err.status)

    def choose(self, req) -> tuple[str, dict]:
        """(model that answers, routing detail)."""
        if req.model != AUTO:
            if req.model not in self.where:
                raise api.ApiError(404, f"model {req.model!r} does not exist; use auto or one of "
                                        f"{sorted(self.where)}", param="model", code="model_not_found")
            return req.model, {"strategy": "explicit", "requested": req.model}
        name, detail = self.strategy.route(api.request_text(req))
        routing = {"strategy": self.strategy.name, **detail}
        if name is None or name not in self.where:
            routing["unknown_domain"] = True
            name = self.cfg.router.fallback
        return name, routing

    def _payload(self, req, expert: str) -> dict:
        limits = self.cfg.limits
        text = api.request_text(req) if isinstance(req, api.CompletionRequest) else "\n".join(
            m.content for m in req.messages)
        n = len(self.tokenizer(text)["input_ids"])
        if n > limits.max_prompt_tokens:
            raise api.ApiError(400, f"the prompt is {n} tokens; this server's limit is {limits.max_prompt_tokens}",
                               param="messages" if isinstance(req, api.ChatRequest) else "prompt",
                               code="context_length_exceeded")
        payload = {"expert": expert, "max_tokens": api.max_tokens(req, limits), "temperature": req.temperature,
                   "top_p": req.top_p, "stop": api.stops(req, limits)}
        if isinstance(req, api.ChatRequest):
            payload.update(kind="chat", messages=[m.model_dump() for m in req.messages])
        else:
            payload.update(kind="completion", prompt=req.prompt)
        return payload

    def _handle(self, name: str):
        return self.handles[self.where[name]]

    async def _call(self, payload: dict, routing: dict) -> dict:
        """generate on the chosen expert; retried with backoff (Serve restarts a dead replica
        meanwhile), then once on the fallback model."""
        r, primary = self.cfg.router, payload["expert"]
        last: BaseException | None = None
        for i in range(r.retries + 1):
            try:
                return await self._handle(primary).generate.remote(payload)
            except _retryable() as exc:
                last = exc
                self.stats["retries"] += 1
                log.warning("expert %s failed (%s), try %d/%d", primary, type(exc).__name__, i + 1, r.retries + 1)
                await asyncio.sleep(r.retry_backoff_s * (i + 1))
        if r.fallback == primary:
            raise RuntimeError(f"{primary} could not answer: {last}")
        self.stats["fallbacks"] += 1
        routing["fallback"] = {"from": primary, "reason": type(last).__name__}
        return await self._handle(r.fallback).generate.remote({**payload, "expert": r.fallback})

    async def _complete(self, request: Request, schema) -> object:
        self.stats["requests"] += 1
        try:
            self._auth(request)
            req = api.parse(await request.body(), schema, self.cfg.limits)
            expert, routing = self.choose(req)
            payload = self._payload(req, expert)
        except api.ApiError as err:
            return self._error(err)
        chat = schema is api.ChatRequest
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._sse(payload, chat, include_usage), media_type="text/event-stream",
                                     headers={EXPERT_HEADER: expert})
        res = await self._call(payload, routing)
        body = (api.chat_response if chat else api.completion_response)(res, routing)
        return JSONResponse(body, headers={EXPERT_HEADER: res["expert"]})

    async def _sse(self, payload: dict, chat: bool, include_usage: bool):
        """Stream from the expert; a failure before the first token is retried (then the
        fallback), as for non-streaming calls; after it, the stream ends with an error event."""
        r = self.cfg.router
        names = [payload["expert"]] * (r.retries + 1) + ([r.fallback] if r.fallback != payload["expert"] else [])
        for i, name in enumerate(names):
            writer = api.ChunkWriter(chat, name, include_usage)
            started = False
            try:
                gen = self._handle(name).options(stream=True).stream.remote({**payload, "expert": name})
                async for item in gen:
                    if not started:
                        started = True
                        first = writer.start()
                        if first:
                            yield first
                    if "delta" in item:
                        yield writer.delta(item["delta"])
                    else:
                        for line in writer.end(item):
                            yield line
                return
            except _retryable() as exc:
                self.stats["retries"] += 1
                if started:
                    yield writer.error(api.ApiError(503, f"the expert failed mid-stream: {type(exc).__name__}",
                                                    type="server_error"))
                    return
                await asyncio.sleep(r.retry_backoff_s * (i + 1))
        yield api.ChunkWriter.error(api.ApiError(503, "no expert could answer", type="server_error"))

    # ------------------------------------------------------------------ routes

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(request, api.ChatRequest)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, api.CompletionRequest)

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._auth(request)
        except api.ApiError as err:
            return self._error(err)
        data = [{"id": AUTO, "object": "model", "created": self.created, "owned_by": "raylib",
                 "routing": self.strategy.name}]
        data += [{"id": n, "object": "model", "created": self.created, "owned_by": "raylib",
                  "deployment": self.where[n]} for n in sorted(self.where)]
        return {"object": "list", "data": data}

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "experts": self.experts, "strategy": self.strategy.name}

    @app.get("/v1/stats")
    async def get_stats(self, request: Request):
        try:
            self._auth(request)
        except api.ApiError as err:
            return self._error(err)
        return self.stats

    # handle entry points (benchmarks / Python callers skip HTTP)
    async def route_and_generate(self, payload: dict) -> dict:
        """`payload` as an expert takes it, with expert=auto allowed: route, then call."""
        if payload.get("expert", AUTO) == AUTO:
            text = payload.get("prompt") or payload["messages"][-1]["content"]
            name, _ = self.strategy.route(text)
            payload = {**payload, "expert": name if name in self.where else self.cfg.router.fallback}
        return await self._call(payload, {})
