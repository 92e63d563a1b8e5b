"""The model side of a serve replica: one base model + one or many experts, and generation.

A replica builds one `Engine`. In multi-deployment mode it holds a single expert; in
single-device mode it holds every expert and switches per request *without reloading the
base model*:

- PEFT experts (lora/qlora) become named adapters of one `PeftModel`; a batch may mix them
  (`generate(..., adapter_names=[...])`, PEFT's mixed-adapter batches, `__base__` = no adapter);
- SVF experts share one base with `apply_svf`; a request sets that expert's z vectors
  (`set_z`, an in-place copy) and batches are grouped per expert;
- full fine-tuned experts and the other PEFT methods (ia3, adalora, prefix, prompt tuning:
  no mixed-adapter batches in PEFT) are one model each.

The base model (`base`) is the PEFT model with adapters off, or the SVF model with z = 1, or
a plain copy when there is neither. Generation is `model.generate` with the KV cache; a lock
keeps one generate at a time per replica (adapter routing and z are per-model state).

Experts can be added and removed while the replica serves (`add_expert` / `remove_expert`,
or lazily from a request's `registry` {name: path or URI}, which also re-creates them in a
replica Serve restarted): a LoRA adapter is loaded into the existing `PeftModel` (the plain
base model is wrapped in place when there is none yet), SVF z vectors join the SVF model with
the same targets/layers (the plain base is decomposed in place when there is none). Only
experts without a shared model (full, ia3, ...) or SVF experts with other targets load a new
copy of the base weights.

A request may also mix experts (`mix` {name: weight}): SVF experts by z_mix = sum w_k z_k
(`svf.mix`), LoRA experts by PEFT's `add_weighted_adapter` (`combination` linear or cat). Each
weight set becomes a slot of its own, kept in a small LRU cache (`mix_cache` entries).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

log = logging.getLogger("raylib.serve")

BASE = "base"
PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches
END_MARKERS = ("### End", "\n\n###")  # the alpaca template's end (see raylib.evaluation)


@dataclass
class GenRequest:
    expert: str
    kind: str = "completion"  # completion: `prompt` as is; chat: `messages` in the expert's template
    prompt: str = ""
    messages: list[dict] = field(default_factory=list)
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    mix: dict[str, float] | None = None  # expert -> weight: serve a weighted mix of experts
    combination: str = "linear"  # LoRA mixes: PEFT add_weighted_adapter combination_type
    registry: dict[str, str] | None = None  # run-time experts (name -> path/URI) the router knows
    seed: int | None = None  # sampling: the same seed gives the same text (the request runs alone)
    logprobs: int | None = None  # None: none; k: each token's logprob and its k most likely alternatives

    @classmethod
    def of(cls, raw: dict | "GenRequest") -> "GenRequest":
        return raw if isinstance(raw, GenRequest) else cls(**raw)


@dataclass
class _Slot:
    """Where an expert lives: which model object and how to select it."""

    family: str  # peft | svf | full | base
    model: Any
    template: str
    z: dict | None = None
    adapter: str | None = None  # PEFT adapter name when it differs from the slot name (mixes)


class Engine:
    def __init__(self, base_model: str, experts: dict[str, str], base_template: str = "alpaca",
                 dtype: str = "auto", device: str | None = None, include_base: bool = True, mix_cache: int = 4):
        import torch

        from raylib.config import ModelConfig
        from raylib.experts import read_expert
        from raylib.models import load_model, load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        mcfg = ModelConfig(path=base_model, dtype=dtype)
        self.tokenizer = load_tokenizer(mcfg)
        self.slots: dict[str, _Slot] = {}
        self.switch_times: list[float] = []  # seconds per SVF z switch (set_z + weight rebuild)
        self._lock = threading.Lock()
        self._current_svf: str | None = None
        self._mcfg, self.base_model, self.base_template = mcfg, base_model, base_template
        self._svf_models: dict[str, Any] = {}  # json [targets, layers] -> the SVF model for them
        self._dynamic: dict[str, str] = {}  # experts added at run time -> their path/URI
        self._mixes: "OrderedDict[tuple, str]" = OrderedDict()  # LRU: (combination, weights) -> slot
        self.mix_cache = mix_cache
        infos = {name: read_expert(path) for name, path in experts.items()}
        t0 = time.perf_counter()

        def fresh():
            return load_model(mcfg, self.device, inference=True).to(self.device).eval()

        peft_names = [n for n, i in infos.items() if i.method in ("lora", "qlora")]
        svf_names = [n for n, i in infos.items() if i.method == "svf"]
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
            if info.method not in ("lora", "qlora", "svf"):  # full, and PEFT methods without mixed batches
                from raylib.methods import get_method

                model = get_method(info.method).load(fresh(), experts[name]).to(self.device).eval()
                self.slots[name] = _Slot("full", model, info.template)
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
        """The prompt text: completions as sent; chat via the expert's training template
        (alpaca: the last user message is the instruction, system text its input)."""
        if req.kind != "chat":
            return req.prompt
        from raylib.data import render_prompt

        template = self.slots[req.expert].template
        if template == "chat":
            return self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        user = [m["content"] for m in req.messages if m.get("role") == "user"]
        system = [m["content"] for m in req.messages if m.get("role") == "system"]
        return render_prompt(template, user[-1] if user else "", "\n".join(system), self.tokenizer)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def _stops(self, req: GenRequest) -> list[str]:
        stops = list(req.stop)
        if req.kind == "chat" and self.slots[req.expert].template == "alpaca":
            stops += list(END_MARKERS)
        return stops

    # ------------------------------------------------------------------ selection

    def _select(self, name: str, batch_names: list[str]) -> tuple[Any, dict]:
        """Make the model compute as expert `name` (all of `batch_names` for PEFT batches);
        returns (model, extra generate kwargs)."""
        slot = self.slots[name]
        if slot.family == "base-peft" and not slot.model.peft_config:  # every adapter removed at run time
            return slot.model.base_model.model, {}
        if slot.family in ("peft", "base-peft"):
            names = [(self.slots[n].adapter or n) if self.slots[n].family == "peft" else PEFT_BASE for n in batch_names]
            return slot.model, {"adapter_names": names}
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

    @staticmethod
    def _rebuild(model) -> None:
        """Form the adapted weights now (part of the switch, not of the first request)."""
        import torch

        from raylib.methods import svf

        with torch.no_grad():
            for m in svf.svf_modules(model).values():
                if m.mode == "rebuild":
                    m(torch.zeros(1, m.in_features, dtype=m.U.dtype, device=m.U.device))

    def _group_key(self, req: GenRequest) -> tuple:
        slot = self.slots[req.expert]
        model_key = id(slot.model) if slot.family in ("peft", "base-peft") else req.expert
        seeded = id(req) if req.temperature > 0 and req.seed is not None else None  # a seeded draw runs alone
        return (model_key, req.temperature > 0, req.temperature, req.top_p, tuple(self._stops(req)), req.kind, seeded)

    def _gen_kwargs(self, req: GenRequest, max_new: int) -> dict:
        kw = dict(max_new_tokens=max_new, pad_token_id=self.tokenizer.pad_token_id,
                  eos_token_id=self.tokenizer.eos_token_id, use_cache=True)
        if req.temperature > 0:
            kw.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        stops = self._stops(req)
        if stops:
            kw.update(stop_strings=stops, tokenizer=self.tokenizer)
        return kw

    # ------------------------------------------------------------------ experts at run time

    def _fresh(self):
        from raylib.models import load_model

        return load_model(self._mcfg, self.device, inference=True).to(self.device).eval()

    def _peft_model(self):
        return next((s.model for s in self.slots.values() if s.family in ("peft", "base-peft")), None)

    def add_expert(self, name: str, source: str) -> dict:
        """Load the expert at `source` (path or URI) as `name` into this engine, sharing the
        base weights it already holds where the method allows; replaces an expert of that name."""
        with self._lock:
            return self._add(name, source)

    def remove_expert(self, name: str) -> bool:
        with self._lock:
            return self._remove(name)

    def _add(self, name: str, source: str) -> dict:
        from raylib.experts import read_expert, resolve_expert
        from raylib.methods import svf

        if name in (BASE,) or name.startswith("mix("):
            raise ValueError(f"{name!r} is a reserved name")
        path = resolve_expert(source, f"experts.{name}")
        info = read_expert(path)
        if name in self.slots:
            self._remove(name)
        t0, shared = time.perf_counter(), True
        base = self.slots.get(BASE)
        if info.method in ("lora", "qlora"):
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
        elif info.method == "svf":
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
            from raylib.methods import get_method

            model = get_method(info.method).load(self._fresh(), path).to(self.device).eval()
            self.slots[name], shared = _Slot("full", model, info.template), False
        self._dynamic[name] = source
        took = time.perf_counter() - t0
        log.info("engine: added %s (%s) in %.2fs, base weights %s", name, info.method, took,
                 "shared" if shared else "loaded again")
        return {"name": name, "method": info.method, "load_s": took, "shared_base": shared, "experts": self.names}

    def _remove(self, name: str) -> bool:
        slot = self.slots.pop(name, None)
        self._dynamic.pop(name, None)
        for key in [k for k in self._mixes if name in dict(k[1])]:
            self._drop_mix(key)
        if slot is None:
            return False
        if slot.family == "peft" and name in slot.model.peft_config:
            slot.model.delete_adapter(name)
        if self._current_svf == name:
            self._current_svf = None
        return True

    def _drop_mix(self, key: tuple) -> None:
        name = self._mixes.pop(key)
        slot = self.slots.pop(name, None)
        if slot is not None and slot.family == "peft":
            slot.model.delete_adapter(slot.adapter)
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
        while len(self._mixes) > self.mix_cache:
            self._drop_mix(next(iter(self._mixes)))
        return label

    # ------------------------------------------------------------------ generation

    def generate(self, raw_reqs: list) -> list[dict]:
        """Non-streaming generation for a batch; requests sharing a model and sampling
        settings run as one left-padded `generate` call."""
        reqs = [GenRequest.of(r) for r in raw_reqs]
        out: list[dict | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        with self._lock:
            for i, r in enumerate(reqs):
                try:  # a request that names a bad mix fails alone, not its whole batch
                    self._prepare(r)
                except (KeyError, ValueError) as exc:
                    out[i] = {"error": _message(exc), "expert": r.expert}
                    continue
                groups.setdefault(self._group_key(r), []).append(i)
            for idx in groups.values():
                for i, res in zip(idx, self._generate_group([reqs[i] for i in idx])):
                    out[i] = res
        return out  # type: ignore[return-value]

    def _generate_group(self, reqs: list[GenRequest]) -> list[dict]:
        import torch

        prompts = [self.render(r) for r in reqs]
        model, extra = self._select(reqs[0].expert, [r.expert for r in reqs])
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(prompts, return_tensors="pt", padding=True).to(self.device)
        finally:
            tok.padding_side = side
        max_new = max(r.max_tokens for r in reqs)
        kwargs = self._gen_kwargs(reqs[0], max_new)
        with_logprobs = any(r.logprobs is not None for r in reqs)
        if with_logprobs:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        _seed(reqs[0])
        with torch.no_grad():
            out = model.generate(**enc, **kwargs, **extra)
        seqs = out.sequences if with_logprobs else out
        width = enc["input_ids"].shape[1]
        results = []
        for j, r in enumerate(reqs):
            comp = seqs[j][width:].tolist()[: r.max_tokens]
            finish = "length"
            if tok.eos_token_id in comp:
                comp = comp[: comp.index(tok.eos_token_id)]
                finish = "stop"
            while comp and comp[-1] == tok.pad_token_id:
                comp.pop()
            text, cut = _cut(tok.decode(comp, skip_special_tokens=True), self._stops(r))
            if cut:
                finish = "stop"
            if r.kind == "chat":
                text = text.strip()
            res = {"text": text, "finish_reason": finish, "expert": r.expert,
                   "prompt_tokens": int(enc["attention_mask"][j].sum()), "completion_tokens": len(comp)}
            if r.logprobs is not None:
                shown = self._shown_tokens(comp, text, r) if cut else len(comp)
                res["logprobs"] = self._logprobs([step[j] for step in out.logits[:shown]], comp[:shown], r.logprobs)
            results.append(res)
        return results

    def _shown_tokens(self, comp: list[int], text: str, req: GenRequest) -> int:
        """How many generated tokens the returned (stop-cut) text is made of."""
        for m in range(len(comp) + 1):
            piece = self.tokenizer.decode(comp[:m], skip_special_tokens=True)
            if len(piece.strip() if req.kind == "chat" else piece) >= len(text):
                return m
        return len(comp)

    def _logprobs(self, logits: list, tokens: list[int], k: int) -> list[dict]:
        """Log-probabilities under the model itself (raw logits, before temperature / top-p,
        as vLLM reports them by default): each token's and its k most likely alternatives."""
        import torch

        entries = []
        for row, tid in zip(logits, tokens):
            lp = torch.log_softmax(row.float(), dim=-1)
            top = torch.topk(lp, k) if k else None
            entries.append({"token": self.tokenizer.decode([tid]), "logprob": float(lp[tid]),
                            "top": [] if top is None else [[self.tokenizer.decode([int(i)]), float(v)]
                                                           for v, i in zip(top.values, top.indices)]})
        return entries

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One vector per text from the base model (adapters off, z = 1): the mean of the last
        hidden layer over the text's tokens (padding masked), L2-normalised. Decoder LMs have
        no pooled output; mean pooling is the usual choice and needs no extra weights.
        Returns (vectors, input tokens)."""
        import torch

        with self._lock:
            model, extra = self._select(BASE, [BASE] * len(texts))
            enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
            with torch.no_grad():
                out = model(**enc, output_hidden_states=True, **extra)
            hidden = out.hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
        return vectors.tolist(), int(enc["attention_mask"].sum())

    def stream(self, raw_req) -> Iterator[dict]:
        """Streaming generation of one request: yields {"delta": text} pieces as tokens come
        out of `generate` (TextIteratorStreamer), then a final {"finish_reason", usage...}."""
        import torch
        from transformers import TextIteratorStreamer

        req = GenRequest.of(raw_req)
        with self._lock:
            try:
                self._prepare(req)
            except (KeyError, ValueError) as exc:
                yield {"error": _message(exc)}
                return
            stops = self._stops(req)
            hold = max((len(s) for s in stops), default=1) - 1
            prompt = self.render(req)
            model, extra = self._select(req.expert, [req.expert])
            enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            kwargs = {**enc, **self._gen_kwargs(req, req.max_tokens), **extra, "streamer": streamer}
            result: dict = {}
            _seed(req)

            def run():
                try:
                    with torch.no_grad():
                        result["seq"] = model.generate(**kwargs)
                except BaseException as exc:  # surfaced after the stream ends
                    result["error"] = exc
                    streamer.end()

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            text, sent, stopped = "", 0, False
            for piece in streamer:
                if stopped:
                    continue  # drain: generate stops at the stop string by itself
                text += piece
                visible, cut = _cut(text, stops)
                if req.kind == "chat":
                    visible = visible.lstrip()
                if cut:
                    stopped = True
                    end = len(visible.rstrip()) if req.kind == "chat" else len(visible)
                else:
                    end = max(sent, len(visible) - hold)
                    if req.kind == "chat":  # trailing space may turn out to be the end (stripped)
                        end = max(sent, min(end, len(visible.rstrip())))
                if end > sent:
                    yield {"delta": visible[sent:end]}
                    sent = end
            thread.join()
            if "error" in result:
                raise result["error"]
            visible, cut = _cut(text, stops)
            if req.kind == "chat":
                visible = visible.strip()
            if len(visible) > sent:
                yield {"delta": visible[sent:]}
            comp = result["seq"][0][enc["input_ids"].shape[1]:].tolist()
            finish = "stop" if cut or self.tokenizer.eos_token_id in comp else "length"
            if self.tokenizer.eos_token_id in comp:
                comp = comp[: comp.index(self.tokenizer.eos_token_id)]
            yield {"finish_reason": finish, "expert": req.expert, "prompt_tokens": enc["input_ids"].shape[1],
                   "completion_tokens": len(comp)}


def _seed(req: GenRequest) -> None:
    """Seed the sampler for a seeded request (it runs alone, under the engine lock)."""
    if req.temperature > 0 and req.seed is not None:
        import torch

        torch.manual_seed(req.seed)


def _message(exc: BaseException) -> str:
    return exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:first], True) if first >= 0 else (text, False)
