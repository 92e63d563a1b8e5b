"""`raylib serve CONFIG`: validate a serve config, start Ray Serve on 127.0.0.1 (by default)
and deploy the router + expert app from the repository's `serve/` package."""

from __future__ import annotations

import os
import sys
import time

import click

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_serve():
    """`serve/` sits next to `raylib/` at the repository top; make it importable here and in
    the Ray workers of a local Ray (PYTHONPATH) even when raylib was installed elsewhere."""
    try:
        import serve.app  # noqa: F401
    except ImportError:
        sys.path.insert(0, REPO)
        import serve.app  # noqa: F401
    return serve.app


@click.command("serve")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--single-device/--multi-deployment", "single_device", default=None,
              help="one replica holds every expert / one deployment per expert (default: config, auto = "
                   "single-device when the cluster has at most one GPU)")
@click.option("--host", default=None, help="bind address (default 127.0.0.1; non-loopback needs an API key)")
@click.option("--port", type=int, default=None)
@click.option("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config field")
@click.option("--check", is_flag=True, help="validate the config and exit")
def serve_command(config, single_device, host, port, address, overrides, check):
    """Serve the experts in CONFIG behind a router with an OpenAI-compatible API."""
    app = _import_serve()
    from serve.config import load_serve_config

    overrides = list(overrides)
    if host:
        overrides.append(f"http.host={host}")
    if port is not None:
        overrides.append(f"http.port={port}")
    if single_device is not None:
        overrides.append(f"single_device={str(single_device).lower()}")
    cfg = load_serve_config(config, overrides)
    if check:
        click.echo(f"ok: {len(cfg.experts)} experts, strategy {cfg.router.strategy}, {cfg.http.host}:{cfg.http.port}")
        return
    import ray

    if not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    app.run(cfg, address=address, blocking=False)
    url = f"http://{cfg.http.host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}"
    click.echo(f"serving {sorted(cfg.experts)} (+ base, auto) at {url}/v1  (Ctrl-C stops)", err=False)
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
