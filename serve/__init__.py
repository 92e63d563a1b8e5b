"""The raylib Ray Serve app: a router ingress with an OpenAI-compatible API in front of
per-domain expert deployments (see serve/app.py; `raylib serve` runs it)."""
