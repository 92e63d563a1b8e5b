"""The expert deployment: a replica that loads the base model + its expert(s) once and answers
generate / stream calls from the router (through DeploymentHandles).

Concurrent non-streaming requests to a replica are batched with `@serve.batch` into one
left-padded `generate` call (requests that share sampling settings; PEFT experts of a
single-device replica even share one mixed-adapter batch).
"""

from __future__ import annotations

import asyncio
import os

from ray import serve


@serve.deployment
class ExpertReplica:
    def __init__(self, base_model: str, experts: dict[str, str], base_template: str = "alpaca", dtype: str = "auto",
                 include_base: bool = True, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005,
                 threads: int | None = None, mix_cache: int = 4):
        import torch

        from raylib.serve.engine import Engine

        torch.set_num_threads(max(1, threads or 1))
        self.engine = Engine(base_model, experts, base_template, dtype, include_base=include_base, mix_cache=mix_cache)
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, payloads: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self.engine.generate, payloads)

    async def generate(self, payload: dict) -> dict:
        return await self._batched(payload)

    async def stream(self, payload: dict):
        it = self.engine.stream(payload)
        done = object()
        while True:
            item = await asyncio.to_thread(next, it, done)
            if item is done:
                return
            yield item

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
        return {"experts": e.names, "load_s": e.load_s, "switch_times": list(e.switch_times), "pid": os.getpid()}

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)
