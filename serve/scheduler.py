"""Continuous batching for the HF engine: step-level scheduling over the KV cache.

One scheduler thread per engine owns the decoding. A request is *admitted* between decoding
steps: its prompt is prefilled (together with the others that arrived meanwhile) and its rows
join the running batch of its group by left-padding the KV caches to a common length. Every
step feeds one new token per row, samples per row (each request's own temperature, top-p,
seed: a seeded request draws from its own `torch.Generator`, so its text does not depend on
what it is batched with), and a row leaves the batch as soon as it finishes (EOS, a stop
string, max_tokens). Streams are ordinary rows that also emit their text as it grows.

A group is what can share one forward pass: the rows of one PEFT model (LoRA experts, mixes
and the base as `__base__` mix in one batch through `adapter_names`), of one SVF expert (z is
model state), or of one other model. Groups take turns a step at a time. The engine lock is
held for one step (or one admission) at a time, never across a whole generation, so adding
or removing experts and new requests wait at most one step.

Why not `model.generate`: it runs one batch start to finish, so a new request waits for the
longest answer in flight and a stream holds the model for its whole length. transformers'
`ContinuousBatchingManager` schedules like this but knows no per-row adapters or SVF z.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("raylib.serve")


@dataclass(eq=False)  # identity: rows are compared as objects
class Sequence:
    """One request in flight: its prompt ids, what it generated and where its events go."""

    req: Any  # engine.GenRequest (after Engine.prepare: req.expert names its slot)
    prompt_ids: list[int]
    stops: list[str]
    sink: Callable[[dict], None]  # called from the scheduler thread with each event
    stream: bool = False
    generator: Any = None  # torch.Generator of a seeded sampled request
    ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    finish: str | None = None
    cancelled: bool = False  # the caller went away: the row leaves at the next step, silently


class DecodeBatch:
    """Rows of one group decoding together: a batched KV cache (left-padded), its attention
    mask and each row's position."""

    def __init__(self, key: tuple, seqs: list[Sequence], cache, mask, positions, next_ids):
        self.key, self.seqs, self.cache, self.mask = key, seqs, cache, mask
        self.positions, self.next_ids = positions, next_ids  # [B] next position / token to feed

    @property
    def mergeable(self) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def join(self, other: "DecodeBatch") -> None:
        """Append `other`'s rows: left-pad the shorter cache so both have one length."""
        import torch
        import torch.nn.functional as F

        a, b = self.mask.shape[1], other.mask.shape[1]
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mk, mv, tk, tv = mine.keys, mine.values, theirs.keys, theirs.values
            if a < b:
                mk, mv = F.pad(mk, (0, 0, b - a, 0)), F.pad(mv, (0, 0, b - a, 0))
            elif b < a:
                tk, tv = F.pad(tk, (0, 0, a - b, 0)), F.pad(tv, (0, 0, a - b, 0))
            mine.keys, mine.values = torch.cat([mk, tk]), torch.cat([mv, tv])
        width = max(a, b)
        self.mask = torch.cat([F.pad(self.mask, (width - a, 0)), F.pad(other.mask, (width - b, 0))])
        self.positions = torch.cat([self.positions, other.positions])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.seqs += other.seqs

    def keep(self, rows: list[int]) -> None:
        """Drop finished rows, then the padding columns no row needs any more."""
        import torch

        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
        self.mask, self.positions = self.mask.index_select(0, idx), self.positions.index_select(0, idx)
        self.next_ids = self.next_ids.index_select(0, idx)
        self.seqs = [self.seqs[i] for i in rows]
        used = (self.mask.sum(0) > 0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start and self.mergeable:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]


class Scheduler:
    """The decoding loop of one engine (see the module docstring). The engine supplies:
    `engine.prepare(seq)` (bring experts in, resolve mixes; raises KeyError/ValueError),
    `engine.group_key(req)`, `engine.forward_for(names)` -> (model, extra forward kwargs),
    `engine.finish_events(seq)` / `engine.delta_event(seq)` (texts and results),
    `engine.logprob_entry`, `engine.stopped(seq)`, and its lock."""

    def __init__(self, engine, max_batch_size: int = 8, wait_s: float = 0.005):
        self.engine, self.max_batch_size, self.wait_s = engine, max_batch_size, wait_s
        self.pending: "queue.Queue[Sequence]" = queue.Queue()
        self.batches: list[DecodeBatch] = []
        self.admitting: list[Sequence] = []  # prepared in this admission, not yet in a batch
        self.steps_per_turn = 4  # a group keeps the model this many steps (SVF z switches cost a rebuild)
        self._current: DecodeBatch | None = None
        self._streak = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.steps = 0
        self.max_rows = 0  # the most rows one batch has decoded together (stats)

    # ------------------------------------------------------------------ API

    def submit(self, seq: Sequence) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="raylib-decode", daemon=True)
                self._thread.start()
        self.pending.put(seq)
        self._wake.set()

    def running(self) -> list[Sequence]:
        return [s for b in self.batches for s in b.seqs] + self.admitting

    def in_use(self, expert: str) -> bool:
        return any(s.req.expert == expert for s in self.running())

    def abort(self, predicate: Callable[[Sequence], bool], message: str) -> None:
        """Fail the rows for which predicate holds (their expert is going away); engine lock held."""
        for batch in list(self.batches):
            rows = [i for i, s in enumerate(batch.seqs) if not predicate(s)]
            for s in batch.seqs:
                if predicate(s):
                    s.sink({"error": message})
            self._keep(batch, rows)

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while True:
            if not self.batches and self.pending.empty():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                if self.pending.empty():
                    continue
                if self.wait_s:
                    time.sleep(self.wait_s)  # let requests that arrive together prefill together
            with self.engine.lock:
                self._admit()
            if self.batches:
                with self.engine.lock:
                    batch = self._next_batch()
                    try:
                        self._step(batch)
                    except Exception as exc:  # a failed forward fails its rows, not the replica
                        self._fail(batch.seqs, exc)
                        self._keep(batch, [])

    def _admit(self) -> None:
        new: dict[tuple, list[Sequence]] = {}
        while True:
            try:
                seq = self.pending.get_nowait()
            except queue.Empty:
                break
            try:
                self.engine.prepare(seq)
            except (KeyError, ValueError) as exc:
                seq.sink({"error": _message(exc), "expert": seq.req.expert})
                continue
            self.admitting.append(seq)
            new.setdefault(self.engine.group_key(seq.req), []).append(seq)
        try:
            for key, seqs in new.items():
                for i in range(0, len(seqs), self.max_batch_size):
                    part = seqs[i: i + self.max_batch_size]
                    try:
                        if key[0] == "whole":
                            self.engine.generate_whole(part)
                        else:
                            self._prefill(key, part)
                    except Exception as exc:
                        self._fail(part, exc)
                        for batch in [b for b in self.batches if set(map(id, b.seqs)) & set(map(id, part))]:
                            self._keep(batch, [i for i, s in enumerate(batch.seqs) if s not in part])
        finally:
            self.admitting = []

    def _prefill(self, key: tuple, seqs: list[Sequence]) -> None:
        import torch

        dev = self.engine.device
        width = max(len(s.prompt_ids) for s in seqs)
        pad = self.engine.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in seqs], device=dev)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs], device=dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model, extra = self.engine.forward_for([s.req.expert for s in seqs])
        with torch.no_grad():  # the model makes the cache its config asks for
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **extra)
        batch = DecodeBatch(key, list(seqs), _cache_of(out), mask, mask.sum(-1), torch.zeros_like(mask[:, 0]))
        rows = self._sample(batch, out.logits[:, -1, :])
        home = next((b for b in self.batches if b.key == key and b.mergeable and batch.mergeable
                     and len(b.seqs) + len(rows) <= self.max_batch_size), None)
        self._keep(batch, rows, add=home is None)
        if home is not None and batch.seqs:
            home.join(batch)
        self.max_rows = max([self.max_rows, *(len(b.seqs) for b in self.batches)])

    @staticmethod
    def _fail(seqs: list[Sequence], exc: Exception) -> None:
        log.exception("decoding failed for %d request(s)", len(seqs), exc_info=exc)
        for s in seqs:
            s.sink({"exception": exc})

    def _next_batch(self) -> DecodeBatch:
        """Round robin over the groups, a few steps each (an SVF z switch costs a weight rebuild)."""
        if self._current not in self.batches or self._streak >= self.steps_per_turn:
            at = self.batches.index(self._current) + 1 if self._current in self.batches else 0
            self._current, self._streak = self.batches[at % len(self.batches)], 0
        self._streak += 1
        return self._current

    def _step(self, batch: DecodeBatch) -> None:
        import torch

        model, extra = self.engine.forward_for([s.req.expert for s in batch.seqs])
        mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        with torch.no_grad():
            out = model(input_ids=batch.next_ids[:, None], attention_mask=mask, position_ids=batch.positions[:, None],
                        use_cache=True, **{_cache_arg(model): batch.cache}, **extra)
        batch.cache, batch.mask, batch.positions = _cache_of(out), mask, batch.positions + 1
        self.steps += 1
        self._keep(batch, self._sample(batch, out.logits[:, -1, :]))

    def _keep(self, batch: DecodeBatch, rows: list[int], add: bool = False) -> None:
        if not rows:
            if batch in self.batches:
                self.batches.remove(batch)
            return
        if len(rows) < len(batch.seqs):
            batch.keep(rows)
        if add:
            self.batches.append(batch)

    # ------------------------------------------------------------------ sampling

    def _sample(self, batch: DecodeBatch, logits) -> list[int]:
        """Pick each row's next token, record it, emit events; returns the rows still running."""
        import torch

        eos = self.engine.tokenizer.eos_token_id
        greedy = logits.argmax(dim=-1).tolist()  # one op for every greedy row
        keep, nxt = [], []
        for i, seq in enumerate(batch.seqs):
            if seq.cancelled:
                nxt.append(0)  # a placeholder: the row is dropped below
                continue
            token = greedy[i] if seq.req.temperature <= 0 else _pick(logits[i].float(), seq)
            if seq.req.logprobs is not None:
                seq.logprobs.append(self.engine.logprob_entry(logits[i].float(), token, seq.req.logprobs))
            if token == eos:
                seq.finish = "stop"
                if seq.logprobs:
                    seq.logprobs.pop()  # the EOS token is not part of the answer
            else:
                seq.ids.append(token)
                if self.engine.stopped(seq):
                    seq.finish = "stop"
                elif len(seq.ids) >= seq.req.max_tokens:
                    seq.finish = "length"
            if seq.finish:
                for event in self.engine.finish_events(seq):
                    seq.sink(event)
            else:
                if seq.stream:
                    delta = self.engine.delta_event(seq)
                    if delta:
                        seq.sink(delta)
                keep.append(i)
            nxt.append(token)
        batch.next_ids = torch.tensor(nxt, device=batch.next_ids.device)
        return keep


_CACHE_ARG: dict[type, str] = {}


def _cache_arg(model) -> str:
    """The forward's KV-cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base) not in _CACHE_ARG:
        _CACHE_ARG[type(base)] = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return _CACHE_ARG[type(base)]


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _pick(row, seq: Sequence) -> int:
    """Greedy, or temperature + top-p sampling (from the request's own generator if seeded)."""
    import torch

    req = seq.req
    if req.temperature <= 0:
        return int(row.argmax())
    probs = torch.softmax(row / req.temperature, dim=-1)
    if req.top_p < 1:
        sorted_p, idx = probs.sort(descending=True)
        sorted_p[(sorted_p.cumsum(0) - sorted_p) > req.top_p] = 0
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_p)
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def _message(exc: BaseException) -> str:
    return exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
