"""`raylib serve CONFIG`: validate a serve config, start Ray Serve on 127.0.0.1 (by default)
and deploy the router + expert app of `raylib.serve` (the repository's `serve/` folder, mapped
into the package by pyproject.toml, so Ray's workers import it from the installed raylib)."""

from __future__ import annotations

import os
import signal
import sys
import threading

import click


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
    from raylib.serve import app
    from raylib.serve.config import load_serve_config

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
        ray.init(address="local", include_dashboard=False)
    app.run(cfg, address=address, blocking=False)
    url = f"http://{cfg.http.host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}"
    click.echo(f"serving {sorted(cfg.experts)} (+ base, auto) at {url}/v1  (Ctrl-C stops)", err=False)
    sys.stdout.flush()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ray replaces Python's SIGINT handling in the driver
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    click.echo("stopping ...")
    from ray import serve

    serve.shutdown()
    ray.shutdown()
