"""Encoder and encoder-decoder models (`model.family`): tiny random-weight BERT, RoBERTa,
DeBERTa-v2, T5 and BART built from transformers' own config classes. Encoders train sequence
classification, encoder-decoders SFT, through the same loop as every objective; the published
experts load with plain transformers/PEFT and give the run's logits; what a family cannot do
is refused before Ray starts."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import job_dict, run_cli, run_python, stray_stderr, write_job

from raylib import models
from raylib.config import validate_job
from raylib.errors import ConfigError
from raylib.launch import check_family
from raylib.synthetic import write_classification_dataset
from raylib.tiny_models import build_family
from raylib.train_loop import PlainSession, run

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "raylib-tests")
LABELS = ["arithmetic", "strings", "comparison"]


@pytest.fixture(scope="session")
def family_model():
    return lambda family: build_family(family, os.path.join(CACHE, f"arch-{family}"))


@pytest.fixture(scope="session")
def domain_data(tmp_path_factory) -> dict[str, str]:
    """One classification task: which synthetic domain a request is from (3 classes)."""
    return write_classification_dataset(str(tmp_path_factory.mktemp("domain")), n_train=300, n_eval=60,
                                        tasks=["domain"])


def _classifier_job(path, data, out, method, lr, steps=40, **sections):
    return validate_job(job_dict(path, data, out, method=method, objective={"name": "classification", "labels": LABELS},
                                 train={"lr": lr, "max_steps": steps, "batch_size": 8, "checkpoint_every": steps,
                                        "lr_scheduler": "constant"}, **sections))


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta_v2", "t5", "bart", "llama"])
def test_the_family_is_read_from_the_config(family, family_model):
    expected = {"bert": "encoder", "roberta": "encoder", "deberta_v2": "encoder", "t5": "seq2seq", "bart": "seq2seq",
                "llama": "causal"}[family]
    model_cfg = validate_job(job_dict(family_model(family), {"train": "x", "eval": None}, "o")).model
    assert models.family(model_cfg) == expected


@pytest.mark.parametrize("family, method, lr, learns", [
    ("bert", {"name": "lora", "r": 8}, 3e-3, True),
    ("bert", {"name": "full"}, 1e-3, True),
    ("roberta", {"name": "lora", "r": 8}, 3e-3, True),
    ("deberta_v2", {"name": "lora", "r": 8}, 3e-3, True),
    # a random-weight encoder's first position (what the classifier reads) carries next to
    # nothing; LoRA and full fine-tuning learn to route the text there, IA3's rescaling,
    # AdaLoRA (zero-initialised singular values) and virtual tokens do not in 80 steps: these
    # check that they train, save and reload, not what they learn
    ("bert", {"name": "ia3"}, 1e-2, False),
    ("bert", {"name": "adalora", "init_r": 8, "target_r": 4, "tinit": 10, "tfinal": 20}, 1e-2, False),
    ("bert", {"name": "prompt", "num_virtual_tokens": 8}, 3e-2, False),
    ("bert", {"name": "ptuning", "num_virtual_tokens": 8}, 1e-2, False),
])
def test_encoders_learn_sequence_classification_and_load_with_plain_transformers(
        family, method, lr, learns, family_model, domain_data, tmp_path):
    path = family_model(family)
    job = _classifier_job(path, domain_data, str(tmp_path / "o"), method, lr, steps=80)
    check_family(job)
    session = PlainSession(str(tmp_path / "ck"))
    out = run(job, session)
    final = session.reports[-1]
    assert "eval_macro_f1" in final and final["eval_accuracy_before"] < 0.4  # 3 balanced classes, untrained
    if learns:
        assert final["eval_accuracy"] > final["eval_accuracy_before"] + 0.2, final
        assert final["eval_loss"] < final["eval_loss_before"], final
    else:
        assert final["eval_loss"] != final["eval_loss_before"], final  # the trained weights moved the outputs
    expert = os.path.join(final["checkpoint"], "expert")
    assert json.load(open(os.path.join(expert, "expert.json")))["family"] == "encoder"

    # plain transformers (+ PEFT) load the expert: the same logits as the run's model, the label names
    text = "Reverse the word 'lamp'."
    ids = models.load_tokenizer(job.model)(text, return_tensors="pt")
    model = out["model"].eval()
    with torch.no_grad():
        expected = model(**ids).logits
    load = (f"AutoModelForSequenceClassification.from_pretrained({expert!r})" if method["name"] == "full" else
            f"PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained({path!r}, num_labels=3), "
            f"{expert!r})")
    proc = run_python(f"""
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained({expert!r})
model = {load}.eval()
with torch.no_grad():
    print(json.dumps(model(**tok({text!r}, return_tensors="pt")).logits[0].tolist()))
print(json.dumps(getattr(model, "config", None) and model.config.id2label))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits, id2label = proc.stdout.strip().splitlines()
    torch.testing.assert_close(torch.tensor(json.loads(logits)), expected[0].float(), atol=1e-4, rtol=1e-4)
    if method["name"] == "full":
        assert list(json.loads(id2label).values()) == LABELS


@pytest.mark.parametrize("family, method, lr", [
    ("t5", {"name": "lora", "r": 8}, 3e-3),
    ("t5", {"name": "full"}, 1e-3),
    ("bart", {"name": "lora", "r": 8}, 1e-2),
    ("bart", {"name": "full"}, 1e-3),
])
def test_encoder_decoders_learn_sft_and_load_with_plain_transformers(family, method, lr, family_model, demo_data,
                                                                     tmp_path):
    path = family_model(family)
    job = validate_job(job_dict(path, demo_data, str(tmp_path / "o"), method=method,
                                train={"lr": lr, "max_steps": 60, "batch_size": 8, "checkpoint_every": 60,
                                       "lr_scheduler": "constant"}))
    check_family(job)
    session = PlainSession(str(tmp_path / "ck"))
    out = run(job, session)
    final = session.reports[-1]
    assert final["eval_loss"] < final["eval_loss_before"] - 0.2, final
    assert final["eval_token_accuracy"] > final["eval_token_accuracy_before"] + 0.1, final
    expert = os.path.join(final["checkpoint"], "expert")
    assert json.load(open(os.path.join(expert, "expert.json")))["family"] == "seq2seq"

    tok = models.load_tokenizer(job.model)
    enc = tok("### Instruction:\nWhat is 2 + 3?\n\n### Response:\n", return_tensors="pt")
    labels = tok("5", add_special_tokens=False, return_tensors="pt").input_ids
    model = out["model"].eval()
    with torch.no_grad():
        expected = model(**enc, labels=labels).logits
    load = (f"AutoModelForSeq2SeqLM.from_pretrained({expert!r})" if method["name"] == "full" else
            f"PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained({path!r}), {expert!r})")
    proc = run_python(f"""
import json, torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained({expert!r})
enc = tok("### Instruction:\\nWhat is 2 + 3?\\n\\n### Response:\\n", return_tensors="pt")
labels = tok("5", add_special_tokens=False, return_tensors="pt").input_ids
model = {load}.eval()
with torch.no_grad():
    print(json.dumps(model(**enc, labels=labels).logits[0].tolist()))
print(len(model.generate(**enc, max_new_tokens=4, do_sample=False)[0]) > 1)
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits, generated = proc.stdout.strip().splitlines()
    torch.testing.assert_close(torch.tensor(json.loads(logits)), expected[0].float(), atol=1e-4, rtol=1e-4)
    assert generated == "True"


def test_a_seq2seq_expert_through_the_cli_and_raylib_eval(family_model, demo_data, tmp_path):
    """`raylib train --local` then `raylib eval`: loss, token accuracy and generation metrics of
    an encoder-decoder expert (the decoder's answers, not the prompt echoed)."""
    out = str(tmp_path / "run")
    job = write_job(tmp_path / "job.yaml", job_dict(family_model("t5"), demo_data, out,
                                                     train={"lr": 3e-3, "max_steps": 30, "checkpoint_every": 30}))
    trained = run_cli("train", job, "--local", "--quiet")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert not stray_stderr(trained.stderr), stray_stderr(trained.stderr)  # no third-party lines
    report = tmp_path / "eval.json"
    evaluated = run_cli("eval", out, "--data", demo_data["eval"], "--out", str(report), "--max-rows", "20",
                        "--shards", "1")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(report.read_text())
    run_metrics = json.load(open(os.path.join(out, "run.json")))["metrics"]
    # teacher-forced over the same rows as the run's eval: the trained expert's loss, not the base's
    assert abs(metrics["loss"] - run_metrics["eval_loss"]) < 1.0, (metrics, run_metrics)
    assert metrics["loss"] < run_metrics["eval_loss_before"] - 1.0 and metrics["token_accuracy"] > 0.1, metrics
    predictions = [json.loads(line) for line in open(tmp_path / "eval_predictions.jsonl")]
    assert len(predictions) == 20 and all("###" not in p["prediction"] for p in predictions), predictions[:3]
    assert "exact_match" in metrics and "bleu" in metrics


@pytest.mark.parametrize("family, change, field, text", [
    ("bert", {"method": {"name": "svf"}}, "method.name", "does not train encoder"),
    ("bert", {"method": {"name": "prefix", "num_virtual_tokens": 8}}, "method.name", "past key values"),
    ("bert", {"objective": {"name": "sft"}}, "objective.name", "sequence classification"),
    ("t5", {"method": {"name": "ia3"}}, "method.name", "does not train seq2seq"),
    ("t5", {"objective": {"name": "dpo"}}, "objective.name", "trains sft"),
    ("t5", {"data": {"template": "chat"}}, "data.template", "alpaca"),
    ("t5", {"data": {"packing": True}}, "data.packing", "no packing"),
])
def test_what_a_family_cannot_do_is_refused_before_ray(family, change, field, text, family_model, demo_data,
                                                         domain_data, tmp_path):
    raw = job_dict(family_model(family), domain_data if family == "bert" else demo_data, str(tmp_path / "o"))
    if family == "bert":
        raw["objective"] = {"name": "classification", "labels": LABELS}
    for section, values in change.items():
        if section in ("method", "objective"):
            raw[section] = values
        else:
            raw[section].update(values)
    with pytest.raises(ConfigError) as err:
        check_family(validate_job(raw))
    assert err.value.field == field and text in str(err.value), str(err.value)


def test_classification_needs_its_labels_and_the_cli_says_so(family_model, domain_data, tmp_path):
    raw = job_dict(family_model("bert"), domain_data, str(tmp_path / "o"), objective={"name": "classification"})
    with pytest.raises(ConfigError) as err:
        validate_job(raw)
    assert err.value.field == "objective.labels"
    raw["objective"] = {"name": "sft"}
    proc = run_cli("train", write_job(tmp_path / "job.yaml", raw), "--local")
    assert proc.returncode == 2 and "objective.name" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")], proc.stderr


@pytest.mark.slow
def test_the_family_examples_run_as_their_comments_say(tmp_path):
    """jobs/examples/encoder-classification.yaml and seq2seq.yaml with the assets their comments
    build, through the CLI (shortened): the encoder stops early or ends, publishes its best
    checkpoint, and beats chance; the seq2seq expert's eval loss falls."""
    root = os.path.join(os.path.dirname(__file__), "..", "jobs", "examples")
    for args in (["tiny", "models/tiny-bert", "--family", "bert"], ["synth-cls", "data/domain", "--task", "domain"],
                 ["tiny", "models/tiny-t5", "--family", "t5"], ["synth", "data/demo"]):
        proc = run_cli(*args, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-2000:]
    enc = run_cli("train", os.path.join(root, "encoder-classification.yaml"), "--local", "--quiet",
                  "--set", "train.max_steps=60", cwd=str(tmp_path))
    assert enc.returncode == 0, enc.stderr[-3000:]
    assert not stray_stderr(enc.stderr), stray_stderr(enc.stderr)
    run_json = json.loads((tmp_path / "runs" / "encoder-cls" / "run.json").read_text())
    assert run_json["published"]["which"] == "best" and run_json["published"]["eval_accuracy"] > 0.5, run_json
    s2s = run_cli("train", os.path.join(root, "seq2seq.yaml"), "--local", "--quiet", "--set", "train.max_steps=40",
                  cwd=str(tmp_path))
    assert s2s.returncode == 0, s2s.stderr[-3000:]
    assert not stray_stderr(s2s.stderr), stray_stderr(s2s.stderr)
    metrics = json.loads((tmp_path / "runs" / "seq2seq-lora" / "run.json").read_text())["metrics"]
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.5, metrics


def test_an_encoder_classifier_on_two_ray_workers_is_not_served(ray_session, family_model, domain_data, tmp_path):
    """Ray Train, 2 DDP workers: the classifier learns, the published expert says it is an
    encoder's, and a serve config naming it is refused (the engines decode causal LMs)."""
    from raylib import launch
    from raylib.serve.config import validate_serve_config

    out = str(tmp_path / "run")
    job = _classifier_job(family_model("bert"), domain_data, out, {"name": "lora", "r": 8}, 3e-3, steps=60,
                          scaling={"num_workers": 2})
    result = launch.train(job, show_progress=False)
    m = result.metrics
    assert m["world_size"] == 2 and m["eval_accuracy"] > m["eval_accuracy_before"] + 0.2, m
    assert json.load(open(os.path.join(out, "expert.json")))["family"] == "encoder"
    with pytest.raises(ConfigError) as err:
        validate_serve_config({"base_model": family_model("bert"), "experts": {"cls": out},
                               "router": {"strategy": "keywords", "keywords": {"cls": ["+"]}}})
    assert err.value.field == "experts.cls.path" and "not served" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("family, stage", [("bert", 3), ("t5", 2)])
def test_encoder_and_seq2seq_on_deepspeed_two_workers(ray_session, family_model, domain_data, demo_data, family,
                                                      stage, tmp_path):
    """DeepSpeed ZeRO-2/3 over 2 Ray workers. The ZeRO-3 classifier's published adapter (with
    its gathered classifier and pooler) scores the eval rows with plain transformers + PEFT
    exactly as the run's eval did."""
    from raylib import launch

    out = str(tmp_path / "run")
    sections = {"backend": {"name": "deepspeed", "zero_stage": stage}, "scaling": {"num_workers": 2}}
    if family == "bert":
        job = _classifier_job(family_model("bert"), domain_data, out, {"name": "lora", "r": 8}, 3e-3, steps=40,
                              **sections)
    else:
        job = validate_job(job_dict(family_model("t5"), demo_data, out, method={"name": "lora", "r": 8},
                                    train={"lr": 3e-3, "max_steps": 40, "checkpoint_every": 40}, **sections))
    m = launch.train(job, show_progress=False).metrics
    assert m["world_size"] == 2 and m["eval_loss"] < m["eval_loss_before"] - 0.2, m
    if family != "bert":
        return
    assert m["eval_accuracy"] > m["eval_accuracy_before"] + 0.2, m
    proc = run_python(f"""
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained({out!r})
model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained({family_model("bert")!r},
                                  num_labels=3), {out!r}).eval()
rows = [json.loads(line) for line in open({domain_data["eval"]!r})]
labels = {LABELS!r}
with torch.no_grad():
    right = sum(model(**tok(r["text"], return_tensors="pt")).logits.argmax(-1).item() == labels.index(r["label"])
                for r in rows)
print(right / len(rows))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip()) == pytest.approx(m["eval_accuracy"], abs=1e-6)
