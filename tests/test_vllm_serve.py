"""A Serve app whose expert replicas run the vLLM engine (`engine: vllm`), in the vLLM
environment through Ray's runtime_env (`py_executable`), while the router runs in raylib's
main environment: the official `openai` client against it, run-time experts, and a replica
killed under load (1000 requests, none failed)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from helpers import RequestLoop, free_port
from test_vllm_engine import PROMPT, VLLM_PYTHON, build_vllm_models, needs_vllm

KEY = "vllm-key"
pytestmark = [needs_vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def vllm_app(tmp_path_factory):
    import ray
    from ray import serve

    from raylib.serve.app import run
    from raylib.serve.config import validate_serve_config

    models = build_vllm_models(str(tmp_path_factory.mktemp("vllm-models")))
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    port, cpu = free_port(), {"num_cpus": 0.1}
    cfg = validate_serve_config({
        "base_model": models["base"], "base_template": "plain",
        "experts": {"a": {"path": models["a"], "resources": cpu}},
        "base": {"path": models["base"], "resources": cpu},
        "router": {"strategy": "keywords", "keywords": {"a": ["apple"]}, "resources": cpu, "retries": 4,
                   "retry_backoff_s": 0.5},
        "engine": "vllm", "runtime_env": {"py_executable": VLLM_PYTHON}, "vllm": {"kv_cache_bytes": 64 << 20},
        "http": {"port": port}, "api_key": KEY, "app_name": "vllm", "single_device": False,
        "limits": {"max_tokens": 64},
    })
    run(cfg, blocking=False)
    yield {"url": f"http://127.0.0.1:{port}", "models": models}
    serve.shutdown()
    if started:
        ray.shutdown()


def _client(app):
    from openai import OpenAI

    return OpenAI(base_url=f"{app['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


def _hf_answers(models, reqs):
    from raylib.serve.engine import Engine

    return Engine(models["base"], {"a": models["a"], "b": models["b"]}, base_template="plain", dtype="fp32").generate(reqs)


def _req(url, method, path, body=None):
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_openai_client_on_vllm_replicas(vllm_app):
    from ray import serve

    url, models = vllm_app["url"], vllm_app["models"]
    for dep in ("expert-a", "base"):
        info = serve.get_deployment_handle(dep, app_name="vllm").info.remote().result(timeout_s=300)
        assert info["engine"] == "vllm", info
    want = {r["expert"]: r for r in _hf_answers(models, [
        {"expert": n, "prompt": PROMPT, "max_tokens": 8, "logprobs": 2} for n in ("base", "a", "b")])}
    client = _client(vllm_app)

    # greedy completions: the HF engine's text, for the expert and the base
    for model in ("a", "base"):
        comp = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
        assert comp.model == model and comp.choices[0].text == want[model]["text"]
        first = comp.choices[0].logprobs
        assert abs(first.token_logprobs[0] - want[model]["logprobs"][0]["logprob"]) < 1e-3
        assert comp.usage.completion_tokens == 8
    # routing by keyword, a chat stream that equals the plain answer
    chat = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "an apple a day"}],
                                          max_tokens=8, temperature=0)
    assert chat.model == "a"
    stream = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "an apple a day"}],
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    # n and seed: the same seed gives the same choices, the choices differ from each other
    kw = dict(model="a", prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, seed=5)
    one, two = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in one.choices] == [c.text for c in two.choices]
    assert one.choices[0].text != one.choices[1].text
    # what vLLM does not serve is a 400 that says where it is served
    status, body = _req(url, "POST", "/v1/completions", {"model": "mix", "experts": {"a": 0.5, "base": 0.5},
                                                         "prompt": PROMPT, "max_tokens": 4})
    assert status == 400, body
    # a LoRA expert joins the running app (a LoRARequest in the base replica's engine) and answers like HF
    status, body = _req(url, "POST", "/admin/experts", {"name": "b", "path": models["b"]})
    assert status == 201 and body["deployment"] == "base", body
    comp = client.completions.create(model="b", prompt=PROMPT, max_tokens=8, temperature=0)
    assert comp.model == "b" and comp.choices[0].text == want["b"]["text"]
    status, _ = _req(url, "DELETE", "/admin/experts/b")
    assert status == 200


def test_killing_a_vllm_replica_loses_no_request(vllm_app, capsys):
    from ray import serve

    url = vllm_app["url"]
    handle = serve.get_deployment_handle("expert-a", app_name="vllm")
    old_pid = handle.info.remote().result(timeout_s=300)["pid"]
    body = {"model": "auto", "messages": [{"role": "user", "content": "an apple a day"}], "max_tokens": 4,
            "temperature": 0}

    def send(_: int):
        status, answer = _req(url, "POST", "/v1/chat/completions", body)
        return status, answer.get("expert"), (answer.get("routing") or {}).get("fallback")

    new_pid = None
    with RequestLoop(send, threads=4) as clients:
        results = clients.results
        time.sleep(3)
        os.kill(old_pid, signal.SIGKILL)
        killed_at, deadline = len(results), time.time() + 400
        while time.time() < deadline and not (new_pid not in (None, old_pid) and len(results) >= 1000):
            if new_pid in (None, old_pid):
                try:
                    new_pid = handle.info.remote().result(timeout_s=10)["pid"]
                except Exception:
                    pass
            time.sleep(1)
        time.sleep(2)  # the restarted replica answers again
    failed = [r for r in results if r[0] != 200]
    with capsys.disabled():
        print(f"\nvLLM replica kill: {len(results)} requests ({killed_at} before the kill), {len(failed)} failed, "
              f"{sum(1 for r in results if r[0] == 200 and r[2])} answered by the fallback, pid {old_pid} -> {new_pid}")
    assert new_pid not in (None, old_pid) and not failed, failed[:3]
    assert len(results) >= 1000
    assert any(r[1] == "a" for r in results[-8:])  # the restarted expert answers again
