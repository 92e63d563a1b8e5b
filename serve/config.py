"""The `raylib serve` config (serve/config.yaml), validated with pydantic before Ray starts.

Example::

    base_model: models/tiny-llama
    base_template: alpaca            # prompt template for chat requests the base model answers
    experts:                         # name -> expert directory (expert.json + weights)
      arithmetic: runs/arithmetic
      strings:
        path: runs/strings
        autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 2}
        resources: {num_cpus: 1}
    router:
      strategy: keywords             # explicit | keywords | prompt | classifier | cem
      keywords: {arithmetic: ["+", " - "], strings: [reverse, uppercase]}
      fallback: base                 # unknown domain -> this (base = the base model)
    single_device: auto              # auto | true | false
    engine: auto                     # auto | vllm | hf (per expert too); auto = vLLM where installed and able
    vllm: {max_loras: 4, kv_cache_bytes: 1073741824}
    runtime_env: {py_executable: .venv-vllm/bin/python}   # Ray runtime_env of the replicas (per expert too)
    http: {host: 127.0.0.1, port: 8000}
    api_key_env: null                # name of an env var holding the bearer key
    limits: {max_prompt_tokens: 1024, max_tokens: 256, max_body_bytes: 65536}
    mix_cache: 4                     # per-request mixes ("model": "mix") kept built per replica (LRU)

Every error names the field (`router.keywords`, `experts.math.path`, ...) and the fix.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from raylib.errors import ConfigError

BASE = "base"  # the model name that means "the base model, no expert"
AUTO = "auto"  # the model name that means "let the router decide"
MIX = "mix"  # the model name of a per-request weighted mix (`experts: {name: weight}` in the request)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    """Ray Serve's autoscaling_config for one expert deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: PositiveInt = 1
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: PositiveFloat = 2.0
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _order(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class Resources(_Strict):
    """Ray actor options of one replica."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes")


class Batching(_Strict):
    """A replica's continuous batching (serve/scheduler.py): at most `max_batch_size` rows
    decode together; an idle replica waits `batch_wait_timeout_s` so requests that arrive
    together prefill together."""

    max_batch_size: PositiveInt = 8
    batch_wait_timeout_s: float = Field(0.005, ge=0)


class VLLMSettings(_Strict):
    """The vLLM engine's settings (serve/vllm_engine.py): adapters batched together, the largest
    LoRA rank (None: the experts' largest, at least 16), KV cache bytes per model, context length
    (None: the model's), eager mode (no compile warm-up)."""

    max_loras: PositiveInt = 4
    max_lora_rank: PositiveInt | None = None
    kv_cache_bytes: PositiveInt = 1 << 30
    max_model_len: PositiveInt | None = None
    enforce_eager: bool = True


EngineName = Literal["auto", "vllm", "hf"]


class ExpertSpec(_Strict):
    path: str
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    resources: Resources = Field(default_factory=Resources)
    max_ongoing_requests: PositiveInt = 16
    #: this deployment's engine (None: the config's `engine`)
    engine: EngineName | None = None
    #: Ray's runtime_env for this deployment's replicas, e.g. {py_executable: .venv-vllm/bin/python}
    #: (an environment with vLLM) or a container image
    runtime_env: dict[str, Any] | None = None




class RouterConfig(_Strict):
    strategy: Literal["explicit", "keywords", "prompt", "classifier", "cem"] = "keywords"
    #: unknown domain (or no expert matched) -> this model: `base` or an expert name
    fallback: str = BASE
    #: keywords: expert -> words/substrings (case-insensitive); the expert with most hits wins
    keywords: dict[str, list[str]] = Field(default_factory=dict)
    #: prompt: label text per expert (default: the expert's name); `other` is always a label
    labels: dict[str, str] = Field(default_factory=dict)
    classification_prompt: str = (
        "Classify the request into one of: {labels}.\n{examples}Request: {request}\nCategory:"
    )
    #: prompt: few-shot examples (text -> expert name) shown before the request
    examples: list[tuple[str, str]] = Field(default_factory=list)
    #: prompt: subtract each label's log-likelihood under a content-free request (calibration)
    calibrate: bool = True
    #: classifier: a classifier dir written by raylib (raylib.serve.classifier), or labelled jsonl to train one
    classifier: str | None = None
    classifier_data: str | None = None
    classifier_label_field: str = "domain"
    #: a label is taken only when its probability is at least this (else fallback)
    min_confidence: float = Field(0.0, ge=0, le=1)
    #: cem: the composed expert (an experts entry) that auto requests go to
    cem_expert: str | None = None
    #: retries of a failed expert call (replica died, ...) before falling back to `fallback`
    retries: int = Field(3, ge=0)
    retry_backoff_s: float = Field(0.5, ge=0)
    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.5))
    num_replicas: PositiveInt = 1


class HttpOptions(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


class Limits(_Strict):
    max_prompt_tokens: PositiveInt = 1024
    max_tokens: PositiveInt = 256  # cap on a request's max_tokens
    default_max_tokens: PositiveInt = 32
    max_body_bytes: PositiveInt = 1 << 16
    max_stop: PositiveInt = 4
    max_choices: PositiveInt = 8  # prompts x n of one request
    max_embedding_inputs: PositiveInt = 64  # texts per /v1/embeddings request


class ServeConfig(_Strict):
    base_model: str
    base_template: Literal["alpaca", "chat", "plain"] = "alpaca"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    experts: dict[str, Union[str, ExpertSpec]] = Field(default_factory=dict)
    router: RouterConfig = Field(default_factory=RouterConfig)
    single_device: Union[bool, Literal["auto"]] = "auto"
    #: the replica that serves the base model (multi-deployment mode) or everything (single-device)
    base: ExpertSpec | None = None
    batching: Batching = Field(default_factory=Batching)
    #: auto: vLLM where it is installed in the replica's environment and serves every expert of
    #: the deployment (LoRA/QLoRA, full, merged), else the HF engine; vllm | hf: that one
    engine: EngineName = "auto"
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)
    #: Ray's runtime_env for every replica (an expert's own runtime_env replaces it)
    runtime_env: dict[str, Any] | None = None
    http: HttpOptions = Field(default_factory=HttpOptions)
    api_key: str | None = None
    api_key_env: str | None = None
    limits: Limits = Field(default_factory=Limits)
    #: per-request mixes kept built per replica (LRU; a mix is a z vector set or a merged LoRA adapter)
    mix_cache: PositiveInt = 4
    app_name: str = "raylib"
    route_prefix: str = "/"

    def expert_specs(self) -> dict[str, ExpertSpec]:
        return {n: (ExpertSpec(path=s) if isinstance(s, str) else s) for n, s in self.experts.items()}

    def base_spec(self) -> ExpertSpec:
        return self.base or ExpertSpec(path=self.base_model)

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


def _describe(err: dict[str, Any]) -> str:
    field = ".".join(str(p) for p in err["loc"] if p not in ("str", "ExpertSpec"))
    return f"{field or 'config'}: {err['msg']}"


def validate_serve_config(raw: dict[str, Any], source: str = "serve config", check_paths: bool = True) -> ServeConfig:
    """Schema + cross-field checks (experts exist, router options fit the strategy, the key
    is set when binding to a non-loopback address). Raises ConfigError naming the field."""
    try:
        cfg = ServeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("", f"{source}: " + "; ".join(_describe(e) for e in exc.errors())) from None
    names = set(cfg.experts)
    for reserved in (BASE, AUTO, MIX):
        if reserved in names:
            raise ConfigError(f"experts.{reserved}", f"{reserved!r} is a reserved model name", "rename the expert")
    r = cfg.router
    if r.fallback != BASE and r.fallback not in names:
        raise ConfigError("router.fallback", f"{r.fallback!r} is not an expert", f"use base or one of {sorted(names)}")
    for key in ("keywords", "labels"):
        unknown = set(getattr(r, key)) - names
        if unknown:
            raise ConfigError(f"router.{key}", f"names no expert: {sorted(unknown)}", f"use expert names {sorted(names)}")
    for i, (_, label) in enumerate(r.examples):
        if label not in names and label != "other":
            raise ConfigError(f"router.examples.{i}", f"label {label!r} is not an expert", f"use {sorted(names)} or other")
    if r.strategy == "keywords" and not r.keywords:
        raise ConfigError("router.keywords", "strategy keywords needs keywords per expert",
                          "add router.keywords: {expert: [word, ...]}")
    if r.strategy == "classifier" and not (r.classifier or r.classifier_data):
        raise ConfigError("router.classifier", "strategy classifier needs a classifier",
                          "set router.classifier (a dir) and/or router.classifier_data (labelled jsonl to train on)")
    if r.strategy == "cem":
        if not r.cem_expert or r.cem_expert not in names:
            raise ConfigError("router.cem_expert", f"strategy cem needs the composed expert's name, got {r.cem_expert!r}",
                              f"set it to one of {sorted(names)} (a `raylib cem` output dir listed under experts)")
    if r.strategy == "prompt" and "{request}" not in r.classification_prompt:
        raise ConfigError("router.classification_prompt", "has no {request} placeholder", "add {request}")
    if not _is_loopback(cfg.http.host) and not cfg.resolved_api_key():
        raise ConfigError("http.host", f"binding to {cfg.http.host} (not loopback) needs an API key",
                          "set api_key or api_key_env (the clients send it as `Authorization: Bearer KEY`)")
    if cfg.api_key_env and not cfg.resolved_api_key():
        raise ConfigError("api_key_env", f"environment variable {cfg.api_key_env} is not set", "export it or remove api_key_env")
    if check_paths:
        _check_paths(cfg)
    return cfg


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _servable() -> set[str]:
    from raylib.methods import METHODS

    return {name for name, m in METHODS.items() if m.servable}


def _vllm_servable() -> set[str]:
    from raylib.methods import METHODS

    return {name for name, m in METHODS.items() if m.servable and m.vllm_servable}


def _check_paths(cfg: ServeConfig) -> None:
    from raylib.experts import read_expert

    if os.path.isdir(cfg.base_model) and not os.path.isfile(os.path.join(cfg.base_model, "config.json")):
        raise ConfigError("base_model", f"{cfg.base_model!r} has no config.json", "point it at a save_pretrained dir")
    if not os.path.isdir(cfg.base_model) and cfg.base_model.count("/") != 1:
        raise ConfigError("base_model", f"{cfg.base_model!r} does not exist", "give a local model dir or a hub id")
    for name, spec in cfg.expert_specs().items():
        try:
            info = read_expert(spec.path)
        except FileNotFoundError as exc:
            raise ConfigError(f"experts.{name}.path", str(exc), "point it at a dir written by raylib train/cem") from None
        if (info.config.get("objective") or {}).get("name") == "reward":
            raise ConfigError(f"experts.{name}.path", "a reward model scores answers, it does not generate them",
                              "use it as an RL reward (objective.reward: model:<dir>), and serve generative experts")
        if info.provider != "ray":
            raise ConfigError(f"experts.{name}.path", f"the {info.provider} provider holds this model "
                              f"({info.fine_tuned_model}); raylib has no weights to serve", "query it at the provider")
        if info.family != "causal" or (info.config.get("objective") or {}).get("labels"):
            kind = "an encoder-decoder" if info.family == "seq2seq" else "a sequence classifier"
            raise ConfigError(f"experts.{name}.path", f"{kind} ({info.family} model) is not served here: the engines "
                              "decode causal language models", "serve experts trained on a decoder-only base model")
        if info.method not in _servable():
            raise ConfigError(f"experts.{name}.path", f"method {info.method!r} cannot be served as a text generator",
                              f"serve experts of {sorted(_servable())}")
        if "vllm" in (spec.engine, cfg.engine) and info.method not in _vllm_servable():
            field = f"experts.{name}.engine" if spec.engine == "vllm" else "engine"
            raise ConfigError(field, f"vLLM does not serve {info.method} experts ({name}): SVF z-switching, IA3 and "
                              "prompt-learning experts need the HF engine",
                              f"set {field}: hf (or auto), or `raylib export --merge` the expert into a full model")
    r = cfg.router
    if r.strategy == "cem":
        path = cfg.expert_specs()[r.cem_expert].path
        if not os.path.isfile(os.path.join(path, "cem.json")):
            raise ConfigError("router.cem_expert", f"{path} is not a `raylib cem` output (no cem.json)",
                              "point the expert at the --out dir of raylib cem")
    if r.strategy == "classifier":
        if r.classifier and not os.path.isdir(r.classifier) and not r.classifier_data:
            raise ConfigError("router.classifier", f"{r.classifier!r} does not exist and no classifier_data to train it",
                              "train one with raylib.serve.classifier or set router.classifier_data")
        if r.classifier_data and not os.path.isfile(r.classifier_data):
            raise ConfigError("router.classifier_data", f"{r.classifier_data!r} does not exist", "give a jsonl file")


def resolve_paths(raw: dict[str, Any], base_dir: str) -> dict[str, Any]:
    """Relative paths in a config file resolve against the current directory, like jobs do;
    replicas run elsewhere, so paths become absolute before the config is shipped."""
    def absolute(p):
        return os.path.abspath(p) if isinstance(p, str) and os.path.exists(p) else p

    out = dict(raw)
    out["base_model"] = absolute(out.get("base_model"))
    experts = {}
    for name, spec in (out.get("experts") or {}).items():
        if isinstance(spec, dict):
            experts[name] = {**spec, "path": absolute(spec.get("path"))}
        else:
            experts[name] = absolute(spec)
    out["experts"] = experts
    for holder in [out, out.get("base"), *experts.values()]:  # an environment's python given relative to here
        env = holder.get("runtime_env") if isinstance(holder, dict) else None
        if isinstance(env, dict) and isinstance(env.get("py_executable"), str):
            holder["runtime_env"] = {**env, "py_executable": absolute(env["py_executable"])}
    if isinstance(out.get("router"), dict):
        r = dict(out["router"])
        for key in ("classifier_data",):
            r[key] = absolute(r.get(key))
        if isinstance(r.get("classifier"), str):
            r["classifier"] = os.path.abspath(r["classifier"])
        out["router"] = r
    return out


def load_serve_config(path: str, overrides: list[str] | None = None, check_paths: bool = True) -> ServeConfig:
    from raylib.config import apply_override, read_yaml

    raw = read_yaml(path, "serve config", "serve", "(base_model, experts, router, ...)")
    for item in overrides or []:
        apply_override(raw, item)
    return validate_serve_config(resolve_paths(raw, os.getcwd()), source=path, check_paths=check_paths)
