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
import time
import urllib.error
import urllib.request

import pytest
from helpers import RequestLoop, free_port, job_dict, run_cli

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
            CEMOptions(population=4, iterations=1, actors=1, max_new_tokens=4))
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
    from raylib.serve.app import run
    from raylib.serve.config import validate_serve_config

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
    from raylib.serve.config import validate_serve_config

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


def test_build_app_is_a_serve_application_builder(tiny_model, serve_experts, tmp_path):
    """`serve run raylib.serve.app:build_app config=...` / a Serve config file's import_path: Serve
    calls the builder with the args dict (config file + overrides, or an inline config)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from raylib.errors import ConfigError
    from raylib.serve.app import build_app

    cfg = {"base_model": tiny_model, "experts": dict(serve_experts),
           "router": {"strategy": "keywords", "keywords": {"strings": ["reverse"]}}}
    path = tmp_path / "serve.yaml"
    path.write_text(json.dumps(cfg))
    for args in ({"config": str(path), "single_device": "false"}, cfg):
        assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, args), Application)
    with pytest.raises(ConfigError, match="router.strategy"):
        build_app({"config": str(path), "router.strategy": "nope"})


def test_strategies_route_synthetic_domains(tiny_model, serve_experts, labelled):
    from raylib.synthetic import make_rows
    from raylib.serve.classifier import row_text
    from raylib.serve.config import validate_serve_config
    from raylib.serve.strategies import Keywords, build_strategy

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

    from raylib.serve.engine import Engine

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


def test_openai_client_features_n_seed_logprobs_prompt_lists_text_parts(app, tiny_model):
    """What common clients send, through the official client: text-part content, n, seed,
    logprobs (checked against the model itself), prompt lists routed per prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = _client(app)
    text = PROMPTS["arithmetic"][0]

    def chat(**kw):
        args = dict(model="auto", messages=[{"role": "user", "content": text}], max_tokens=6, temperature=0)
        return client.chat.completions.create(**{**args, **kw})

    plain = chat()
    parts = chat(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}])
    assert parts.model == plain.model == "arithmetic"
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert chat(max_tokens=None, max_completion_tokens=2).usage.completion_tokens <= 2

    three = chat(n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {plain.choices[0].message.content}
    assert three.usage.completion_tokens == 3 * plain.usage.completion_tokens
    assert three.usage.prompt_tokens == plain.usage.prompt_tokens  # counted once per prompt

    sampled = dict(model="base", temperature=1.5, max_tokens=8)
    once, again = chat(seed=7, **sampled), chat(seed=7, **sampled)
    assert once.choices[0].message.content == again.choices[0].message.content
    many = chat(seed=7, n=6, **sampled)
    assert many.choices[0].message.content == once.choices[0].message.content  # choice j: seed + j
    assert len({c.message.content for c in many.choices}) > 1

    lp = chat(logprobs=True, top_logprobs=2).choices[0]
    assert lp.logprobs is not None and len(lp.logprobs.content) >= 1
    for entry in lp.logprobs.content:  # greedy: the chosen token is the most likely one
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-6
    assert "".join(e.token for e in lp.logprobs.content).strip() == lp.message.content

    # completions: logprobs equal the base model's own, a list of prompts gets n choices each
    prompt = "What is 2 + 2? =>"
    comp = client.completions.create(model="base", prompt=prompt, max_tokens=3, temperature=0, logprobs=3)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
    want = torch.log_softmax(logits.float(), -1)
    first = comp.choices[0].logprobs
    assert first.tokens[0] == tok.decode([int(want.argmax())])
    assert abs(first.token_logprobs[0] - float(want.max())) < 1e-4
    assert len(first.top_logprobs[0]) == 3 and first.text_offset[0] == 0

    other = "Which is larger: 37 or 52? =>"
    single = client.completions.create(model="base", prompt=other, max_tokens=3, temperature=0)
    batch = client.completions.create(model="base", prompt=[prompt, other], max_tokens=3, temperature=0, n=2)
    assert [c.text for c in batch.choices] == [comp.choices[0].text] * 2 + [single.choices[0].text] * 2
    assert batch.usage.prompt_tokens == comp.usage.prompt_tokens + single.usage.prompt_tokens
    routed = client.completions.create(model="auto", prompt=[PROMPTS["arithmetic"][1], PROMPTS["strings"][1]],
                                       max_tokens=3, temperature=0)
    assert [c.expert for c in routed.choices] == ["arithmetic", "strings"]


def test_openai_client_embeddings_are_the_base_models_mean_pooled_states(app, tiny_model):
    import numpy as np
    import torch
    from openai import BadRequestError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = _client(app)
    texts = ["What is 12 + 7?", "Reverse the word.\n\nlamp", "What is 12 + 7?"]
    got = client.embeddings.create(model="base", input=texts)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model="base", input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in got.data])
    assert [d.index for d in got.data] == [0, 1, 2]
    np.testing.assert_allclose(vectors, np.array([d.embedding for d in floats.data]), atol=1e-6)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        for text, vec in zip(texts, vectors):
            hidden = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0]
            want = torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy()
            np.testing.assert_allclose(vec, want, atol=1e-4)
    assert got.usage.prompt_tokens == sum(len(tok(t)["input_ids"]) for t in texts)
    with pytest.raises(BadRequestError, match="dimensions"):
        client.embeddings.create(model="base", input="hi", dimensions=8)
    with pytest.raises(BadRequestError, match="base model"):
        client.embeddings.create(model="strings", input="hi")


def test_unsupported_openai_fields_are_refused_by_name(app):
    from openai import BadRequestError

    client = _client(app)
    msgs = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    cases = [
        ("tools", dict(tools=[tool])),
        ("response_format", dict(response_format={"type": "json_object"})),
        ("frequency_penalty", dict(frequency_penalty=0.5)),
        ("logit_bias", dict(logit_bias={"5": 10})),
        ("n", dict(n=2, stream=True)),
        ("logprobs", dict(logprobs=True, stream=True)),
        ("n", dict(n=100)),
        ("top_logprobs", dict(top_logprobs=2)),
        ("messages.0.content", dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])),
    ]
    for field, kw in cases:
        with pytest.raises(BadRequestError) as exc:
            client.chat.completions.create(**{"model": "auto", "messages": msgs, "max_tokens": 2, **kw})
        assert exc.value.body["param"] == field and field.split(".")[0] in exc.value.body["message"], (field, exc.value.body)
    ok = client.chat.completions.create(model="auto", messages=msgs, max_tokens=2, response_format={"type": "text"},
                                        frequency_penalty=0, tool_choice="none")
    assert ok.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(BadRequestError, match="token-id"):
        client.completions.create(model="base", prompt=[1, 2, 3], max_tokens=2)


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
    from raylib.serve.app import run
    from raylib.serve.config import validate_serve_config

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
    """1000 requests from 4 clients, an expert replica SIGKILLed among them: none fails (the
    router retries, then falls back), and the restarted replica answers again."""
    from ray import serve

    handle = serve.get_deployment_handle("expert-arithmetic", app_name="multi")
    old_pid = handle.info.remote().result(timeout_s=60)["pid"]

    def send(i: int):
        status, body, _ = _chat(multi_app["url"], PROMPTS["arithmetic"][i % 3], max_tokens=4)
        return status, body.get("expert"), body.get("routing", {}).get("fallback")

    with RequestLoop(send, threads=4) as clients:
        results = clients.results
        time.sleep(3)
        os.kill(old_pid, signal.SIGKILL)
        killed_at = len(results)
        deadline = time.time() + 400
        new_pid = None
        while time.time() < deadline and not (new_pid not in (None, old_pid) and len(results) >= 1000):
            if new_pid in (None, old_pid):  # Serve notices the death and starts a new replica
                try:
                    new_pid = handle.info.remote().result(timeout_s=10)["pid"]
                except Exception:
                    pass
            time.sleep(1)
        time.sleep(3)
    failed = [r for r in results if r[0] != 200]
    fallbacks = sum(1 for r in results if r[0] == 200 and r[2])
    with urllib.request.urlopen(urllib.request.Request(f"{multi_app['url']}/v1/stats",
                                                       headers={"authorization": f"Bearer {API_KEY}"})) as r:
        stats = json.loads(r.read())
    with capsys.disabled():
        print(f"\nreplica kill: {len(results)} requests ({killed_at} before the kill), {len(failed)} failed, "
              f"{fallbacks} answered by the fallback, router retries {stats['retries']}, "
              f"replica pid {old_pid} -> {new_pid}")
    assert new_pid and new_pid != old_pid
    assert not failed, failed[:3]
    assert len(results) >= 1000
    assert any(r[1] == "arithmetic" for r in results[-8:])  # the restarted expert answers again


# --------------------------------------------------------------------------- experts into the running app


def _req(url: str, method: str, path: str, body=None, key: str | None = API_KEY, timeout: int = 300):
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _write_expert_like(src: str, out: str, method: str) -> str:
    """expert.json for an offline-merged expert (copied from a constituent, method set)."""
    from raylib.experts import read_expert, write_expert_json

    info = read_expert(src)
    info.method, info.domain, info.metrics = method, "merged", {"merged_offline": 1}
    write_expert_json(out, info)
    return out


@pytest.fixture(scope="module")
def more_experts(serve_experts, tiny_model, tmp_path_factory) -> dict[str, str]:
    """A second LoRA expert (arithmetic) and experts merged offline with the weights the mixed
    requests ask for: an SVF z mix (`svf.mix`) and PEFT `add_weighted_adapter` merges."""
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file

    from raylib.config import ModelConfig, validate_job
    from raylib.methods import svf
    from raylib.models import load_model
    from raylib.synthetic import write_dataset
    from raylib.train_loop import PlainSession, run

    root = tmp_path_factory.mktemp("more-experts")
    data = write_dataset(str(root / "data"), n_train=200, n_eval=10, domains=["arithmetic"])
    job = validate_job(job_dict(tiny_model, data, str(root / "arith-lora"), method={"name": "lora", "r": 8},
                                train={"max_steps": 20, "checkpoint_every": 0, "eval_every": 0, "lr": 3e-3,
                                       "batch_size": 8}, output={"domain": "arithmetic"}))
    session = PlainSession(str(root / "ckpt"))
    run(job, session)
    out = {"arith_lora": os.path.join(session.reports[-1]["checkpoint"], "expert")}

    a, c = serve_experts["arithmetic"], serve_experts["comparison"]
    svf_dir = root / "svf-mix"
    svf_dir.mkdir()
    z = svf.mix([svf.load_z(a), svf.load_z(c)], [0.7, 0.3])
    save_file({n: t.contiguous() for n, t in z.items()}, str(svf_dir / svf.Z_FILE))
    (svf_dir / svf.CONFIG_FILE).write_text(json.dumps(svf.read_svf_config(a)))
    out["svf_offline"] = _write_expert_like(a, str(svf_dir), "svf")

    torch.manual_seed(0)
    base = load_model(ModelConfig(path=tiny_model))
    pm = PeftModel.from_pretrained(base, out["arith_lora"], adapter_name="arith_lora")
    pm.load_adapter(serve_experts["strings"], adapter_name="strings")
    for combination in ("linear", "cat"):  # names sorted, as the server orders them
        pm.add_weighted_adapter(["arith_lora", "strings"], [0.6, 0.4], adapter_name=f"merged_{combination}",
                                combination_type=combination)
        pm.save_pretrained(str(root / "lora-mix"), selected_adapters=[f"merged_{combination}"])
        merged = str(root / "lora-mix" / f"merged_{combination}")
        out[f"lora_{combination}"] = _write_expert_like(serve_experts["strings"], merged, "lora")
    return out


def test_experts_join_and_leave_the_running_app(app, more_experts):
    """POST /admin/experts while a client loop is sending requests: no request fails, the new
    expert answers when named, is listed with its expert.json metrics, and can be removed."""
    url = app["url"]
    texts = [p for ps in PROMPTS.values() for p in ps]

    def send(i: int):
        status, body, _ = _chat(url, texts[i % len(texts)], max_tokens=4)
        return status, body.get("expert")

    with RequestLoop(send) as clients:
        results = clients.results
        time.sleep(2)
        before = len(results)
        t0 = time.perf_counter()
        body = {"name": "arith_lora", "path": "file://" + more_experts["arith_lora"]}
        status, added = _req(url, "POST", "/admin/experts", body)
        add_s = time.perf_counter() - t0
        assert status == 201, added
        assert added["method"] == "lora" and added["shared_base"] is True and added["deployment"] == "experts"
        status, body, headers = _chat(url, PROMPTS["arithmetic"][0], model="arith_lora")
        assert status == 200 and body["expert"] == "arith_lora" and headers["x-raylib-expert"] == "arith_lora", body
        time.sleep(1)
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]
    assert len(results) > before + 1 and {r[1] for r in results} >= set(DOMAINS)
    print(f"\nadmin add: {add_s:.2f}s while {len(results)} requests ran ({before} before the add), 0 failed")

    status, listed = _req(url, "GET", "/admin/experts")
    assert status == 200
    by_name = {e["name"]: e for e in listed["data"]}
    assert set(by_name) >= {*DOMAINS, "cem", "arith_lora"}
    assert by_name["arith_lora"]["added_by"] == "admin" and by_name["strings"]["added_by"] == "config"
    assert by_name["arith_lora"]["metrics"]["step"] == 20 and "eval_loss" in by_name["strings"]["metrics"]
    assert "arith_lora" in [m.id for m in _client(app).models.list()]

    # bad adds are refused with the reason; the table is unchanged
    for body, want_status, want in [
        ({"name": "x", "path": str(app["cfg"].base_model)}, 400, "not a raylib expert"),
        ({"name": "mix", "path": more_experts["arith_lora"]}, 400, "reserved"),
        ({"name": "strings", "path": more_experts["arith_lora"]}, 409, "DELETE"),
        ({"name": "bad name!", "path": more_experts["arith_lora"]}, 400, "name"),
        ({"name": "kw", "path": more_experts["arith_lora"], "keywords": ["+"]}, 400, "strategy keywords"),
    ]:
        status, err = _req(url, "POST", "/admin/experts", body)
        assert status == want_status and want in err["error"]["message"], (body, status, err)

    status, gone = _req(url, "DELETE", "/admin/experts/arith_lora")
    assert status == 200 and gone["unloaded"] is True, gone
    status, body, _ = _chat(url, PROMPTS["arithmetic"][0], model="arith_lora")
    assert status == 404, body
    assert _req(url, "DELETE", "/admin/experts/arith_lora")[0] == 404
    assert _req(url, "DELETE", "/admin/experts/base")[0] == 404
    assert "arith_lora" not in {e["name"] for e in _req(url, "GET", "/admin/experts")[1]["data"]}
    status, body, _ = _chat(url, PROMPTS["strings"][0])  # routing still works for the others
    assert status == 200 and body["expert"] == "strings"


def test_admin_endpoints_need_the_key(app, serve_ray, tiny_model):
    url = app["url"]
    for key in ("wrong", None):
        for method, path, body in (("GET", "/admin/experts", None), ("DELETE", "/admin/experts/strings", None),
                                   ("POST", "/admin/experts", {"name": "x", "path": "/nowhere"})):
            status, err = _req(url, method, path, body, key=key)
            assert status == 401 and "API key" in err["error"]["message"], (method, key, err)
    assert _req(url, "GET", "/admin/experts")[0] == 200  # strings was not removed
    # an app without a key refuses admin calls altogether (it still serves)
    from ray import serve

    from raylib.serve.app import build_application
    from raylib.serve.config import validate_serve_config

    cpu = {"num_cpus": 0.1}
    cfg = validate_serve_config({"base_model": tiny_model, "router": {"strategy": "explicit", "resources": cpu},
                                 "base": {"path": tiny_model, "resources": cpu}, "single_device": True,
                                 "http": {"port": app["cfg"].http.port}, "app_name": "nokey"})
    serve.run(build_application(cfg), name="nokey", route_prefix="/nokey")
    try:
        status, err = _req(f"{url}/nokey", "GET", "/admin/experts", key=None)
        assert status == 403 and "api_key" in err["error"]["message"] and "api_key_env" in err["error"]["message"]
        assert _req(f"{url}/nokey", "POST", "/admin/experts", {"name": "x", "path": "/x"}, key=None)[0] == 403
        status, body = _req(f"{url}/nokey", "POST", "/v1/completions",
                            {"model": "base", "prompt": "hi", "max_tokens": 2}, key=None)
        assert status == 200 and body["expert"] == "base"
    finally:
        serve.delete("nokey")


def test_mixed_requests_equal_experts_merged_offline(app, more_experts):
    """model "mix" + experts {name: weight}: SVF z vectors mixed (svf.mix) and LoRA adapters merged
    (PEFT add_weighted_adapter, linear and cat) per request give the greedy answers of the same
    mixes merged offline and served as plain experts."""
    url = app["url"]
    added = ["arith_lora", "svf_offline", "lora_linear", "lora_cat"]
    for name in added:
        status, body = _req(url, "POST", "/admin/experts", {"name": name, "path": more_experts[name]})
        assert status == 201, body
    try:
        cases = [("svf_offline", {"arithmetic": 0.7, "comparison": 0.3}, "linear"),
                 ("lora_linear", {"strings": 0.4, "arith_lora": 0.6}, "linear"),
                 ("lora_cat", {"arith_lora": 0.6, "strings": 0.4}, "cat")]
        texts = [PROMPTS["arithmetic"][0], PROMPTS["comparison"][0], PROMPTS["strings"][0]]
        for offline, weights, combination in cases:
            for text in texts:
                _, want, _ = _chat(url, text, model=offline, max_tokens=8)
                status, got, headers = _chat(url, text, model="mix", experts=weights, combination=combination, max_tokens=8)
                assert status == 200, got
                assert got["routing"] == {"strategy": "mix", "experts": weights, "combination": combination}
                assert got["expert"].startswith("mix(") and headers["x-raylib-expert"] == got["expert"]
                assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"], \
                    (offline, text, got, want)
        # the mix differs from its parts (the test would not notice a mix that ignores weights otherwise)
        solo = [_chat(url, t, model="arithmetic", max_tokens=8)[1]["choices"][0]["message"]["content"] for t in texts]
        mixed = [_chat(url, t, model="mix", experts=cases[0][1], max_tokens=8)[1]["choices"][0]["message"]["content"]
                 for t in texts]
        assert solo != mixed
        # bad mixes: 400 with the reason
        for kw, want in [({"model": "mix"}, "needs experts"), ({"model": "mix", "experts": {"nope": 1.0}}, "not experts"),
                         ({"model": "mix", "experts": {"strings": 0.5, "arithmetic": 0.5}}, "SVF experts with SVF"),
                         ({"model": "mix", "experts": {"arithmetic": 0.5, "comparison": 0.5}, "combination": "cat"}, "linearly"),
                         ({"model": "strings", "experts": {"strings": 1.0}}, 'set model to "mix"')]:
            status, err, _ = _chat(url, texts[0], **kw)
            assert status == 400 and want in err["error"]["message"], (kw, err)
        # streaming a mix gives the non-streamed text
        stream = _client(app).chat.completions.create(model="mix", messages=[{"role": "user", "content": texts[0]}],
                                                      max_tokens=8, temperature=0, stream=True,
                                                      extra_body={"experts": cases[1][1]})
        _, want, _ = _chat(url, texts[0], model="lora_linear", max_tokens=8)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            want["choices"][0]["message"]["content"]
    finally:
        for name in added:
            _req(url, "DELETE", f"/admin/experts/{name}")


def test_engine_without_experts_takes_them_in_place(tiny_model, serve_experts):
    """The multi-deployment `base` replica starts with the base model only; experts added at
    run time wrap/decompose that model in place and answer like an engine built with them."""
    import torch

    from raylib.serve.engine import Engine

    torch.set_num_threads(1)
    names = ("strings", "arithmetic")
    reqs = [dict(expert=n, kind="chat", messages=[{"role": "user", "content": PROMPTS["arithmetic"][0]}], max_tokens=6)
            for n in names]
    want = [Engine(tiny_model, {n: serve_experts[n]}, include_base=False).generate([r])[0]["text"] for n, r in zip(names, reqs)]
    engine = Engine(tiny_model, {})
    base_model = engine.slots["base"].model
    assert engine.add_expert("strings", serve_experts["strings"])["shared_base"] is True
    assert engine.slots["strings"].model.get_base_model() is base_model  # the same weights, wrapped
    engine.add_expert("arithmetic", serve_experts["arithmetic"])
    assert [engine.generate([r])[0]["text"] for r in reqs] == want
    # the registry a router sends: experts it no longer knows are dropped, known ones come back
    engine.generate([dict(expert="base", prompt="hi", max_tokens=1, registry={})])
    assert engine.names == ["base"]
    out = engine.generate([{**reqs[0], "registry": {"strings": serve_experts["strings"]}}])[0]
    assert out["text"] == want[0] and engine.names == ["base", "strings"]
    # mixes are cached per weight set, LRU-evicted beyond mix_cache (a LoRA mix's adapter is deleted)
    engine.mix_cache = 1
    first = engine.generate([{**reqs[0], "mix": {"strings": 0.5}}])[0]
    adapter = engine.slots[first["expert"]].adapter
    assert first["expert"] == "mix(strings=0.5)" and adapter in engine.slots["strings"].model.peft_config
    assert engine.generate([{**reqs[0], "mix": {"strings": 0.5}}])[0]["text"] == first["text"]
    engine.generate([{**reqs[0], "mix": {"strings": 0.25}}])
    assert list(engine._mixes.values()) == ["mix(strings=0.25)"]
    assert adapter not in engine.slots["strings"].model.peft_config


@pytest.mark.slow
def test_multi_deployment_takes_experts_and_mixes_in_the_base_replica(app, multi_app, more_experts):
    """Multi-deployment: a run-time expert and the mixes are served by the `base` replica (which
    loads them into its own engine) and answer like the single-device app."""
    from ray import serve

    url, single = multi_app["url"], app["url"]
    status, added = _req(url, "POST", "/admin/experts", {"name": "arith_lora", "path": more_experts["arith_lora"]})
    assert status == 201 and added["deployment"] == "base" and added["shared_base"] is True, added
    assert set(serve.status().applications["multi"].deployments) == {"router", "base", *(f"expert-{d}" for d in DOMAINS)}
    _req(single, "POST", "/admin/experts", {"name": "arith_lora", "path": more_experts["arith_lora"]})
    try:
        text = PROMPTS["arithmetic"][1]
        for kw in ({"model": "arith_lora"}, {"model": "mix", "experts": {"arithmetic": 0.5, "comparison": 0.5}},
                   {"model": "mix", "experts": {"arith_lora": 0.5, "strings": 0.5}}):
            status, m, _ = _chat(url, text, **kw)
            _, s, _ = _chat(single, text, **kw)
            assert status == 200 and m["expert"] == s["expert"], m
            assert m["choices"][0]["message"]["content"] == s["choices"][0]["message"]["content"], (kw, m, s)
    finally:
        _req(url, "DELETE", "/admin/experts/arith_lora")
        _req(single, "DELETE", "/admin/experts/arith_lora")
    assert _chat(url, text, model="arith_lora")[0] == 404
