"""Yesterday's serve engine, kept runnable for jobs/bench/serve_load.py only (the baseline row):
`model.generate` under one replica-wide lock. A batch runs start to finish (new requests wait
for its longest answer) and a stream holds the lock for its whole length. The served engine
is raylib.serve.engine.Engine (continuous batching, serve/scheduler.py). Delete this file
once the benchmark no longer reports the baseline.
"""

from __future__ import annotations

import threading
from typing import Iterator

from raylib.serve.engine import Engine, _cut
from raylib.serve.requests import GenRequest
from raylib.serve.scheduler import _message


def _seed(req: GenRequest) -> None:
    if req.temperature > 0 and req.seed is not None:
        import torch

        torch.manual_seed(req.seed)


class LockedEngine(Engine):
    """Engine with the old generate / stream (same experts, slots and prompts)."""

    def _locked_group_key(self, req: GenRequest) -> tuple:
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


    def generate(self, raw_reqs: list) -> list[dict]:
        """Non-streaming generation for a batch; requests sharing a model and sampling
        settings run as one left-padded `generate` call."""
        reqs = [GenRequest.of(r) for r in raw_reqs]
        out: list[dict | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        with self.lock:
            for i, r in enumerate(reqs):
                try:  # a request that names a bad mix fails alone, not its whole batch
                    self._prepare(r)
                except (KeyError, ValueError) as exc:
                    out[i] = {"error": _message(exc), "expert": r.expert}
                    continue
                groups.setdefault(self._locked_group_key(r), []).append(i)
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
                res["logprobs"] = [self.logprob_entry(step[j], t, r.logprobs)
                                   for step, t in zip(out.logits[:shown], comp[:shown])]
            results.append(res)
        return results

    def stream(self, raw_req) -> Iterator[dict]:
        """Streaming generation of one request: yields {"delta": text} pieces as tokens come
        out of `generate` (TextIteratorStreamer), then a final {"finish_reason", usage...}."""
        import torch
        from transformers import TextIteratorStreamer

        req = GenRequest.of(raw_req)
        with self.lock:
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

    def cancel(self, handle) -> None:
        """The old engine cannot stop a generation it started."""
