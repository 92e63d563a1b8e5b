"""raylib serve: router + experts + OpenAI-compatible API on a real Ray Serve (127.0.0.1).

Experts are trained here (plain loop, a few seconds each): arithmetic and comparison as SVF
experts, strings as a LoRA adapter, plus a `raylib cem` composed expert of the two SVF ones.
One single-device app (classifier routing, API key on) is shared by the fast tests; the
multi-deployment app (one deployment per expert) is built by the slow tests only.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers import free_port, job_dict, run_cli

API_KEY = "test-key-123"
DOMAINS = ("arithmetic", "strings", "comparison")
PROMPTS = {
    "arithmetic": ["What is 12 + 7?", "What is 40 - 13?", "What is 3 + 30?"],
    "strings": ["Reverse the word.\n\nlamp", "Uppercase the word.\n\ntiger", "Reverse the word.\n\nocean"],
    "comparison": ["Which is larger: 37 or 52?", "Which is smaller: 8 or 91?", "Which is larger: 3 or 4?"],
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def serve_experts(tiny_model, tmp_path_factory) -> dict[str, str]:
    from raylib.config import validate_job
    from raylib.synthetic import write_dataset
    from raylib.train_loop import PlainSession, run

    root = tmp_path_factory.mktemp("serve-experts")
    methods = {"arithmetic": {"name": "svf", "targets": "mlp", "cache_dir": str(root / "svd")},
               "strings": {"name": "lora", "r": 8},
               "comparison": {"name": "svf", "targets": "mlp", "cache_dir": str(root / "svd")}}
    experts = {}
    for domain, method in methods.items():
        data = write_dataset(str(root / f"data-{domain}"), n_train=200, n_eval=10, domains=[domain])
        lr = 0.2 if method["name"] == "svf" else 3e-3
        job = validate_job(job_dict(tiny_model, data, str(root / domain), method=method,
                                    train={"max_steps": 20, "checkpoint_every": 0, "eval_every": 0, "lr": lr,
                                           "batch_size": 8}, output={"domain": domain}))
        session = PlainSession(str(root / f"ckpt-{domain}"))
        run(job, session)
        experts[domain] = os.path.join(session.reports[-1]["checkpoint"], "expert")
    return experts


@pytest.fixture(scope="session")
def labelled(tmp_path_factory) -> str:
    from raylib.synthetic import make_rows, write_jsonl

    return write_jsonl(make_rows(600, seed=5), str(tmp_path_factory.mktemp("labelled") / "labelled.jsonl"))


@pytest.fixture(scope="module")
def serve_ray():
    """Ray for the Serve apps of this module (reused when the session already started one)."""
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    serve.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def cem_expert(serve_experts, serve_ray, tmp_path_factory) -> str:
    from raylib.search.cem import CEMOptions, run_cem
    from raylib.synthetic import make_rows, write_jsonl

    root = tmp_path_factory.mktemp("cem")
    fewshot = write_jsonl(make_rows(6, domains=["arithmetic", "comparison"], seed=3), str(root / "fewshot.jsonl"))
    run_cem([serve_experts["arithmetic"], serve_experts["comparison"]], fewshot, str(root / "out"),
            CEMOptions(population=2, iterations=1, actors=1, max_new_tokens=4))
    return str(root / "out")


def _config(tiny_model, experts, labelled, port, **extra) -> dict:
    cpu = {"num_cpus": 0.1}
    cfg = {
        "base_model": tiny_model,
        "experts": {n: {"path": p, "resources": cpu} for n, p in experts.items()},
        "base": {"path": tiny_model, "resources": cpu},
        "router": {"strategy": "classifier", "classifier_data": labelled, "min_confidence": 0.9, "resources": cpu},
        "http": {"port": port}, "api_key": API_KEY, "app_name": "single", "single_device": True,
        "limits": {"max_prompt_tokens": 256, "max_tokens": 64, "max_body_bytes": 8192},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def app(serve_ray, tiny_model, serve_experts, cem_expert, labelled):
    """The single-device app every fast test talks to: base URL + config."""
    from serve.app import run
    from serve.config import validate_serve_config

    port = free_port()
    cfg = validate_serve_config(_config(tiny_model, {**serve_experts, "cem": cem_expert}, labelled, port))
    run(cfg, blocking=False)
    return {"url": f"http://127.0.0.1:{port}", "cfg": cfg}


def _post(url: str, body, key: str | None = API_KEY, raw: bool = False, timeout: int = 120):
    data = body if raw else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def _chat(url, text, model="auto", **kw):
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0, **kw}
    return _post(f"{url}/v1/chat/completions", body)


def _client(app):
    from openai import OpenAI

    return OpenAI(base_url=f"{app['url']}/v1", api_key=API_KEY, max_retries=0, timeout=120)


# --------------------------------------------------------------------------- no Serve needed


def test_config_errors_name_the_field(tiny_model, serve_experts, tmp_path):
    from raylib.errors import ConfigError
    from serve.config import validate_serve_config

    ok = {"base_model": tiny_model, "experts": dict(serve_experts),
          "router": {"strategy": "keywords", "keywords": {"arithmetic": ["+"]}}}
    validate_serve_config(ok)
    cases = [
        ({"http": {"host": "0.0.0.0"}}, "http.host"),
        ({"router": {"strategy": "keywords", "keywords": {"math": ["+"]}}}, "router.keywords"),
        ({"router": {"strategy": "keywords"}}, "router.keywords"),
        ({"router": {"strategy": "cem", "cem_expert": "arithmetic"}}, "router.cem_expert"),
        ({"router": {"strategy": "classifier"}}, "router.classifier"),
        ({"router": {"fallback": "nope", "keywords": {"arithmetic": ["+"]}}}, "router.fallback"),
        ({"experts": {**serve_experts, "x": str(tmp_path)}}, "experts.x.path"),
        ({"limits": {"max_tokens": -1}}, "limits.max_tokens"),
        ({"routr": {}}, "routr"),
    ]
    for change, field in cases:
        with pytest.raises(ConfigError) as err:
            validate_serve_config({**ok, **change})
        assert field in str(err.value), (field, str(err.value))
    # a key makes a non-loopback bind acceptable
    validate_serve_config({**ok, "http": {"host": "0.0.0.0"}, "api_key": "k"})

    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text(json.dumps({**ok, "http": {"host": "0.0.0.0"}}))
    proc = run_cli("serve", str(cfg_file))
    assert proc.returncode == 2 and "http.host" in proc.stderr and "API key" in proc.stderr, proc.stderr
    proc = run_cli("serve", str(cfg_file), "--host", "127.0.0.1", "--check")
    assert proc.returncode == 0 and "ok: 3 experts" in proc.stdout, proc.stderr


def test_strategies_route_synthetic_domains(tiny_model, serve_experts, labelled):
    from raylib.synthetic import make_rows
    from serve.classifier import row_text
    from serve.config import validate_serve_config
    from serve.strategies import Keywords, build_strategy

    names = list(DOMAINS)
    rows = make_rows(60, seed=99)  # other seeds than the classifier's training rows
    kw = Keywords({"arithmetic": ["+", " - "], "strings": ["reverse", "uppercase"], "comparison": ["larger", "smaller"]})
    assert all(kw.route(row_text(r))[0] == r["domain"] for r in rows)
    assert kw.route("hello")[0] is None

    base = {"base_model": tiny_model, "experts": dict(serve_experts)}
    clf = build_strategy(validate_serve_config({**base, "router": {"strategy": "classifier",
                                                                   "classifier_data": labelled}}), names)
    acc = sum(clf.route(row_text(r))[0] == r["domain"] for r in rows) / len(rows)
    assert acc >= 0.95, acc

    # the base model as a calibrated zero-shot classifier: weak at this size, but above chance
    prompt = build_strategy(validate_serve_config({**base, "router": {"strategy": "prompt"}}), names)
    routed = [prompt.route(row_text(r)) for r in rows]
    assert all(name in (*names, None) and 0 <= d["confidence"] <= 1 for name, d in routed)
    acc = sum(name == r["domain"] for (name, _), r in zip(routed, rows)) / len(rows)
    assert acc > 1 / 3, acc


def test_single_device_engine_switches_without_reloading(tiny_model, serve_experts):
    """One engine holds every expert: PEFT mixed-adapter batches equal one-by-one answers;
    SVF switches are z copies (timed), and answers equal a one-expert engine's."""
    import torch

    from serve.engine import Engine

    torch.set_num_threads(1)
    engine = Engine(tiny_model, serve_experts)
    reqs = [dict(expert=d, kind="chat", messages=[{"role": "user", "content": PROMPTS[p][0]}], max_tokens=6)
            for d, p in zip((*DOMAINS, "base"), (*DOMAINS, "arithmetic"))]
    one_by_one = [engine.generate([r])[0] for r in reqs]
    assert [r["expert"] for r in one_by_one] == [*DOMAINS, "base"]
    assert [r["text"] for r in engine.generate(reqs)] == [r["text"] for r in one_by_one]
    assert len(engine.switch_times) >= 2 and max(engine.switch_times) < 1.0
    alone = Engine(tiny_model, {"comparison": serve_experts["comparison"]}, include_base=False)
    assert alone.generate([reqs[2]])[0]["text"] == one_by_one[2]["text"]
    # the streamed text is the non-streamed answer
    streamed = list(engine.stream(reqs[0]))
    assert "".join(s.get("delta", "") for s in streamed) == one_by_one[0]["text"]
    assert streamed[-1]["completion_tokens"] == one_by_one[0]["completion_tokens"]


# --------------------------------------------------------------------------- the shared app


def test_routing_reaches_each_domains_expert(app):
    for domain, prompts in PROMPTS.items():
        for text in prompts:
            status, body, headers = _chat(app["url"], text)
            assert status == 200, body
            assert body["expert"] == domain and body["model"] == domain, (text, body)
            assert headers.get("x-raylib-expert") == domain
            assert body["routing"]["strategy"] == "classifier"
    # an explicit model wins over the router
    status, body, _ = _chat(app["url"], PROMPTS["arithmetic"][0], model="strings")
    assert status == 200 and body["expert"] == "strings" and body["routing"]["strategy"] == "explicit"
    # the composed CEM expert is a model like the others
    status, body, _ = _chat(app["url"], PROMPTS["arithmetic"][0], model="cem")
    assert status == 200 and body["expert"] == "cem"


def test_unknown_domain_goes_to_the_base_model(app):
    for text in ("tell me a story", "zzzz qqqq"):
        status, body, headers = _chat(app["url"], text)
        assert status == 200 and body["expert"] == "base" and headers["x-raylib-expert"] == "base", body
        assert body["routing"]["unknown_domain"] is True and body["routing"]["confidence"] < 0.9
    status, body, _ = _post(f"{app['url']}/v1/completions",
                            {"model": "base", "prompt": "What is 1 + 1? =>", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["expert"] == "base"


def test_openai_client_chat_completion_stream_models(app):
    client = _client(app)
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "auto" and set(ids) >= {*DOMAINS, "base", "cem"}

    chat = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": PROMPTS["arithmetic"][0]}],
                                          max_tokens=6, temperature=0)
    assert chat.model == "arithmetic" and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.prompt_tokens > 10 and 0 < chat.usage.completion_tokens <= 6
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    comp = client.completions.create(model="base", prompt="What is 2 + 2? =>", max_tokens=4, temperature=0)
    assert comp.model == "base" and comp.usage.completion_tokens <= 4
    stopped = client.completions.create(model="base", prompt="What is 2 + 2? =>", max_tokens=8, temperature=0,
                                        stop=[comp.choices[0].text.strip()[:1] or "\n"])
    assert len(stopped.choices[0].text) <= len(comp.choices[0].text)

    stream = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": PROMPTS["arithmetic"][0]}],
                                            max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert all(c.model == "arithmetic" for c in chunks)
    cstream = client.completions.create(model="base", prompt="What is 2 + 2? =>", max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in cstream) == comp.choices[0].text

    sampled = client.chat.completions.create(model="strings", messages=[{"role": "user", "content": "Reverse the word.\n\nlamp"}],
                                             max_tokens=6, temperature=0.9, top_p=0.9)
    assert sampled.model == "strings" and sampled.usage.completion_tokens <= 6


def test_bad_requests_get_4xx_with_a_message_and_the_server_stays_healthy(app):
    url = app["url"]
    chat = f"{url}/v1/chat/completions"
    cases = [
        (_post(chat, b"{not json", raw=True), 400, "not valid JSON"),
        (_post(chat, {"model": "auto"}), 400, "messages"),
        (_post(chat, {"messages": [{"role": "user"}]}), 400, "content"),
        (_post(chat, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}), 400, "max_tokens"),
        (_post(chat, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}), 400, "cap"),
        (_post(chat, {"messages": [{"role": "user", "content": "hi"}], "temperature": 5}), 400, "temperature"),
        (_post(chat, {"messages": [{"role": "user", "content": "What is 1 + 1? " * 40}]}), 400, "limit is 256"),
        (_post(chat, {"messages": [{"role": "user", "content": "x" * 9000}]}), 413, "limit is 8192"),
        (_post(chat, {"messages": [{"role": "user", "content": "hi"}]}, key="wrong"), 401, "API key"),
        (_post(chat, {"messages": [{"role": "user", "content": "hi"}]}, key=None), 401, "API key"),
        (_post(chat, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404, "does not exist"),
    ]
    for (status, body, _), want_status, want_text in cases:
        assert status == want_status, (want_text, status, body)
        assert want_text in body["error"]["message"], body
    from openai import AuthenticationError, BadRequestError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(BadRequestError):
        _client(app).chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as r:
        assert json.loads(r.read())["status"] == "ok"
    status, body, _ = _chat(url, PROMPTS["strings"][0])
    assert status == 200 and body["expert"] == "strings"


def test_concurrent_requests_are_batched_and_answer_like_sequential_ones(app):
    from concurrent.futures import ThreadPoolExecutor

    texts = [p for ps in PROMPTS.values() for p in ps]
    sequential = [_chat(app["url"], t)[1]["choices"][0]["message"]["content"] for t in texts]
    with ThreadPoolExecutor(len(texts)) as pool:
        results = list(pool.map(lambda t: _chat(app["url"], t), texts))
    assert all(s == 200 for s, _, _ in results)
    assert [b["choices"][0]["message"]["content"] for _, b, _ in results] == sequential


# --------------------------------------------------------------------------- slow: multi-deployment


@pytest.fixture(scope="module")
def multi_app(app, tiny_model, serve_experts, labelled):
    from serve.app import run
    from serve.config import validate_serve_config

    cfg = validate_serve_config(_config(tiny_model, serve_experts, labelled, app["cfg"].http.port,
                                        app_name="multi", route_prefix="/multi", single_device=False,
                                        router={"strategy": "classifier", "classifier_data": labelled,
                                                "min_confidence": 0.9, "resources": {"num_cpus": 0.1}, "retries": 4,
                                                "retry_backoff_s": 0.5}))
    handle = run(cfg, blocking=False)
    return {"url": f"{app['url']}/multi", "cfg": cfg, "handle": handle}


@pytest.mark.slow
def test_multi_deployment_gives_the_single_device_greedy_answers(app, multi_app):
    from ray import serve

    status = serve.status().applications["multi"].deployments
    assert set(status) == {"router", "base", *(f"expert-{d}" for d in DOMAINS)}
    for domain, prompts in PROMPTS.items():
        for text in prompts:
            _, single, _ = _chat(app["url"], text)
            _, multi, _ = _chat(multi_app["url"], text)
            assert multi["expert"] == single["expert"] == domain
            assert multi["choices"][0]["message"]["content"] == single["choices"][0]["message"]["content"]
    _, a, _ = _chat(app["url"], "zz", model="base")
    _, b, _ = _chat(multi_app["url"], "zz", model="base")
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_killing_an_expert_replica_loses_no_request(multi_app, capsys):
    from ray import serve

    handle = serve.get_deployment_handle("expert-arithmetic", app_name="multi")
    old_pid = handle.info.remote().result(timeout_s=60)["pid"]
    results, stop = [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                status, body, _ = _chat(multi_app["url"], PROMPTS["arithmetic"][len(results) % 3], max_tokens=4)
                results.append((status, body.get("expert"), body.get("routing", {}).get("fallback")))
            except Exception as exc:  # a connection error counts as a failure too
                results.append((str(exc), None, None))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(3)
    os.kill(old_pid, signal.SIGKILL)
    killed_at = len(results)
    deadline = time.time() + 240
    new_pid = None
    while time.time() < deadline:  # Serve notices the death and starts a new replica
        try:
            new_pid = handle.info.remote().result(timeout_s=10)["pid"]
            if new_pid != old_pid:
                break
        except Exception:
            pass
        time.sleep(2)
    time.sleep(3)
    stop.set()
    thread.join(timeout=120)
    failed = [r for r in results if r[0] != 200]
    fallbacks = sum(1 for r in results if r[2])
    with urllib.request.urlopen(urllib.request.Request(f"{multi_app['url']}/v1/stats",
                                                       headers={"authorization": f"Bearer {API_KEY}"})) as r:
        stats = json.loads(r.read())
    with capsys.disabled():
        print(f"\nreplica kill: {len(results)} requests ({killed_at} before the kill), {len(failed)} failed, "
              f"{fallbacks} answered by the fallback, router retries {stats['retries']}, "
              f"replica pid {old_pid} -> {new_pid}")
    assert new_pid and new_pid != old_pid
    assert not failed, failed[:3]
    assert len(results) > killed_at + 3
    assert any(r[1] == "arithmetic" for r in results[-3:])  # the restarted expert answers again
