"""The interface an expert replica (serve/expert.py) uses, whatever engine generates.

Two implementations: `Engine` (serve/engine.py: transformers/PEFT, raylib's continuous
batching; everything raylib trains) and `VLLMEngine` (serve/vllm_engine.py: vLLM's AsyncLLM;
LoRA/QLoRA, full and merged experts). serve/expert.py picks one per replica. An engine answers requests
asynchronously through `submit`: events go to a callback, so a replica's event loop, a test or
a benchmark can wait on them its own way; `generate` and `stream` are the blocking forms.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from typing import Callable, Iterator

from raylib.serve.requests import GenRequest

#: an engine event: {"delta": text} (streams), the result {"done": True, "text", "finish_reason",
#: "expert", "prompt_tokens", "completion_tokens", "logprobs"?}, {"error": message} (a bad expert
#: or mix: the caller's 400) or {"exception": exc} (the generation failed)
Sink = Callable[[dict], None]


class ServingEngine(ABC):
    #: "hf" | "vllm": what a replica's info() reports
    name: str = ""
    #: seconds the engine took to load its models
    load_s: float = 0.0

    @abstractmethod
    def submit(self, req: "GenRequest | dict", sink: Sink, stream: bool = False) -> object:
        """Start answering `req`; `sink` gets its events, from any thread, the last one not a
        delta. Returns a handle for `cancel`."""

    @abstractmethod
    def cancel(self, handle: object) -> None:
        """The caller went away (a closed stream, a cancelled call): stop generating for it,
        without further events; a no-op once the request is done."""

    @abstractmethod
    def add_expert(self, name: str, source: str) -> dict:
        """Load the expert at `source` (dir or URI) as `name` while serving."""

    @abstractmethod
    def remove_expert(self, name: str) -> bool:
        """Unload `name`; its requests in flight fail with an error event."""

    @abstractmethod
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Base-model vectors of `texts` and the tokens they took."""

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def stats(self) -> dict: ...

    @property
    @abstractmethod
    def names(self) -> list[str]:
        """Experts (and base) this engine serves."""

    def generate(self, reqs: list) -> list[dict]:
        """Blocking: every request answered (submitted together, so they batch)."""
        queues = []
        for req in reqs:
            q: "queue.Queue[dict]" = queue.Queue()
            self.submit(req, q.put)
            queues.append(q)
        return [_raise(q.get()) for q in queues]

    def stream(self, req) -> Iterator[dict]:
        """Blocking stream: {"delta": text} pieces, then the result (or an {"error"})."""
        q: "queue.Queue[dict]" = queue.Queue()
        self.submit(req, q.put, stream=True)
        while True:
            event = _raise(q.get())
            yield event
            if "delta" not in event:
                return


def _raise(event: dict) -> dict:
    if "exception" in event:
        raise event["exception"]
    return event
