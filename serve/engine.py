"""The model side of a serve replica: one base model + one or many experts, and generation.

A replica builds one `Engine`. In multi-deployment mode it holds a single expert; in
single-device mode it holds every expert and switches per request *without reloading the
base model*:

- PEFT experts (lora/qlora) become named adapters of one `PeftModel`; a batch may mix them
  (`adapter_names=[...]` per row, PEFT's mixed-adapter batches, `__base__` = no adapter);
- SVF experts share one base with `apply_svf`; a request sets that expert's z vectors
  (`set_z`, an in-place copy) and batches are grouped per expert;
- full fine-tuned experts and the other PEFT methods (ia3, adalora, prefix, prompt tuning:
  no mixed-adapter batches in PEFT) are one model each.

The base model (`base`) is the PEFT model with adapters off, or the SVF model with z = 1, or
a plain copy when there is neither. Generation is continuous batching over the KV cache
(`raylib.serve.scheduler`): `submit` queues a request, the scheduler thread decodes it with
the others of its group a step at a time; `self.lock` guards one step (adapter routing and z
are per-model state) or one expert change, never a whole generation.

Experts can be added and removed while the replica serves (`add_expert` / `remove_expert`,
or lazily from a request's `registry` {name: path or URI}, which also re-creates them in a
replica Serve restarted): a LoRA adapter is loaded into the existing `PeftModel` (the plain
base model is wrapped in place when there is none yet), SVF z vectors join the SVF model with
the same targets/layers (the plain base is decomposed in place when there is none). Only
experts without a shared model (full, ia3, ...) or SVF experts with other targets load a new
copy of the base weights.

A request may also mix experts (`mix` {name: weight}): SVF experts by z_mix = 1 + sum w_k (z_k - 1)
(`svf.mix`), LoRA experts by PEFT's `add_weighted_adapter` (`combination` linear or cat). Each
weight set becomes a slot of its own, kept in a small LRU cache (`mix_cache` entries).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from raylib.serve import prompts
from raylib.serve.interface import ServingEngine, Sink
from raylib.serve.requests import GenRequest
from raylib.serve.scheduler import Scheduler, Sequence

log = logging.getLogger("raylib.serve")

BASE = "base"
PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches


@dataclass
class _Slot:
    """Where an expert lives: which model object and how to select it."""

    family: str  # peft | svf | full | base
    model: Any
    template: str
    z: dict | None = None
    adapter: str | None = None  # PEFT adapter name when it differs from the slot name (mixes)
    stepwise: bool = True  # Method.serve_stepwise: decoded step by step in continuous batches


class Engine(ServingEngine):
    """The HF engine: transformers/PEFT models of one base, decoded by the Scheduler."""

    name = "hf"

    def __init__(self, base_model: str, experts: dict[str, str], base_template: str = "alpaca",
                 dtype: str = "auto", device: str | None = None, include_base: bool = True, mix_cache: int = 4,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005):
        import torch

        from raylib.config import ModelConfig
        from raylib.experts import read_expert
        from raylib.models import load_model, load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        mcfg = ModelConfig(path=base_model, dtype=dtype)
        self.tokenizer = load_tokenizer(mcfg)
        self.slots: dict[str, _Slot] = {}
        self.switch_times: list[float] = []  # seconds per SVF z switch (set_z + weight rebuild)
        self.lock = threading.Lock()  # held for one decoding step or one expert change at a time
        self._current_svf: str | None = None
        self._routing: tuple | None = None  # ((PeftModel id, row adapters), installed hooks or None)
        self._mcfg, self.base_model, self.base_template = mcfg, base_model, base_template
        self._svf_models: dict[str, Any] = {}  # json [targets, layers] -> the SVF model for them
        self._dynamic: dict[str, str] = {}  # experts added at run time -> their path/URI
        self._mixes: "OrderedDict[tuple, str]" = OrderedDict()  # LRU: (combination, weights) -> slot
        self.mix_cache = mix_cache
        self.scheduler = Scheduler(self, max_batch_size=max_batch_size, wait_s=batch_wait_timeout_s)
        infos = {name: read_expert(path) for name, path in experts.items()}
        t0 = time.perf_counter()

        def fresh():
            return load_model(mcfg, self.device, inference=True).to(self.device).eval()

        from raylib.methods import get_method

        sharing = {n: get_method(i.method).serve_sharing for n, i in infos.items()}  # registry capability
        peft_names = [n for n in infos if sharing[n] == "adapter"]
        svf_names = [n for n in infos if sharing[n] == "z"]
        if peft_names:
            from peft import PeftModel

            first = peft_names[0]
            pm = PeftModel.from_pretrained(fresh(), experts[first], adapter_name=first).eval()
            for name in peft_names[1:]:
                pm.load_adapter(experts[name], adapter_name=name)
            pm.eval()
            for name in peft_names:
                self.slots[name] = _Slot("peft", pm, infos[name].template)
            if include_base:
                self.slots[BASE] = _Slot("base-peft", pm, base_template)
        if svf_names:
            from raylib.methods import svf

            groups: dict[str, list[str]] = {}
            for name in svf_names:
                cfg = svf.read_svf_config(experts[name])
                groups.setdefault(json.dumps([cfg["targets"], cfg["layers"]]), []).append(name)
            for key, names in groups.items():
                targets, layers = json.loads(key)
                model = svf.apply_svf(fresh(), targets, layers, forward="rebuild", model_path=base_model)
                self._svf_models[key] = model
                for name in names:
                    self.slots[name] = _Slot("svf", model, infos[name].template, z=svf.load_z(experts[name]))
                if include_base and BASE not in self.slots:
                    self.slots[BASE] = _Slot("svf", model, base_template, z=None)
        for name, info in infos.items():
            if sharing[name] is None:  # full, and PEFT methods without mixed batches: a model each
                method = get_method(info.method)
                model = method.load(fresh(), experts[name]).to(self.device).eval()
                self.slots[name] = _Slot("full", model, info.template, stepwise=method.serve_stepwise)
        if include_base and BASE not in self.slots:
            self.slots[BASE] = _Slot("base", fresh(), base_template)
        self.load_s = time.perf_counter() - t0
        log.info("engine: %s loaded in %.2fs", sorted(self.slots), self.load_s)

    # ------------------------------------------------------------------ prompts

    @property
    def names(self) -> list[str]:
        """Experts (and base) held; cached mixes are slots too but not listed."""
        return sorted(n for n in self.slots if not n.startswith("mix("))

    def render(self, req: GenRequest) -> str:
        return prompts.render(self.tokenizer, self.slots[req.expert].template, req)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def _stops(self, req: GenRequest) -> list[str]:
        return prompts.stops(self.slots[req.expert].template, req)

    # ------------------------------------------------------------------ selection

    def _select(self, name: str, batch_names: list[str]) -> tuple[Any, dict]:
        """Make the model compute as expert `name` (all of `batch_names` for PEFT batches);
        returns (model, extra generate kwargs)."""
        slot = self.slots[name]
        if slot.family == "base-peft" and not slot.model.peft_config:  # every adapter removed at run time
            return slot.model.base_model.model, {}
        if slot.family in ("peft", "base-peft"):
            names = [(self.slots[n].adapter or n) if self.slots[n].family == "peft" else PEFT_BASE for n in batch_names]
            return slot.model, self._route_adapters(slot.model, names)
        if slot.family == "svf":
            if self._current_svf != name:
                from raylib.methods import svf

                t0 = time.perf_counter()
                svf.set_z(slot.model, slot.z)
                self._rebuild(slot.model)
                self.switch_times.append(time.perf_counter() - t0)
                self._current_svf = name
            return slot.model, {}
        return slot.model, {}

    def _route_adapters(self, pm, names: list[str]) -> dict:
        """Point the PeftModel's rows at their adapters, once per batch composition: one adapter
        is PEFT's plain forward (`set_adapter`); a mix of rows keeps PEFT's mixed-batch hooks
        (what `adapter_names=` installs on every call, walking every module) installed across
        the decoding steps until the rows change. Returns extra forward kwargs."""
        key = (id(pm), tuple(names))
        if self._routing is not None and self._routing[0] == key:
            return {}
        self._end_routing()
        if len(set(names)) == 1 and names[0] != PEFT_BASE:
            pm.set_adapter(names[0])
            self._routing = (key, None)
            return {}
        hooks = getattr(pm, "_enable_peft_forward_hooks", None)
        if hooks is None:  # a PEFT without it: the per-call argument
            return {"adapter_names": names}
        ctx = hooks(adapter_names=names)
        ctx.__enter__()
        self._routing = (key, ctx)
        return {}

    def _end_routing(self) -> None:
        """Remove the installed mixed-batch hooks (before adapters change or rows regroup)."""
        if self._routing is not None and self._routing[1] is not None:
            self._routing[1].__exit__(None, None, None)
        self._routing = None

    @staticmethod
    def _rebuild(model) -> None:
        """Form the adapted weights now (part of the switch, not of the first request)."""
        import torch

        from raylib.methods import svf

        with torch.no_grad():
            for m in svf.svf_modules(model).values():
                if m.mode == "rebuild":
                    m(torch.zeros(1, m.in_features, dtype=m.U.dtype, device=m.U.device))

    # ------------------------------------------------------------------ experts at run time

    def _fresh(self):
        from raylib.models import load_model

        return load_model(self._mcfg, self.device, inference=True).to(self.device).eval()

    def _peft_model(self):
        return next((s.model for s in self.slots.values() if s.family in ("peft", "base-peft")), None)

    def add_expert(self, name: str, source: str) -> dict:
        """Load the expert at `source` (path or URI) as `name` into this engine, sharing the
        base weights it already holds where the method allows; replaces an expert of that name."""
        with self.lock:
            return self._add(name, source)

    def remove_expert(self, name: str) -> bool:
        with self.lock:
            return self._remove(name)

    def _add(self, name: str, source: str) -> dict:
        from raylib.experts import read_expert, resolve_expert
        from raylib.methods import svf

        if name in (BASE,) or name.startswith("mix("):
            raise ValueError(f"{name!r} is a reserved name")
        path = resolve_expert(source, f"experts.{name}")
        info = read_expert(path)
        self._end_routing()  # adapters are about to change
        if name in self.slots:
            self._remove(name)
        t0, shared = time.perf_counter(), True
        base = self.slots.get(BASE)
        from raylib.methods import get_method

        method = get_method(info.method)
        if method.serve_sharing == "adapter":
            pm = self._peft_model()
            if pm is not None:
                pm.load_adapter(path, adapter_name=name)
            else:
                from peft import PeftModel

                if base is not None and base.family == "base":  # wrap the plain base in place
                    pm = PeftModel.from_pretrained(base.model, path, adapter_name=name)
                    self.slots[BASE] = _Slot("base-peft", pm, base.template)
                else:
                    pm, shared = PeftModel.from_pretrained(self._fresh(), path, adapter_name=name), False
            pm.eval()
            self.slots[name] = _Slot("peft", pm, info.template)
        elif method.serve_sharing == "z":
            cfg = svf.read_svf_config(path)
            key = json.dumps([cfg["targets"], cfg["layers"]])
            model = self._svf_models.get(key)
            if model is None:
                if base is not None and base.family == "base":  # decompose the plain base in place
                    model = svf.apply_svf(base.model, cfg["targets"], cfg["layers"], forward="rebuild",
                                          model_path=self.base_model)
                    self.slots[BASE] = _Slot("svf", model, base.template, z=None)
                else:
                    model, shared = svf.apply_svf(self._fresh(), cfg["targets"], cfg["layers"], forward="rebuild",
                                                  model_path=self.base_model), False
                self._svf_models[key] = model
            self.slots[name] = _Slot("svf", model, info.template, z=svf.load_z(path))
        else:
            model = method.load(self._fresh(), path).to(self.device).eval()
            self.slots[name], shared = _Slot("full", model, info.template, stepwise=method.serve_stepwise), False
        self._dynamic[name] = source
        took = time.perf_counter() - t0
        log.info("engine: added %s (%s) in %.2fs, base weights %s", name, info.method, took,
                 "shared" if shared else "loaded again")
        return {"name": name, "method": info.method, "load_s": took, "shared_base": shared, "experts": self.names}

    def _remove(self, name: str) -> bool:
        self._end_routing()  # PEFT picks another active adapter when one is deleted
        uses = {name, *(label for key, label in self._mixes.items() if name in dict(key[1]))}
        self.scheduler.abort(lambda s: s.req.expert in uses, f"expert {name!r} was removed while this request ran")
        slot = self.slots.pop(name, None)
        self._dynamic.pop(name, None)
        for key in [k for k in self._mixes if name in dict(k[1])]:
            self._drop_mix(key)
        if slot is None:
            return False
        if slot.family == "peft" and name in slot.model.peft_config:
            _delete_adapter(slot.model, name)
        if self._current_svf == name:
            self._current_svf = None
        return True

    def _drop_mix(self, key: tuple) -> None:
        self._end_routing()
        name = self._mixes.pop(key)
        slot = self.slots.pop(name, None)
        if slot is not None and slot.family == "peft":
            _delete_adapter(slot.model, slot.adapter)
        if self._current_svf == name:
            self._current_svf = None

    def _prepare(self, req: GenRequest) -> None:
        """Bring the request's experts in (from `registry`), drop run-time experts the router no
        longer knows, and turn a mix into its (cached) slot: `req.expert` names a slot after it."""
        if req.registry is not None:
            for name in [n for n, src in self._dynamic.items() if req.registry.get(n) != src]:
                self._remove(name)
        needed = list(req.mix) if req.mix else [req.expert]
        for name in needed:
            if name not in self.slots:
                if req.registry and name in req.registry:
                    self._add(name, req.registry[name])
                else:
                    raise KeyError(f"this replica serves {self.names}, not {name!r}")
        if req.mix:
            req.expert = self._mix_slot(req.mix, req.combination)

    def _mix_slot(self, weights: dict[str, float], combination: str) -> str:
        """The slot serving this weighted mix, built on first use and kept in an LRU cache."""
        import hashlib

        from raylib.methods import svf

        items = tuple(sorted((n, float(w)) for n, w in weights.items()))
        key = (combination, items)
        if key in self._mixes:
            self._mixes.move_to_end(key)
            return self._mixes[key]
        names, ws = [n for n, _ in items], [w for _, w in items]
        if BASE in names:
            raise ValueError("mix experts, not the base model")
        slots = [self.slots[n] for n in names]
        families = {s.family for s in slots}
        label = "mix(" + ",".join(f"{n}={w:g}" for n, w in items)
        label += ")" if combination == "linear" else f";{combination})"
        if families == {"svf"}:
            if len({id(s.model) for s in slots}) > 1:
                raise ValueError(f"SVF experts {names} adapt different modules (targets/layers): "
                                 "cannot mix their z vectors")
            if combination != "linear":
                raise ValueError(f"SVF experts mix linearly (z = sum w_k z_k); combination {combination!r} is for LoRA")
            slot = _Slot("svf", slots[0].model, slots[0].template, z=svf.mix([s.z for s in slots], ws))
        elif families == {"peft"}:
            pm = slots[0].model
            adapter = "mix_" + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
            self._end_routing()
            try:
                pm.add_weighted_adapter(names, ws, adapter_name=adapter, combination_type=combination)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"PEFT cannot mix {names} with combination {combination!r}: {exc}") from None
            pm.eval()
            slot = _Slot("peft", pm, slots[0].template, adapter=adapter)
        else:
            kinds = {n: s.family for n, s in zip(names, slots)}
            raise ValueError(f"mix SVF experts with SVF experts or LoRA adapters with LoRA adapters, got {kinds}")
        self.slots[label] = slot
        self._mixes[key] = label
        idle = [k for k, n in self._mixes.items() if n != label and not self.scheduler.in_use(n)]
        for k in idle[: max(0, len(self._mixes) - self.mix_cache)]:  # the oldest mixes no request decodes
            self._drop_mix(k)
        return label

    # ------------------------------------------------------------------ generation (Scheduler)

    def submit(self, raw: "GenRequest | dict", sink: Sink, stream: bool = False) -> Sequence:
        """Queue one request for the scheduler; `sink(event)` is called from its thread with
        {"delta"} pieces (streams), then the result ({"done": True, "text", ...}), or
        {"error"} (a bad expert or mix) / {"exception"} (the forward failed)."""
        import torch

        req = GenRequest.of(raw)
        gen = None
        if req.temperature > 0 and req.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(req.seed)
        seq = Sequence(req, [], [], sink, stream=stream, generator=gen)
        self.scheduler.submit(seq)
        return seq

    def cancel(self, handle: Sequence) -> None:
        handle.cancelled = True

    def stats(self) -> dict:
        s = self.scheduler
        return {"steps": s.steps, "running": len(s.running()), "pending": s.pending.qsize(), "max_rows": s.max_rows,
                "batches": len(s.batches), "switch_times": list(self.switch_times)}

    # called by the Scheduler, engine lock held

    def prepare(self, seq: Sequence) -> None:
        """Bring the request's experts in, resolve a mix to its slot, render and tokenize."""
        req = seq.req
        self._prepare(req)
        ids = self.tokenizer(self.render(req))["input_ids"]
        tok = self.tokenizer
        seq.prompt_ids = list(ids) or [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        seq.stops = self._stops(req)

    def group_key(self, req: GenRequest) -> tuple:
        """Requests with one key share a forward pass: one PEFT model (adapters per row), one
        SVF expert (z is model state), one other model; experts that cannot be stepped
        ("whole": prompt learning) generate one request at a time."""
        slot = self.slots[req.expert]
        if not slot.stepwise:
            return ("whole", req.expert)
        if slot.family in ("peft", "base-peft"):
            return ("peft", id(slot.model))
        return (slot.family, req.expert)

    def generate_whole(self, seqs: list[Sequence]) -> None:
        """`model.generate` start to finish for experts whose forward cannot be stepped over a
        KV cache by the scheduler (PEFT prompt learning prepends virtual tokens in it). One
        request at a time: left padding would sit between the virtual tokens and the prompt
        and change the answer."""
        for seq in seqs:
            self._generate_one(seq)

    def _generate_one(self, seq: Sequence) -> None:
        import torch

        tok, req = self.tokenizer, seq.req
        ids = torch.tensor([seq.prompt_ids], device=self.device)
        kw = dict(max_new_tokens=req.max_tokens, eos_token_id=tok.eos_token_id, use_cache=True, top_k=None,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                  output_logits=True, return_dict_in_generate=True)
        if req.temperature > 0:
            kw.update(do_sample=True, temperature=req.temperature, top_p=req.top_p)
            if req.seed is not None:
                torch.manual_seed(req.seed)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None)
        if seq.stops:
            kw.update(stop_strings=seq.stops, tokenizer=tok)
        model, extra = self._select(req.expert, [req.expert])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw, **extra)
        for t, token in enumerate(out.sequences[0][ids.shape[1]:].tolist()[: req.max_tokens]):
            if token == tok.eos_token_id:
                seq.finish = "stop"
                break
            seq.ids.append(token)
            if req.logprobs is not None:
                seq.logprobs.append(self.logprob_entry(out.logits[t][0], token, req.logprobs))
            if self.stopped(seq):
                seq.finish = "stop"
                break
        seq.finish = seq.finish or "length"
        for event in self.finish_events(seq):
            seq.sink(event)

    def forward_for(self, names: list[str]) -> tuple[Any, dict]:
        return self._select(names[0], names)

    def stopped(self, seq: Sequence) -> bool:
        return bool(seq.stops) and prompts.cut(self._text(seq), seq.stops)[1]

    def _text(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.ids, skip_special_tokens=True)

    def delta_event(self, seq: Sequence) -> dict | None:
        """The stream's next piece (prompts.stream_piece: what can no longer change is shown)."""
        piece = prompts.stream_piece(self._text(seq), seq.stops, seq.sent, seq.req.kind == "chat")
        if piece is None:
            return None
        text, seq.sent = piece
        return {"delta": text}

    def finish_events(self, seq: Sequence) -> list[dict]:
        req = seq.req
        text, cut = prompts.answer(self._text(seq), seq.stops, req.kind == "chat")
        events = []
        if seq.stream and len(text) > seq.sent:
            events.append({"delta": text[seq.sent:]})
        result = {"done": True, "text": text, "finish_reason": seq.finish, "expert": req.expert,
                  "prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.ids)}
        if req.logprobs is not None:
            shown = prompts.shown_tokens(self.tokenizer, seq.ids, text, req.kind == "chat") if cut else len(seq.ids)
            result["logprobs"] = seq.logprobs[:shown]
        return events + [result]

    def logprob_entry(self, row, token: int, k: int) -> dict:
        """Log-probabilities under the model itself (raw logits, before temperature / top-p,
        as vLLM reports them by default): the token's and its k most likely alternatives."""
        import torch

        lp = torch.log_softmax(row.float(), dim=-1)
        top = torch.topk(lp, k) if k else None
        return {"token": self.tokenizer.decode([token]), "logprob": float(lp[token]),
                "top": [] if top is None else [[self.tokenizer.decode([int(i)]), float(v)]
                                               for v, i in zip(top.values, top.indices)]}

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Base-model vectors (adapters off, z = 1), mean-pooled (raylib.serve.embedding)."""
        from raylib.serve.embedding import mean_pooled

        with self.lock:
            model, extra = self._select(BASE, [BASE] * len(texts))
            return mean_pooled(model, self.tokenizer, texts, **extra)


def _delete_adapter(pm, name: str) -> None:
    """PEFT's delete_adapter, with another adapter made active first when `name` is the active
    one (PEFT would pick one itself and warn about it)."""
    others = [a for a in pm.peft_config if a != name]
    if name in getattr(pm, "active_adapters", []) and others:
        pm.set_adapter(others[0])
    pm.delete_adapter(name)
