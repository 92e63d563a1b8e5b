"""The HF engine's continuous batching (raylib.serve.scheduler), without Ray: answers equal
`model.generate` run alone, requests join a running batch and leave it when done, streams
are batch members, and seeded sampling does not depend on what a request is batched with.
Random-weight tiny models of real architectures (they rarely emit EOS: long answers)."""

from __future__ import annotations

import os
import queue
import threading

import pytest

PROMPTS = ["What is 2 + 2? =>", "Reverse the word lamp and then", "hi",
           "Which is larger: 37 or 52? Tell me the answer please =>"]
MAX_TOKENS = [12, 30, 5, 20]


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    from raylib.tiny_models import build_family

    root = tmp_path_factory.mktemp("families")
    return lambda family: build_family(family, str(root / family))


def _alone(model_dir: str, prompt: str, max_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    comp = out[0][enc["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in comp:
        comp = comp[: comp.index(tok.eos_token_id)]
    return tok.decode(comp, skip_special_tokens=True)


def _final(q: queue.Queue) -> dict:
    while True:
        event = q.get(timeout=120)
        if "delta" not in event:
            return event


# llama / gpt2: one batch (left-padded joins); mistral: sliding-window caches decode as their own batches
@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_continuous_batches_answer_like_generate_alone(family_model, family):
    import torch

    from raylib.serve.engine import Engine

    torch.set_num_threads(1)
    path = family_model(family)
    engine = Engine(path, {})
    want = [_alone(path, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    queues, streamed = [], ""
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        q: queue.Queue = queue.Queue()
        engine.submit(dict(expert="base", prompt=prompt, max_tokens=n), q.put, stream=i == 1)
        queues.append(q)
        if i == 1:  # the rest join while this stream decodes
            first = q.get(timeout=120)
            assert "delta" in first, first
            streamed = first["delta"]
    results = []
    for i, q in enumerate(queues):
        if i == 1:
            while "delta" in (event := q.get(timeout=120)):
                streamed += event["delta"]
            results.append(event)
        else:
            results.append(_final(q))
    assert [r["text"] for r in results] == want
    assert streamed == want[1]
    for r, n in zip(results, MAX_TOKENS):  # a request leaves the batch at its own max_tokens (or EOS)
        assert r["completion_tokens"] <= n and (r["finish_reason"] == "length") == (r["completion_tokens"] == n)
    if family != "mistral":
        assert engine.stats()["max_rows"] >= 3  # the late requests joined the stream's batch


def test_a_short_request_finishes_while_a_long_one_decodes(family_model):
    import torch

    from raylib.serve.engine import Engine

    torch.set_num_threads(1)
    engine = Engine(family_model("llama"), {})
    streaming, long_done = threading.Event(), queue.Queue()

    def long_sink(event):
        if "delta" in event:
            streaming.set()
        else:
            long_done.put(event)

    engine.submit(dict(expert="base", prompt=PROMPTS[1], max_tokens=200), long_sink, stream=True)
    assert streaming.wait(timeout=120)
    short = engine.generate([dict(expert="base", prompt=PROMPTS[0], max_tokens=3)])[0]  # joins the running batch
    assert long_done.empty(), "the short request waited for the long stream to finish"
    assert short["completion_tokens"] <= 3
    long = long_done.get(timeout=300)
    assert long["completion_tokens"] == 200 and engine.stats()["max_rows"] == 2


def test_a_cancelled_stream_leaves_the_batch(family_model):
    import time

    import torch

    from raylib.serve.engine import Engine

    torch.set_num_threads(1)
    engine = Engine(family_model("llama"), {})
    events: queue.Queue = queue.Queue()
    handle = engine.submit(dict(expert="base", prompt=PROMPTS[1], max_tokens=400), events.put, stream=True)
    assert "delta" in events.get(timeout=120)
    engine.cancel(handle)  # what the replica does when the client closes the stream
    deadline = time.monotonic() + 60
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0
    while not events.empty():  # no result after the cancel, only deltas already on their way
        assert "delta" in events.get()
    assert len(handle.ids) < 400
    assert engine.generate([dict(expert="base", prompt="hi", max_tokens=2)])[0]["completion_tokens"] <= 2


def test_seeded_sampling_does_not_depend_on_the_batch(family_model):
    import torch

    from raylib.serve.engine import Engine

    torch.set_num_threads(1)
    engine = Engine(family_model("llama"), {})
    req = dict(expert="base", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    alone = engine.generate([req])[0]["text"]
    others = [dict(req, prompt=p, seed=None) for p in PROMPTS[1:]]
    together = engine.generate([*others[:2], req, *others[2:]])
    assert together[2]["text"] == alone
    assert engine.generate([dict(req, seed=12)])[0]["text"] != alone


@pytest.fixture(scope="module")
def peft_experts(tiny_model, tmp_path_factory) -> dict[str, str]:
    """IA3 (a plain forward: decoded step by step) and prompt tuning (virtual tokens inside
    PEFT's forward: decoded by PEFT's generate) experts, a few training steps each."""
    from helpers import job_dict

    from raylib.config import validate_job
    from raylib.synthetic import write_dataset
    from raylib.train_loop import PlainSession, run

    root = tmp_path_factory.mktemp("peft-experts")
    data = write_dataset(str(root / "data"), n_train=100, n_eval=10, domains=["strings"])
    out = {}
    for name, method in (("ia3", {"name": "ia3"}), ("prompt", {"name": "prompt", "num_virtual_tokens": 4})):
        job = validate_job(job_dict(tiny_model, data, str(root / name), method=method,
                                    train={"max_steps": 8, "checkpoint_every": 0, "eval_every": 0, "lr": 1e-2},
                                    output={"domain": "strings"}))
        session = PlainSession(str(root / f"ckpt-{name}"))
        run(job, session)
        out[name] = os.path.join(session.reports[-1]["checkpoint"], "expert")
    return out


def test_ia3_and_prompt_tuning_experts_answer_like_peft_generate(tiny_model, peft_experts):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylib.serve.engine import Engine

    torch.set_num_threads(1)
    engine = Engine(tiny_model, peft_experts)
    assert {n: engine.slots[n].stepwise for n in peft_experts} == {"ia3": True, "prompt": False}  # the registry's say
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = ["Reverse the word.\n\nlamp =>", "Uppercase the word.\n\ntiger and then =>"]
    for name, path in peft_experts.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), path).eval()
        want = []
        for p, n in zip(prompts, (6, 9)):
            enc = tok(p, return_tensors="pt")
            with torch.no_grad():
                seq = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
            comp = seq[0][enc["input_ids"].shape[1]:].tolist()
            comp = comp[: comp.index(tok.eos_token_id)] if tok.eos_token_id in comp else comp
            want.append(tok.decode(comp, skip_special_tokens=True))
        got = engine.generate([dict(expert=name, prompt=p, max_tokens=n) for p, n in zip(prompts, (6, 9))])
        assert [g["text"] for g in got] == want, name
        streamed = list(engine.stream(dict(expert=name, prompt=prompts[1], max_tokens=9)))
        assert "".join(e.get("delta", "") for e in streamed) == want[1] and streamed[-1]["done"]
