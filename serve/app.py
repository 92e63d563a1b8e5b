"""The Serve application: `build_app(args)` builds router + expert deployments from a raylib
serve config. Ray Serve's own tooling names it as `raylib.serve.app:build_app`:

    serve run raylib.serve.app:build_app config=serve/config.yaml
    serve deploy serve/serve_config.yaml        # applications[].import_path: raylib.serve.app:build_app

and a KubeRay RayService uses the same `serveConfigV2` application entry. `raylib serve`
(`run()` below) validates the config, starts Serve on 127.0.0.1 and deploys the same app.

Two layouts:
- multi-deployment: one `ExpertReplica` deployment per expert (`expert-<name>`, its own
  autoscaling_config and resources) + `base` for the base model;
- single-device (`single_device: true`, or `auto` when the cluster has at most one GPU): one
  `experts` deployment holds the base model and every expert and switches per request.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from raylib.serve.config import BASE, ExpertSpec, ServeConfig, load_serve_config, resolve_paths, validate_serve_config

log = logging.getLogger("raylib.serve")


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """`args` = {"config": path, "set": [KEY=VALUE, ...], "single_device": ...} or an inline config."""
    args = dict(args or {})
    if "config" in args:
        overrides = list(args.pop("set", None) or [])
        overrides += [f"{k}={v}" for k, v in args.items() if k != "config"]
        return load_serve_config(args["config"], overrides)
    return validate_serve_config(resolve_paths(args, os.getcwd()), source="app args")


def use_single_device(cfg: ServeConfig) -> bool:
    """auto: single-device when the cluster (or this machine) has at most one GPU."""
    if cfg.single_device != "auto":
        return bool(cfg.single_device)
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) <= 1
    import torch

    return torch.cuda.device_count() <= 1


def _options(cfg: ServeConfig, spec: ExpertSpec, name: str) -> dict:
    a = spec.autoscaling
    actor = {"num_cpus": spec.resources.num_cpus, "num_gpus": spec.resources.num_gpus}
    if spec.resources.memory:
        actor["memory"] = spec.resources.memory
    runtime_env = spec.runtime_env if spec.runtime_env is not None else cfg.runtime_env
    if runtime_env:
        actor["runtime_env"] = runtime_env
    return {
        "name": name,
        "autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                               "initial_replicas": a.initial_replicas, "target_ongoing_requests": a.target_ongoing_requests,
                               "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s},
        "ray_actor_options": actor,
        "max_ongoing_requests": spec.max_ongoing_requests,
    }


def build_app(args: dict[str, Any]):
    """The application builder Ray Serve calls (`import_path: raylib.serve.app:build_app`): exactly one
    parameter, the `args` dict of the Serve config / `serve run ... key=value`."""
    return build_application(config_from_args(args))


def build_application(cfg: ServeConfig, single_device: bool | None = None):
    """The Serve Application (router ingress bound to its expert deployments)."""
    from raylib.serve.expert import ExpertReplica
    from raylib.serve.router import Router

    single = use_single_device(cfg) if single_device is None else single_device
    specs = cfg.expert_specs()
    common = dict(base_model=cfg.base_model, base_template=cfg.base_template, dtype=cfg.dtype,
                  max_batch_size=cfg.batching.max_batch_size, batch_wait_timeout_s=cfg.batching.batch_wait_timeout_s,
                  mix_cache=cfg.mix_cache, vllm=cfg.vllm.model_dump())
    deployments, where = {}, {}
    base = cfg.base_spec()
    if single:
        deployments["experts"] = ExpertReplica.options(**_options(cfg, base, "experts")).bind(
            experts={n: s.path for n, s in specs.items()}, threads=_threads(base), engine=base.engine or cfg.engine,
            **common)
        where = {n: "experts" for n in [*specs, BASE]}
    else:
        for name, spec in specs.items():
            dep = f"expert-{name}"
            deployments[dep] = ExpertReplica.options(**_options(cfg, spec, dep)).bind(
                experts={name: spec.path}, include_base=False, threads=_threads(spec), engine=spec.engine or cfg.engine,
                **common)
            where[name] = dep
        deployments["base"] = ExpertReplica.options(**_options(cfg, base, "base")).bind(
            experts={}, threads=_threads(base), engine=base.engine or cfg.engine, **common)
        where[BASE] = "base"
    r = cfg.router
    router_opts = {"name": "router", "num_replicas": r.num_replicas,
                   "ray_actor_options": {"num_cpus": r.resources.num_cpus}}
    log.info("serve app: %s mode, deployments %s", "single-device" if single else "multi-deployment", sorted(deployments))
    return Router.options(**router_opts).bind(cfg.model_dump(), deployments, where)


def _threads(spec: ExpertSpec) -> int:
    return max(1, int(spec.resources.num_cpus))


def run(cfg: ServeConfig, single_device: bool | None = None, address: str | None = None, blocking: bool = False):
    """Start Ray (if needed) + Serve on cfg.http, deploy the app; return the router handle."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS")
        if addr:
            ray.init(address=addr)
        else:
            ray.init(address="local", include_dashboard=False)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    app = build_application(cfg, single_device)  # the workers import raylib.serve from the installed raylib
    return serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
