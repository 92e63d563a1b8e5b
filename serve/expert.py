"""The expert deployment: a replica that loads the base model + its expert(s) once and answers
generate / stream calls from the router (through DeploymentHandles).

Requests (plain and streamed) go to the engine's scheduler, which decodes them in continuous
batches (serve/scheduler.py): a request joins the running batch at the next step and leaves
it when it is done; LoRA experts of a single-device replica share one mixed-adapter batch.
"""

from __future__ import annotations

import asyncio
import os

from ray import serve

from raylib.serve.requests import GenRequest


@serve.deployment
class ExpertReplica:
    def __init__(self, base_model: str, experts: dict[str, str], base_template: str = "alpaca", dtype: str = "auto",
                 include_base: bool = True, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005,
                 threads: int | None = None, mix_cache: int = 4):
        import torch

        from raylib.noise import quiet_libraries
        from raylib.serve.engine import Engine

        quiet_libraries("cuda" if torch.cuda.is_available() else "cpu")  # no weight-loading progress bars
        torch.set_num_threads(max(1, threads or 1))
        self.engine = Engine(base_model, experts, base_template, dtype, include_base=include_base, mix_cache=mix_cache,
                             max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)

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
        return {"experts": e.names, "load_s": e.load_s, "pid": os.getpid(), **e.stats()}

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)
