"""`raylib eval` (Ray tasks over shards; perplexity, token accuracy, EM, BLEU, ROUGE) and
`raylib export --merge` (LoRA and SVF folded into plain HF weights; optional ONNX)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import job_dict, run_cli

from raylib import metrics as M


def test_text_metrics_on_known_cases():
    assert M.exact_match(["4", " b"], ["4", "c"]) == 0.5
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert M.bleu(["dog"], ["the cat sat on the mat"]) < 5
    r = M.rouge(["the cat sat", "a b"], ["the cat sat", "c d"])
    assert r["rouge1"] == pytest.approx(0.5) and r["rougeL"] == pytest.approx(0.5)
    assert M.perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0)


@pytest.fixture(scope="module")
def lora_expert(tiny_model, demo_data, tmp_path_factory) -> str:
    from raylib.config import validate_job
    from raylib.train_loop import PlainSession, run

    root = tmp_path_factory.mktemp("lora")
    job = validate_job(job_dict(tiny_model, demo_data, str(root / "o"), method={"name": "lora", "r": 8, "dropout": 0.0},
                                train={"max_steps": 12, "checkpoint_every": 0}))
    session = PlainSession(str(root / "ckpt"))
    run(job, session)
    return os.path.join(session.reports[-1]["checkpoint"], "expert")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_export_merge_lora_loads_with_plain_transformers_and_onnx(lora_expert, tiny_model, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = str(tmp_path / "merged")
    proc = run_cli("export", lora_expert, "--merge", out, "--onnx", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(os.path.join(out, "expert.json")))["method"] == "full"
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 200, (2, 16))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), lora_expert).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), atol=2e-4, rtol=1e-4)
    assert (_logits(merged, ids) - _logits(base, ids)).abs().max() > 1e-2  # the adapter is in the weights

    # ONNX (dynamo exporter): onnxruntime gives the same logits, at another batch size and length
    session = ort.InferenceSession(os.path.join(out, "model.onnx"))
    ids = torch.randint(0, 200, (3, 9))
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})[0]
    assert abs(got - _logits(merged, ids).numpy()).max() < 1e-3


def test_export_merge_svf(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylib.experts import ExpertInfo, write_expert_json
    from raylib.methods import svf

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    svf.apply_svf(model, "mlp", cache_dir=str(tmp_path / "cache"), model_path=tiny_model, forward="rebuild")
    svf.set_z(model, {n: 1 + 0.5 * torch.randn_like(z) for n, z in svf.get_z(model).items()})
    expert = str(tmp_path / "svf-expert")
    svf.save_z(model, expert)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(expert)
    write_expert_json(expert, ExpertInfo(method="svf", base_model=tiny_model))
    ids = torch.randint(0, 200, (2, 16))
    want = _logits(model, ids)

    out = str(tmp_path / "merged")
    proc = run_cli("export", expert, "--merge", out, env={"RAYLIB_SVF_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged, ids), want, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_eval_cli_over_ray_shards_and_merged_model_agrees(lora_expert, demo_data, tmp_path, ray_session):
    out_json = str(tmp_path / "eval.json")
    proc = run_cli("eval", lora_expert, "--data", demo_data["eval"], "--shards", "2", "--max-rows", "24",
                   "--max-new-tokens", "16", "--out", out_json)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("perplexity", "token accuracy", "exact match", "BLEU", "ROUGE-L"):
        assert label in proc.stdout
    m = json.load(open(out_json))
    assert m["rows"] == 24 and m["shards"] == 2 and m["tokens"] > 0
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    from transformers import AutoTokenizer

    from raylib.experts import read_expert

    vocab = len(AutoTokenizer.from_pretrained(read_expert(lora_expert).base_model))
    # a trained expert predicts its data far better than a uniform guess over the vocabulary
    assert m["perplexity"] < vocab / 4 and m["token_accuracy"] > 4 / vocab, (m, vocab)
    preds = [json.loads(line) for line in open(str(tmp_path / "eval_predictions.jsonl"))]
    assert len(preds) == 24 and all("prediction" in p and "reference" in p for p in preds)
    # the shards' metrics are those of the predictions they wrote, scored by the libraries themselves
    import sacrebleu
    from rouge_score import rouge_scorer

    hyp, ref = [p["prediction"] for p in preds], [p["reference"] for p in preds]
    assert m["exact_match"] == pytest.approx(sum(h.strip() == r.strip() for h, r in zip(hyp, ref)) / 24)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref]).score, abs=1e-6)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert m["rougeL"] == pytest.approx(sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyp, ref)) / 24)

    # the merged model is the same function: same metrics in one shard, rows back in order
    from raylib.eval_cli import evaluate
    from raylib.export import merge_expert

    merged = merge_expert(lora_expert, str(tmp_path / "merged"))
    again = evaluate(merged, demo_data["eval"], shards=1, max_rows=24, max_new_tokens=16)
    assert again["metrics"]["perplexity"] == pytest.approx(m["perplexity"], rel=1e-3)
    assert [p["prediction"] for p in again["predictions"]] == [p["prediction"] for p in preds]


def test_eval_rejects_a_directory_without_an_expert(tmp_path, demo_data):
    proc = run_cli("eval", str(tmp_path), "--data", demo_data["eval"])
    assert proc.returncode == 2 and "expert.json" in proc.stderr
