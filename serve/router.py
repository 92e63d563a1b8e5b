"""The router deployment: the HTTP ingress (OpenAI-compatible API) that decides which expert
answers and calls it through a DeploymentHandle.

Per request: `authorized` (a FastAPI Depends: counted, body size, bearer key) -> the typed
body (pydantic models of openai_api; errors become OpenAI-shaped 4xx in the app's exception
handlers) -> limits ->
model choice (`model` names an expert or `base` -> that one; `auto` -> the routing strategy;
unknown domain -> `router.fallback`; each prompt of a completions list on its own) -> expert
calls, n per prompt, sent together so the replica batches them. A failed call (replica died, none
available) is retried with backoff while Serve restarts the replica, then falls back to the
fallback model, so clients see an answer rather than an error. The response names the expert
in `model`, `expert`, `routing` and the `x-raylib-expert` header.

`model: "mix"` with `experts: {name: weight, ...}` (and `combination` linear|cat for LoRA)
asks for a weighted mix of experts, built and cached by the replica that holds them
(single-device: `experts`; multi-deployment: `base`, which loads the mixed experts into its
own engine on first use).

Admin endpoints (bearer key required; refused with 403 when the app has no key) change the
expert table while the app runs: `POST /admin/experts` {name, path (dir or URI), keywords?}
loads the expert into the replica that holds the base model (`experts` or `base`) in place,
then routes to it; `DELETE /admin/experts/{name}`; `GET /admin/experts` (with expert.json
metrics). Run-time experts travel in every payload's `registry`, so a replica Serve restarts
(or another replica of that deployment) loads them on first use. The table lives in the
router replica, so admin endpoints need `router.num_replicas: 1`.
"""


import asyncio
import hmac
import logging
import math
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from raylib.serve import openai_api as api
from raylib.serve.config import AUTO, BASE, MIX, ServeConfig
from raylib.serve.requests import GenRequest

log = logging.getLogger("raylib.serve")
app = FastAPI(title="raylib serve", docs_url=None, redoc_url=None)
EXPERT_HEADER = "x-raylib-expert"


@app.exception_handler(api.ApiError)
async def _api_error(request: Request, exc: api.ApiError) -> JSONResponse:
    """Every error leaves in OpenAI's shape; 4xx are counted in /v1/stats."""
    router = getattr(request.app.state, "router", None)
    if router is not None and exc.status < 500:
        router.stats["errors_4xx"] += 1
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _api_error(request, api.from_validation_error(exc.errors()))


async def authorized(request: Request) -> None:
    """Depends of every API route, run before the body is validated: the request is counted,
    its size checked against `limits.max_body_bytes`, its bearer key checked."""
    router = request.app.state.router
    router.stats["requests"] += 1
    api.check_body_size(len(await request.body()), router.cfg.limits)
    router.check_key(request)


async def admin_authorized(request: Request) -> None:
    """Depends of the admin routes: the key is required (403 when the app has none)."""
    router = request.app.state.router
    api.check_body_size(len(await request.body()), router.cfg.limits)
    router.check_admin(request)


class AddExpert(BaseModel):
    """POST /admin/experts body."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    path: str = Field(min_length=1, description="expert dir or URI (s3://, gs://, ...)")
    keywords: list[str] | None = None


def _info(source: str) -> dict:
    """method, domain, metrics, ... of the expert at `source` (expert.json)."""
    from raylib.experts import read_expert, resolve_expert

    try:
        info = read_expert(resolve_expert(source))
    except Exception as exc:  # listing must not fail on one unreadable expert
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"method": info.method, "domain": info.domain, "template": info.template, "metrics": info.metrics,
            "step": info.step, "created_at": info.created_at}


def _sharing(method: str | None) -> str | None:
    """How the method's experts share the base ("adapter", "z"; registry capability)."""
    from raylib.methods import METHODS

    return METHODS[method].serve_sharing if method in METHODS else None


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

        from raylib.serve.strategies import build_strategy

        self.cfg = ServeConfig.model_validate(config)
        self.handles = deployments
        self.where = model_to_deployment  # model name (experts + base) -> key in self.handles
        self.experts = [n for n in model_to_deployment if n != BASE]
        self.single = "experts" in deployments
        self.home = "experts" if self.single else "base"  # where run-time experts and mixes live
        self.sources = {n: s.path for n, s in self.cfg.expert_specs().items()}
        self.added_by = {n: "config" for n in self.sources}
        self.infos = {n: _info(p) for n, p in self.sources.items()}
        self.dynamic: dict[str, str] = {}  # experts added through /admin -> path/URI
        self.strategy = build_strategy(self.cfg, self.experts)
        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.base_model)
        self.key = self.cfg.resolved_api_key()
        self.stats = {"requests": 0, "retries": 0, "fallbacks": 0, "errors_4xx": 0}
        self.created = int(time.time())
        app.state.router = self  # for the Depends and exception handlers (one app per replica process)

    # ------------------------------------------------------------------ plumbing

    def check_key(self, request: Request) -> None:
        if not self.key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            raise api.ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)",
                               code="invalid_api_key", type="authentication_error")

    def choose(self, req, prompt: str | None = None) -> tuple[str, dict]:
        """(model that answers, routing detail) for the request (or one of its prompts)."""
        if req.experts is not None and req.model != MIX:
            raise api.ApiError(400, f'experts: set model to "{MIX}" to mix experts', param="experts")
        if req.model == MIX:
            return MIX, self._check_mix(req)
        if req.model != AUTO:
            if req.model not in self.where:
                raise api.ApiError(404, f"model {req.model!r} does not exist; use auto or one of "
                                        f"{sorted(self.where)}", param="model", code="model_not_found")
            return req.model, {"strategy": "explicit", "requested": req.model}
        name, detail = self.strategy.route(api.request_text(req, prompt))
        routing = {"strategy": self.strategy.name, **detail}
        if name is None or name not in self.where:
            routing["unknown_domain"] = True
            name = self.cfg.router.fallback
        return name, routing

    def _check_mix(self, req) -> dict:
        mix = req.experts or {}
        if not mix:
            raise api.ApiError(400, 'experts: model "mix" needs experts: {name: weight, ...}', param="experts")
        if len(mix) > 8:
            raise api.ApiError(400, "experts: mix at most 8 experts", param="experts")
        unknown = [n for n in mix if n not in self.where or n == BASE]
        if unknown:
            raise api.ApiError(400, f"experts: {unknown} are not experts; mix some of {sorted(self.experts)}",
                               param="experts", code="model_not_found")
        if not all(math.isfinite(w) for w in mix.values()):
            raise api.ApiError(400, "experts: weights must be finite numbers", param="experts")
        methods = {n: self.infos.get(n, {}).get("method") for n in mix}
        sharing = {_sharing(m) for m in methods.values()}
        svf, lora = sharing == {"z"}, sharing == {"adapter"}
        if not (svf or lora):
            raise api.ApiError(400, f"experts: mix SVF experts with SVF experts or LoRA with LoRA, got {methods}",
                               param="experts")
        if svf and req.combination != "linear":
            raise api.ApiError(400, "combination: SVF experts mix linearly (z = sum w_k z_k); cat is for LoRA",
                               param="combination")
        return {"strategy": "mix", "experts": dict(mix), "combination": req.combination}

    def _registry(self, expert: str) -> dict:
        """Experts the answering replica may have to load on first use (name -> path/URI)."""
        reg = dict(self.dynamic)
        if not self.single and (expert == MIX or self.where.get(expert) == "base"):
            reg.update({n: src for n, src in self.sources.items() if n not in reg})  # base holds none of them
        return reg

    def _payload(self, req, expert: str, prompt: str | None = None) -> GenRequest:
        """The engine's request for the OpenAI request (or one prompt of it): built once here,
        it travels unchanged to the replica and its engine."""
        limits = self.cfg.limits
        chat = isinstance(req, api.ChatRequest)
        text = "\n".join(m.content for m in req.messages) if chat else prompt
        n = len(self.tokenizer(text)["input_ids"])
        if n > limits.max_prompt_tokens:
            raise api.ApiError(400, f"the prompt is {n} tokens; this server's limit is {limits.max_prompt_tokens}",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
        mix = {"mix": dict(req.experts), "combination": req.combination} if expert == MIX else {}
        body = {"kind": "chat", "messages": [m.model_dump() for m in req.messages]} if chat else {"prompt": prompt}
        return GenRequest(expert=expert, max_tokens=api.max_tokens(req, limits), temperature=req.temperature,
                          top_p=req.top_p, stop=api.stops(req, limits), seed=req.seed,
                          logprobs=req.top_logprobs_wanted(), registry=self._registry(expert), **mix, **body)

    def _handle(self, name: str):
        return self.handles[self.home if name == MIX else self.where[name]]

    async def _call(self, payload: GenRequest, routing: dict) -> dict:
        """generate on the chosen expert; retried with backoff (Serve restarts a dead replica
        meanwhile), then once on the fallback model."""
        r, primary = self.cfg.router, payload.expert
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
        return await self._handle(r.fallback).generate.remote(payload.model_copy(update={"expert": r.fallback,
                                                                                           "mix": None}))

    async def _complete(self, req: api.ChatRequest | api.CompletionRequest) -> object:
        api.check_choices(req, self.cfg.limits)
        prompts = req.prompts if isinstance(req, api.CompletionRequest) else [None]
        calls, routings = [], []  # (request, prompt index, routing): n per prompt, in OpenAI's order
        for k, prompt in enumerate(prompts):  # each prompt is routed on its own
            expert, routing = self.choose(req, prompt)
            routings.append(routing)
            payload = self._payload(req, expert, prompt)
            for j in range(req.n):  # choice j samples with seed + j
                seed = None if req.seed is None else req.seed + j
                calls.append((payload.model_copy(update={"seed": seed}), k, routing))
        chat = isinstance(req, api.ChatRequest)
        if req.stream:  # one prompt, n = 1 (check_choices refuses the rest)
            payload = calls[0][0]
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._sse(payload, chat, include_usage), media_type="text/event-stream",
                                     headers={EXPERT_HEADER: payload.expert})
        results = await asyncio.gather(*(self._call(p, routing) for p, _, routing in calls))  # one replica batch
        for (payload, k, _), res in zip(calls, results):
            if "error" in res:  # the replica refused this request (a mix PEFT cannot build, ...)
                raise api.ApiError(400, res["error"], param="experts" if payload.mix else "model")
            res["prompt_index"] = k
        routing = routings[0] if len(routings) == 1 else routings
        body = (api.chat_response if chat else api.completion_response)(results, routing)
        return JSONResponse(body, headers={EXPERT_HEADER: ",".join(sorted({r["expert"] for r in results}))})

    async def _sse(self, payload: GenRequest, chat: bool, include_usage: bool):
        """Stream from the expert; a failure before the first token is retried (then the
        fallback), as for non-streaming calls; after it, the stream ends with an error event."""
        r = self.cfg.router
        names = [payload.expert] * (r.retries + 1) + ([r.fallback] if r.fallback != payload.expert else [])
        for i, name in enumerate(names):
            writer = api.ChunkWriter(chat, name, include_usage)
            started = False
            try:
                one = payload.model_copy(update={"expert": name})
                if name != payload.expert:  # the fallback answers alone
                    one.mix = None
                gen = self._handle(name).options(stream=True).stream.remote(one)
                async for item in gen:
                    if "error" in item:
                        yield writer.error(api.ApiError(400, item["error"], param="experts"))
                        return
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

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(self, body: api.ChatRequest):
        return await self._complete(body)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(self, body: api.CompletionRequest):
        return await self._complete(body)

    @app.post("/v1/embeddings", dependencies=[Depends(authorized)])
    async def embeddings(self, body: api.EmbeddingRequest):
        """Vectors of the base model (mean-pooled last hidden layer, L2-normalised: Engine.embed)."""
        limits = self.cfg.limits
        if body.model not in (BASE, AUTO, self.cfg.base_model):
            raise api.ApiError(400, f"model: embeddings come from the base model; set model to {BASE!r} "
                                    f"(got {body.model!r})", param="model", code="model_not_found")
        texts = body.texts
        if not texts or len(texts) > limits.max_embedding_inputs:
            raise api.ApiError(400, f"input: send 1 to {limits.max_embedding_inputs} texts, got {len(texts)}",
                               param="input")
        longest = max(len(self.tokenizer(t)["input_ids"]) for t in texts)
        if longest > limits.max_prompt_tokens:
            raise api.ApiError(400, f"input: a text is {longest} tokens; this server's limit is "
                                    f"{limits.max_prompt_tokens}", param="input", code="context_length_exceeded")
        vectors, tokens = await self.handles[self.where[BASE]].embed.remote(texts)
        return api.embedding_response(vectors, tokens, BASE, body.encoding_format)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models(self):
        data = [{"id": AUTO, "object": "model", "created": self.created, "owned_by": "raylib",
                 "routing": self.strategy.name}]
        data += [{"id": n, "object": "model", "created": self.created, "owned_by": "raylib",
                  "deployment": self.where[n]} for n in sorted(self.where)]
        return {"object": "list", "data": data}

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "experts": self.experts, "strategy": self.strategy.name}

    @app.get("/v1/stats", dependencies=[Depends(authorized)])
    async def get_stats(self):
        return self.stats

    # ------------------------------------------------------------------ admin

    def check_admin(self, request: Request) -> None:
        if not self.key:
            raise api.ApiError(403, "admin endpoints are off because this server has no API key: set api_key or "
                                    "api_key_env in the serve config", code="admin_disabled", type="permission_error")
        self.check_key(request)
        if self.cfg.router.num_replicas > 1:
            raise api.ApiError(409, "admin endpoints need router.num_replicas: 1 (each router replica keeps its own "
                                    "expert table)", code="admin_unsupported")

    def _describe(self, name: str) -> dict:
        from raylib.serve.strategies import Keywords

        kw = self.strategy.keywords.get(name) if isinstance(self.strategy, Keywords) else None
        return {"name": name, "source": self.sources.get(name), "added_by": self.added_by.get(name),
                "deployment": self.where[name], **self.infos.get(name, {}), "keywords": kw}

    @app.get("/admin/experts", dependencies=[Depends(admin_authorized)])
    async def list_experts(self):
        return {"object": "list", "data": [self._describe(n) for n in sorted(self.where) if n != BASE]}

    @app.post("/admin/experts", dependencies=[Depends(admin_authorized)])
    async def add_expert(self, req: AddExpert):
        from raylib.errors import ConfigError
        from raylib.experts import read_expert, resolve_expert
        from raylib.serve.config import _servable
        from raylib.serve.strategies import Keywords

        name = req.name
        if name in (BASE, AUTO, MIX):
            raise api.ApiError(400, f"name: {name!r} is a reserved model name", param="name")
        if name in self.where:
            raise api.ApiError(409, f"expert {name!r} exists; DELETE /admin/experts/{name} first", param="name",
                               code="expert_exists")
        if req.keywords and not isinstance(self.strategy, Keywords):
            raise api.ApiError(400, f"keywords: router.strategy is {self.strategy.name}, keywords only route "
                                    f"with strategy keywords (the expert is reachable as model={name!r})",
                               param="keywords")
        try:
            info = read_expert(await asyncio.to_thread(resolve_expert, req.path, "path"))
        except (ConfigError, FileNotFoundError) as exc:
            raise api.ApiError(400, f"path: {exc}", param="path", code="not_an_expert") from None
        if info.method not in _servable():
            raise api.ApiError(400, f"path: method {info.method!r} cannot be served as a text generator",
                               param="path")
        self.dynamic[name] = req.path  # before loading: payloads built meanwhile must not unload it
        try:
            loaded = await self.handles[self.home].add_expert.remote(name, req.path)
        except Exception as exc:
            self.dynamic.pop(name, None)
            return JSONResponse(api.ApiError(500, f"loading {name} into {self.home} failed: {type(exc).__name__}: "
                                                  f"{str(exc)[-500:]}", type="server_error").body(), status_code=500)
        self.where[name], self.sources[name], self.added_by[name] = self.home, req.path, "admin"
        self.infos[name] = _info(req.path)
        self.experts.append(name)
        if req.keywords:
            self.strategy.keywords[name] = [w.lower() for w in req.keywords]
        log.info("admin: added expert %s from %s into %s in %.2fs", name, req.path, self.home, loaded["load_s"])
        return JSONResponse({**self._describe(name), "load_s": loaded["load_s"], "shared_base": loaded["shared_base"]},
                            status_code=201)

    @app.delete("/admin/experts/{name}", dependencies=[Depends(admin_authorized)])
    async def delete_expert(self, name: str):
        from raylib.serve.strategies import Keywords

        if name not in self.where or name == BASE:
            raise api.ApiError(404, f"no expert {name!r}; experts: {sorted(self.experts)}", code="model_not_found")
        r = self.cfg.router
        if name == r.fallback or (r.strategy == "cem" and name == r.cem_expert):
            raise api.ApiError(409, f"{name!r} is router.{'fallback' if name == r.fallback else 'cem_expert'}; "
                                    "it cannot be removed while the app runs", code="expert_in_use")
        dep = self.where.pop(name)
        self.dynamic.pop(name, None)
        self.sources.pop(name, None)
        self.infos.pop(name, None)
        self.added_by.pop(name, None)
        self.experts.remove(name)
        if isinstance(self.strategy, Keywords):
            self.strategy.keywords.pop(name, None)
        unloaded = False
        if dep == self.home:  # per-expert deployments stay up (unrouted) until the app is redeployed
            try:
                unloaded = bool(await self.handles[dep].remove_expert.remote(name))
            except Exception as exc:  # the next request's registry unloads it anyway
                log.warning("admin: unloading %s from %s failed: %s", name, dep, exc)
        return {"name": name, "removed": True, "deployment": dep, "unloaded": unloaded}

    # handle entry points (benchmarks / Python callers skip HTTP)
    async def route_and_generate(self, payload: "GenRequest | dict") -> dict:
        """An engine request (a GenRequest or its fields), with expert=auto allowed: route, then call."""
        payload = GenRequest.of({"expert": AUTO, **payload} if isinstance(payload, dict) else payload)
        if payload.expert == AUTO:
            text = payload.prompt or payload.messages[-1]["content"]
            name, _ = self.strategy.route(text)
            payload.expert = name if name in self.where else self.cfg.router.fallback
        return await self._call(payload, {})
